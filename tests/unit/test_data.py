"""Unit tests of the data package: FreeDict builder, subword tokenizer, array layouts."""
import hashlib
import multiprocessing
import time

import numpy as np
import pytest

from common.data import freedict
from common.data.freedict import FreedictEngDeu, check_source
from common.data.tfds_io import DataError, load_prepared, prepare_embedded
from common.data.seq2seq import load_translation

MAX_LEN = 24
VOCAB = 1000
ENTRY = (
    "blow-off valve /blˈəʊ ˈɒf vˈalv/\n"
    "Abblaseschieber <masc>, Abblaseventil <neut> [techn.]\n"
    "         Note: Metallurgie\n"
    '      "blow-off valves"  - Abblaseschieber, Abblaseventile\n'
    '      "Don\'t keep us in suspense, guys!"  - Macht es nicht so spannend, Leute!, Spannt uns nicht auf die Folter!\n'
    '      "mileage account tyre/tire"  - verschleißfester Reifen\n'
    "   Synonyms: {turbo-relief valve}, {anti-surge valve}\n\n"
    " see: {bypass valves}\n")


def _load(data_dir, **kwargs):
    return load_translation(data_dir=str(data_dir), dataset=None, debug=True,
                            max_len=MAX_LEN, vocab_size=VOCAB, **kwargs)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def builder(data_dir):
    return prepare_embedded(FreedictEngDeu, str(data_dir), config="debug")


@pytest.fixture(scope="module")
def data(data_dir, builder):
    del builder  # Prepared first, so that load_translation reuses it.
    return _load(data_dir)


def _texts(builder, split):
    import tensorflow_datasets as tfds
    return [(ex["en"].decode(), ex["de"].decode())
            for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))]


def test_entry_parsing_strips_tags_and_skips_variants():
    assert freedict.entry_pairs(ENTRY) == [
        ("blow-off valve", "Abblaseschieber"),
        ("blow-off valves", "Abblaseschieber"),
        ("Don't keep us in suspense, guys!", "Macht es nicht so spannend, Leute!"),
    ]


def test_debug_builder_builds(builder):
    assert builder.info.splits["train"].num_examples == freedict.DEBUG_TRAIN
    assert builder.info.splits["test"].num_examples == freedict.DEBUG_TEST


def test_splits_are_disjoint(builder):
    train = {en.lower() for en, _ in _texts(builder, "train")}
    test = {en.lower() for en, _ in _texts(builder, "test")}
    assert not train & test
    assert all(freedict.is_test(en) for en in test)


def test_pairs_look_like_real_text(builder):
    pairs = _texts(builder, "train")
    for en, de in pairs:
        assert en and de and en == en.strip() and de == de.strip()
        assert not any(mark in en + de for mark in ("<", ">", "[", "/", "{"))
        assert freedict.MIN_WORDS <= len(en.split()) <= freedict.MAX_WORDS
    assert sum(en.endswith((".", "?", "!")) for en, _ in pairs) > 50


def test_tokenizer_round_trip(data):
    tokenizer = data.tokenizer
    texts = data.test_src_text + data.test_tgt_text
    ids = tokenizer.encode(texts)
    exact = sum(tokenizer.decode(row + [tokenizer.eos_id, 17]) == text
                for row, text in zip(ids, texts))
    assert exact >= 0.98 * len(texts)
    assert tokenizer.decode([tokenizer.bos_id] + ids[0] + [tokenizer.eos_id, 0]) == texts[0]
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    assert 100 < tokenizer.vocab_size <= VOCAB


def _assert_rows(array, eos, first=None):
    """Every row: optional `first` id, then non-pad ids, exactly one eos, then only pad."""
    for row in array:
        end = int(np.flatnonzero(row == eos)[0])
        assert (row[:end] != 0).all() and (row[end + 1:] == 0).all()
        assert (row == eos).sum() == 1
        if first is not None:
            assert row[0] == first and (row[1:] != first).all()


def test_array_layouts(data):
    eos, bos = data.tokenizer.eos_id, data.tokenizer.bos_id
    assert data.train_src.dtype == data.train_tgt.dtype == data.test_src.dtype == np.int32
    assert data.train_src.shape[1] == data.test_src.shape[1] == MAX_LEN
    assert data.train_tgt.shape == (len(data.train_src), MAX_LEN + 1)
    assert 0.9 * freedict.DEBUG_TRAIN < len(data.train_src) <= freedict.DEBUG_TRAIN
    assert len(data.test_src) == len(data.test_src_text) == len(data.test_tgt_text)
    _assert_rows(data.train_src, eos)
    _assert_rows(data.train_tgt, eos, first=bos)
    _assert_rows(data.test_src, eos)
    assert data.tokenizer.decode(data.test_src[0]) == data.test_src_text[0]


def test_max_test_and_reload_are_deterministic(data_dir, data):
    again = _load(data_dir, max_test=10)
    np.testing.assert_array_equal(again.train_src, data.train_src)
    np.testing.assert_array_equal(again.train_tgt, data.train_tgt)
    assert again.test_src_text == data.test_src_text[:10]
    assert len(again.test_src) == 10


def test_missing_source_fails_fast_with_package_name(tmp_path):
    missing = str(tmp_path / "nowhere.dict.dz")
    with pytest.raises(DataError, match="dict-freedict-eng-deu"):
        check_source(missing)
    start = time.monotonic()
    with pytest.raises(DataError, match="apt-get install dict-freedict-eng-deu"):
        _load(tmp_path, source_path=missing)
    assert time.monotonic() - start < 1
    assert not list(tmp_path.iterdir())


def test_unprepared_public_dataset_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(DataError, match="tfds build wmt14_translate/de-en") as error:
        load_translation(data_dir=str(tmp_path), dataset="wmt14_translate/de-en",
                         debug=False, max_len=MAX_LEN, vocab_size=VOCAB)
    assert time.monotonic() - start < 10
    assert "\n" not in str(error.value)


def test_unknown_public_dataset_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="--dataset"):
        load_prepared("no_such_dataset_anywhere", str(tmp_path))


def _fingerprint(data_dir: str) -> str:
    data = _load(data_dir)
    digest = hashlib.sha256()
    for array in (data.train_src, data.train_tgt, data.test_src):
        digest.update(array.tobytes())
    digest.update("\n".join(data.test_src_text + data.test_tgt_text).encode())
    digest.update(str(data.tokenizer.encode(data.test_tgt_text)).encode())
    return digest.hexdigest()


@pytest.mark.slow
def test_concurrent_processes_prepare_once_and_agree(tmp_path):
    context = multiprocessing.get_context("spawn")  # Forking a process with TF loaded is unsafe.
    with context.Pool(2) as pool:
        first, second = pool.map(_fingerprint, [str(tmp_path)] * 2)
    assert first == second
    assert len(list((tmp_path / "freedict_eng_deu" / "debug").iterdir())) == 1
