"""Unit tests of the Python docstrings builder and the summarization loader."""
import textwrap
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from common.data import docstrings
from common.data.docstrings import PythonDocstrings, check_source
from common.data.seq2seq import load_summarization
from common.data.tfds_io import DataError, prepare_embedded
from tests.unit.test_data import _assert_rows

MAX_SRC, MAX_TGT = 48, 16
VOCAB = 1000
MODULE = textwrap.dedent('''
    """Module docstring."""
    import os


    def outer(path, mode="r"):
        """Open a file
        relative to the current directory, e.g. data. Then more.

        Details that are not part of the summary.
        """
        def inner():
            """Nested docstrings are dropped too."""
            return os.getcwd()  # A comment, dropped.
        return open(os.path.join(inner(), path), mode)


    class Reader:
        """Not a function."""

        def read(self, size):
            """Read up to size bytes from the file."""
            return self._file.read(size)

        def close(self):
            """Short summary."""
            self._file.close()

        def seek(self, offset):
            """seek(offset) -> None. Moves the file position."""
            self._file.seek(offset)

        def flush(self):
            """Flush the buffers to the disk."""
            raise NotImplementedError("subclasses flush")

        if os.name == "nt":
            async def fetch(self):
                """Fetch the next block of data."""
                return await self._file.fetch()
''')


def _load(data_dir, **kwargs):
    return load_summarization(data_dir=str(data_dir), dataset=None, debug=True,
                              max_src_len=MAX_SRC, max_tgt_len=MAX_TGT, vocab_size=VOCAB,
                              **kwargs)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def builder(data_dir):
    return prepare_embedded(PythonDocstrings, str(data_dir), config="debug")


@pytest.fixture(scope="module")
def data(data_dir, builder):
    del builder  # Prepared first, so that load_summarization reuses it.
    return _load(data_dir)


def _pairs(builder, split):
    return [(example["code"].decode(), example["summary"].decode())
            for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))]


@pytest.fixture
def fake_stdlib(tmp_path):
    """A library folder: the module, a package repeating it with one more function, a
    module that does not parse and copies in folders that are skipped."""
    for folder in ("pkg", "test", "idlelib", "site-packages"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "codec.py").write_text(MODULE + "\ndef skipped(): return 1\n")
    (tmp_path / "codec.py").write_text(MODULE)
    (tmp_path / "pkg" / "__init__.py").write_text(
        MODULE + '\ndef extra():\n    """Return the extra value here."""\n    return 42\n')
    (tmp_path / "os.py").write_text("")
    (tmp_path / "broken.py").write_text("def broken(:\n")
    return tmp_path


def test_extraction_of_a_known_library(fake_stdlib):
    """Docstrings dropped, first sentence kept, placeholders, short and signature
    summaries skipped, duplicates (here: all of pkg but `extra`) dropped."""
    check_source(str(fake_stdlib))
    examples = docstrings.all_examples(str(fake_stdlib))
    assert [(name, summary) for name, _, summary in examples] == [
        ("codec.outer", "Open a file relative to the current directory, e.g. data."),
        ("codec.outer.inner", "Nested docstrings are dropped too."),
        ("codec.Reader.read", "Read up to size bytes from the file."),
        ("codec.Reader.fetch", "Fetch the next block of data."),
        ("pkg.extra", "Return the extra value here."),
    ]
    assert examples[0][1] == ("def outer(path, mode='r'): def inner(): return os.getcwd() "
                              "return open(os.path.join(inner(), path), mode)")
    assert examples[3][1] == "async def fetch(self): return await self._file.fetch()"


def test_debug_builder_builds(builder):
    assert builder.info.splits["train"].num_examples == docstrings.DEBUG_TRAIN
    assert builder.info.splits["test"].num_examples == docstrings.DEBUG_TEST
    assert f"Python {docstrings.PYTHON_VERSION} " in builder.info.description


def test_splits_are_disjoint(builder):
    train_code = {code for code, _ in _pairs(builder, "train")}
    assert len(train_code) == docstrings.DEBUG_TRAIN
    assert not train_code & {code for code, _ in _pairs(builder, "test")}


def test_examples_look_like_code_and_summaries(builder):
    pairs = _pairs(builder, "train") + _pairs(builder, "test")
    for code, summary in pairs:
        assert code.startswith(("def ", "async def ", "@")) and "\n" not in code
        assert summary == " ".join(summary.split())
        assert len(summary.split()) >= docstrings.MIN_SUMMARY_WORDS
        assert f'"""{summary}' not in code and f'""" {summary}' not in code
    assert sum(summary in code for code, summary in pairs) <= 0.01 * len(pairs)
    assert sum(summary.endswith(".") for _, summary in pairs) > 0.8 * len(pairs)


def test_summary_array_layouts(data):
    eos, bos = data.tokenizer.eos_id, data.tokenizer.bos_id
    assert data.train_src.dtype == data.train_tgt.dtype == data.test_src.dtype == np.int32
    assert data.train_src.shape[1] == data.test_src.shape[1] == MAX_SRC
    assert data.train_tgt.shape == (len(data.train_src), MAX_TGT + 1)
    assert len(data.test_src) == len(data.test_src_text) == len(data.test_tgt_text)
    _assert_rows(data.train_src, eos)
    _assert_rows(data.train_tgt, eos, first=bos)
    _assert_rows(data.test_src, eos)
    assert 100 < data.tokenizer.vocab_size <= VOCAB


def test_long_sources_are_truncated_and_long_summaries_dropped(builder, data):
    """Truncation keeps a source's first tokens (those of its whole text)."""
    tokenizer = data.tokenizer
    full_rows = (data.train_src[:, -1] == tokenizer.eos_id).sum()
    assert 0.1 * len(data.train_src) < full_rows < len(data.train_src)
    summaries = [summary for _, summary in _pairs(builder, "train")]
    short_targets = sum(len(ids) < MAX_TGT for ids in tokenizer.encode(summaries))
    assert len(data.train_src) == short_targets < docstrings.DEBUG_TRAIN
    for row, text in zip(data.test_src, data.test_src_text):
        ids = tokenizer.encode([text])[0][:MAX_SRC - 1] + [tokenizer.eos_id]
        np.testing.assert_array_equal(row[:len(ids)], ids)


def test_max_test_and_reload_are_deterministic(data_dir, data):
    again = _load(data_dir, max_test=10)
    np.testing.assert_array_equal(again.train_src, data.train_src)
    np.testing.assert_array_equal(again.train_tgt, data.train_tgt)
    assert again.test_tgt_text == data.test_tgt_text[:10]
    np.testing.assert_array_equal(again.test_src, data.test_src[:10])


def test_missing_stdlib_fails_fast_naming_the_fix(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match=f"apt-get install libpython{docstrings.PYTHON_VERSION}"):
        check_source(missing)
    start = time.monotonic()
    with pytest.raises(DataError, match="standard library sources not found"):
        _load(tmp_path, stdlib_dir=missing)
    assert time.monotonic() - start < 1
    assert not list(tmp_path.iterdir())


def test_unprepared_cnn_dailymail_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(DataError, match="tfds build cnn_dailymail") as error:
        load_summarization(data_dir=str(tmp_path), dataset="cnn_dailymail", debug=False,
                           max_src_len=MAX_SRC, max_tgt_len=MAX_TGT, vocab_size=VOCAB)
    assert time.monotonic() - start < 10
    assert "\n" not in str(error.value)
