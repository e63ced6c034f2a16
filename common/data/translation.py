"""English->German translation data as padded id arrays, identical in every process."""
import dataclasses
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from common.data.freedict import DEFAULT_SOURCE, FreedictEngDeu, check_source
from common.data.subword import SubwordTokenizer
from common.data.tfds_io import load_prepared, prepare_embedded


@dataclasses.dataclass(frozen=True)
class TranslationData:
    """Train and test data; rows of every array end with eos and are padded with 0."""

    train_src: np.ndarray  # int32 [n, max_len]: source ids, eos
    train_tgt: np.ndarray  # int32 [n, max_len + 1]: bos, target ids, eos
    test_src: np.ndarray  # int32 [m, max_len]: source ids (truncated), eos
    test_src_text: list[str]
    test_tgt_text: list[str]
    tokenizer: SubwordTokenizer


def _open_builder(data_dir: str, dataset: str | None, debug: bool, source_path: str):
    """The prepared builder and a name for its tokenizer folder."""
    if dataset is not None:
        return load_prepared(dataset, data_dir), dataset.replace("/", "_")
    check_source(source_path)
    config = "debug" if debug else "sentences"
    builder = prepare_embedded(FreedictEngDeu, data_dir, config=config,
                               source_path=source_path)
    return builder, f"{builder.name}_{config}"


def _batches(builder, split: str):
    """Batches of serialized-feature dicts of `split`, in the stored order.

    TFRecord shards are parsed here a batch at a time: TFDS decodes one example at a
    time, which takes about 15 s for the 270k pairs of the `sentences` config.
    """
    if builder.info.file_format != tfds.core.file_adapters.FileFormat.TFRECORD:
        yield from tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False).batch(8192))
        return
    files = [instruction.filename for instruction in builder.info.splits[split].file_instructions]
    spec = {key: tf.io.FixedLenFeature([], tf.string) for key in ("en", "de")}
    records = tf.data.TFRecordDataset(files).batch(8192)
    yield from tfds.as_numpy(records.map(lambda batch: tf.io.parse_example(batch, spec)))


def _read_split(builder, split: str) -> tuple[list[str], list[str]]:
    """English and German texts of `split`, in the same order in every process."""
    english, german = [], []
    for batch in _batches(builder, split):
        english.extend(text.decode("utf-8") for text in batch["en"])
        german.extend(text.decode("utf-8") for text in batch["de"])
    return english, german


def _interleaved(english: list[str], german: list[str]):
    for pair in zip(english, german):
        yield from pair


def _padded(rows: list[list[int]], width: int) -> np.ndarray:
    array = np.zeros((len(rows), width), np.int32)
    for index, row in enumerate(rows):
        array[index, :len(row)] = row
    return array


def _train_arrays(tokenizer: SubwordTokenizer, english: list[str], german: list[str],
                  max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Source and target arrays, dropping pairs with a side longer than max_len with eos."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    sources, targets = [], []
    for source, target in zip(tokenizer.encode(english), tokenizer.encode(german)):
        if len(source) < max_len and len(target) < max_len:
            sources.append(source + [eos])
            targets.append([bos] + target + [eos])
    return _padded(sources, max_len), _padded(targets, max_len + 1)


def load_translation(*, data_dir: str, dataset: str | None, debug: bool, max_len: int,
                     vocab_size: int, source_path: str = DEFAULT_SOURCE,
                     max_test: int | None = None) -> TranslationData:
    """Loads English->German pairs, preparing the embedded data set if needed.

    `dataset=None` selects the FreeDict dictionary (its `debug` config if `debug`);
    otherwise `dataset` names a public TFDS translation data set with `en` and `de`
    features, which must already be prepared in `data_dir` (DataError otherwise).
    The subword vocabulary is trained on the train split only.
    """
    builder, name = _open_builder(data_dir, dataset, debug, source_path)
    train_en, train_de = _read_split(builder, "train")
    test_en, test_de = (texts[:max_test] for texts in _read_split(builder, "test"))
    tokenizer = SubwordTokenizer.train_or_load(
        lambda: _interleaved(train_en, train_de),
        os.path.join(data_dir, "subword", name), vocab_size)
    train_src, train_tgt = _train_arrays(tokenizer, train_en, train_de, max_len)
    test_ids = [ids[:max_len - 1] + [tokenizer.eos_id] for ids in tokenizer.encode(test_en)]
    return TranslationData(train_src=train_src, train_tgt=train_tgt,
                           test_src=_padded(test_ids, max_len),
                           test_src_text=test_en, test_tgt_text=test_de, tokenizer=tokenizer)
