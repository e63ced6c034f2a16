"""Source->target text pairs of a prepared TFDS builder as padded id arrays: the translation
and summarization data. Every process reads the splits in their stored order and encodes them
with the same subword model, so the arrays are identical in every process of a job.
"""
import dataclasses
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from common.data import bible, docstrings, freedict
from common.data.subword import SubwordTokenizer
from common.data.tfds_io import DataError, load_prepared, prepare_embedded

# Truncated sources are cut to this many words for training the subword model: a
# word gives at least one token, so it sees all that any usual source width keeps,
# and sentencepiece silently skips lines longer than 4192 bytes (whole articles).
TOKENIZER_SOURCE_WORDS = 256


@dataclasses.dataclass(frozen=True)
class Seq2SeqData:
    """Train and test data; rows of every array end with eos and are padded with 0."""

    train_src: np.ndarray  # int32 [n, max_src_len]: source ids, eos
    train_tgt: np.ndarray  # int32 [n, max_tgt_len + 1]: bos, target ids, eos
    test_src: np.ndarray  # int32 [m, max_src_len]: source ids (truncated), eos
    test_tgt: np.ndarray  # int32 [m, max_tgt_len + 1]: bos, target ids, eos (unless truncated)
    test_src_text: list[str]
    test_tgt_text: list[str]
    tokenizer: SubwordTokenizer


def open_builder(data_dir: str, dataset: str | None, embedded_cls, config: str,
                 **builder_kwargs) -> tuple[tfds.core.DatasetBuilder, str]:
    """The prepared builder and the folder of its subword model.

    `dataset` names a public TFDS data set, which must already be prepared in
    `data_dir` (DataError otherwise); None selects `config` of the embedded builder
    `embedded_cls`, prepared here if needed.
    """
    if dataset is not None:
        builder, name = load_prepared(dataset, data_dir), dataset.replace("/", "_")
    else:
        builder = prepare_embedded(embedded_cls, data_dir, config=config, **builder_kwargs)
        name = f"{builder.name}_{config}"
    return builder, os.path.join(data_dir, "subword", name)


def _batches(builder, split: str, keys: tuple[str, ...]):
    """Batches of {feature: texts as UTF-8 bytes} of `split`, in the stored order.

    TFRecord shards are parsed here a batch at a time: TFDS decodes one example at a
    time, which is slow for the 270k pairs of FreeDict's `sentences` config.
    """
    if builder.info.file_format != tfds.core.file_adapters.FileFormat.TFRECORD:
        yield from tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False).batch(8192))
        return
    files = [instruction.filename for instruction in builder.info.splits[split].file_instructions]
    spec = {key: tf.io.FixedLenFeature([], tf.string) for key in keys}
    records = tf.data.TFRecordDataset(files).batch(8192)
    yield from tfds.as_numpy(records.map(lambda batch: tf.io.parse_example(batch, spec)))


def read_split(builder, split: str, source_key: str,
               target_key: str) -> tuple[list[str], list[str]]:
    """Source and target texts of `split`, in the same order in every process."""
    sources, targets = [], []
    for batch in _batches(builder, split, (source_key, target_key)):
        sources.extend(text.decode("utf-8") for text in batch[source_key])
        targets.extend(text.decode("utf-8") for text in batch[target_key])
    return sources, targets


def head_words(text: str, count: int) -> str:
    """The first `count` whitespace-separated words of `text`, joined by single spaces.

    Each word gives at least one token and sentencepiece, which collapses whitespace,
    never joins words into one token: the first `count` tokens of the result are
    those of `text`.
    """
    return " ".join(text.split(maxsplit=count)[:count])


def _heads(texts: list[str], count: int, truncate: bool) -> list[str]:
    """Where `truncate`, each text cut to its first `count` words: only the start of a
    truncated source is used, and encoding whole articles would be slow."""
    return [head_words(text, count) for text in texts] if truncate else texts


def _interleaved(sources: list[str], targets: list[str]):
    for pair in zip(sources, targets):
        yield from pair


def _padded(rows: list[list[int]], width: int) -> np.ndarray:
    array = np.zeros((len(rows), width), np.int32)
    for index, row in enumerate(rows):
        array[index, :len(row)] = row
    return array


def _train_arrays(tokenizer: SubwordTokenizer, sources: list[str], targets: list[str],
                  max_src_len: int, max_tgt_len: int,
                  truncate_sources: bool) -> tuple[np.ndarray, np.ndarray]:
    """Source and target arrays, dropping pairs that do not fit their width with eos
    (and bos); over-long sources are cut to fit instead where `truncate_sources`."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    source_rows, target_rows = [], []
    for source, target in zip(tokenizer.encode(sources), tokenizer.encode(targets)):
        if truncate_sources:
            source = source[:max_src_len - 1]
        if len(source) < max_src_len and len(target) < max_tgt_len:
            source_rows.append(source + [eos])
            target_rows.append([bos] + target + [eos])
    return _padded(source_rows, max_src_len), _padded(target_rows, max_tgt_len + 1)


def _fitting(tokenizer: SubwordTokenizer, sources: list[str], targets: list[str], max_src_len: int,
             max_tgt_len: int) -> tuple[list[str], list[str]]:
    """The pairs whose source fits `max_src_len` tokens with eos, and target `max_tgt_len`."""
    kept = [(source, target) for source, target, source_ids, target_ids in
            zip(sources, targets, tokenizer.encode(sources), tokenizer.encode(targets))
            if len(source_ids) < max_src_len and len(target_ids) < max_tgt_len]
    return [pair[0] for pair in kept], [pair[1] for pair in kept]


def load_seq2seq(builder, source_key: str, target_key: str, *, tokenizer_dir: str,
                 max_src_len: int, max_tgt_len: int, vocab_size: int,
                 max_test: int | None = None, truncate_sources: bool = False,
                 whole_test: bool = False) -> Seq2SeqData:
    """Encodes the `train` and `test` splits of a prepared builder.

    The subword model (in `tokenizer_dir`) is trained on the train split only, on
    sources and targets alike. Training pairs whose target, or (unless
    `truncate_sources`) whose source, is too long for its width are dropped; test
    sources are always truncated, keeping their start, and so are test targets (they
    serve the held-out loss), unless `whole_test`, which keeps only the test pairs whose
    sides both fit whole, as training keeps them. `max_test` keeps the first test pairs.
    """
    train_sources, train_targets = read_split(builder, "train", source_key, target_key)
    test_sources, test_targets = read_split(builder, "test", source_key, target_key)
    tokenizer = SubwordTokenizer.train_or_load(
        lambda: _interleaved(_heads(train_sources, TOKENIZER_SOURCE_WORDS, truncate_sources),
                             train_targets),
        tokenizer_dir, vocab_size)
    if whole_test:
        test_sources, test_targets = _fitting(tokenizer, test_sources, test_targets, max_src_len, max_tgt_len)
    test_sources, test_targets = test_sources[:max_test], test_targets[:max_test]
    train_src, train_tgt = _train_arrays(
        tokenizer, _heads(train_sources, max_src_len, truncate_sources), train_targets,
        max_src_len, max_tgt_len, truncate_sources)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    test_ids = [ids[:max_src_len - 1] + [eos] for ids in
                tokenizer.encode(_heads(test_sources, max_src_len, truncate_sources))]
    # A target cut short keeps no eos: the held-out loss scores only tokens the reference has.
    test_target_ids = [[bos] + (ids + [eos])[:max_tgt_len] for ids in tokenizer.encode(test_targets)]
    return Seq2SeqData(train_src=train_src, train_tgt=train_tgt,
                       test_src=_padded(test_ids, max_src_len),
                       test_tgt=_padded(test_target_ids, max_tgt_len + 1),
                       test_src_text=test_sources, test_tgt_text=test_targets,
                       tokenizer=tokenizer)


def load_translation(*, data_dir: str, dataset: str | None, debug: bool, max_len: int, vocab_size: int,
                     corpus: str = "freedict", source_path: str = freedict.DEFAULT_SOURCE,
                     max_test: int | None = None) -> Seq2SeqData:
    """Translation pairs (train_src [n, max_len], train_tgt [n, max_len + 1]), preparing the
    embedded data set if needed when `dataset` is None: `corpus` "bible", English->Spanish
    verses of the SWORD modules (`bible.BibleVerses`), held-out verses only those that fit
    `max_len` whole (but for `debug`'s few short ones); or "freedict", English->German pairs of the FreeDict dictionary at
    `source_path`. Either one's `debug` config if `debug`. Else `dataset` is a public TFDS
    translation set with `en` and `de` features, prepared in `data_dir` (DataError otherwise).
    The subword vocabulary is learned from the train split; training pairs with a side longer
    than `max_len` tokens with eos are dropped."""
    config = "debug" if debug else None
    if dataset is None and corpus == "bible":
        bible.check_tools(bible.ENGLISH, bible.SPANISH)
        builder, tokenizer_dir = open_builder(data_dir, None, bible.BibleVerses, config or "verses")
        return load_seq2seq(builder, "en", "es", tokenizer_dir=tokenizer_dir, max_src_len=max_len,
                            max_tgt_len=max_len, vocab_size=vocab_size, max_test=max_test, whole_test=not debug)
    if dataset is None:
        freedict.check_source(source_path)
    builder, tokenizer_dir = open_builder(data_dir, dataset, freedict.FreedictEngDeu, config or "sentences",
                                          source_path=source_path)
    return load_seq2seq(builder, "en", "de", tokenizer_dir=tokenizer_dir, max_src_len=max_len,
                        max_tgt_len=max_len, vocab_size=vocab_size, max_test=max_test)


def load_summarization(*, data_dir: str, dataset: str | None, debug: bool, max_src_len: int, max_tgt_len: int,
                       vocab_size: int, max_test: int | None = None,
                       stdlib_dir: str = docstrings.STDLIB_DIR) -> Seq2SeqData:
    """Document->summary pairs, preparing the embedded data set if needed: Python functions of
    the standard library in `stdlib_dir` -> their docstring summaries (the `debug` config if
    `debug`) when `dataset` is None, else a public TFDS summarization set whose supervised keys
    are (document, summary), e.g. cnn_dailymail, prepared in `data_dir` (DataError otherwise).
    Documents are cut to `max_src_len` tokens with eos, keeping their start; training pairs
    whose summary does not fit `max_tgt_len` tokens with eos are dropped."""
    if dataset is None:
        docstrings.check_source(stdlib_dir)
    builder, tokenizer_dir = open_builder(data_dir, dataset, docstrings.PythonDocstrings,
                                          "debug" if debug else "functions", stdlib_dir=stdlib_dir)
    keys = builder.info.supervised_keys
    if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
        raise DataError(f"TFDS dataset {builder.name!r} has no (document, summary) supervised "
                        "keys: pass a summarization data set such as cnn_dailymail to --dataset")
    return load_seq2seq(builder, *keys, tokenizer_dir=tokenizer_dir, max_src_len=max_src_len,
                        max_tgt_len=max_tgt_len, vocab_size=vocab_size, max_test=max_test, truncate_sources=True)
