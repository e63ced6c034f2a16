"""The King James Bible (`common.data.kjv`) as a TFDS builder, one example per chapter (its
verses joined by spaces), split by book; and the rows of subword ids a language model trains on.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from common.data.kjv import DEFAULT_SOURCE, HELD_OUT_BOOKS, check_source, read_verses, split_chapters
from common.data.subword import SubwordTokenizer
from common.data.tfds_io import prepare_embedded

class KingJamesBible(tfds.core.GeneratorBasedBuilder):
    """The King James Bible by chapter, split by book (module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Chapters of Debian's bible-kjv-text; held-out books are the test split."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="books", description=f"Every chapter; test split: {', '.join(HELD_OUT_BOOKS)}."),
        tfds.core.BuilderConfig(name="debug", description="Genesis to train on; Ruth and Jonah held out."),
    ]
    DEFAULT_CONFIG_NAME = "books"

    def __init__(self, *, source_path: str = DEFAULT_SOURCE, **kwargs):
        self._source_path = source_path
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="The King James Version (1611) of the Bible, one example per chapter.",
            features=tfds.features.FeaturesDict({"book": tfds.features.Text(), "text": tfds.features.Text(),
                                                 "chapter": tfds.features.Scalar(np.int32)}),
            homepage="https://packages.debian.org/bible-kjv-text",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is read from the local Debian package.
        check_source(self._source_path)
        return {split: self._generate_examples(items)
                for split, items in split_chapters(read_verses(self._source_path), self.builder_config.name == "debug").items()}

    def _generate_examples(self, items):
        for number, (book, chapter, text) in enumerate(items):
            yield number, {"book": book, "chapter": chapter, "text": text}


# ------------------------------------------------------------------ token chunks for a language model
# Chapters are cut into pieces of this many words to train the subword model: sentencepiece
# silently skips lines longer than 4192 bytes (a long chapter).
TOKENIZER_PIECE_WORDS = 100


@dataclasses.dataclass(frozen=True)
class LanguageModelData:
    """Rows of seq_len + 1 consecutive ids of each split's stream (every chapter's ids, then
    eos), the next row starting at the last id of the one before: a model reads a row's first
    seq_len ids and predicts its last seq_len. The same arrays in every process."""

    train: np.ndarray  # int32 [n, seq_len + 1]
    test: np.ndarray  # int32 [m, seq_len + 1]
    test_texts: list[str]  # the held-out chapters, as "Book chapter: text"
    tokenizer: SubwordTokenizer


def stream(tokenizer: SubwordTokenizer, texts: list[str]) -> np.ndarray:
    """The ids of `texts`, each followed by eos, end to end."""
    return np.array([i for ids in tokenizer.encode(texts) for i in ids + [tokenizer.eos_id]], np.int32)


def chunk(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Rows of seq_len + 1 ids of `ids`, each overlapping the next by one id (the rest dropped)."""
    rows = (len(ids) - 1) // seq_len
    return np.stack([ids[r * seq_len:r * seq_len + seq_len + 1] for r in range(rows)]) if rows else \
        np.zeros((0, seq_len + 1), np.int32)


def word_pieces(texts: list[str], words: int = TOKENIZER_PIECE_WORDS):
    for text in texts:
        split = text.split()
        for start in range(0, len(split), words):
            yield " ".join(split[start:start + words])


def read_chapters(builder, split: str) -> list[tuple[str, str]]:
    """(book and chapter, text) of `split`, in the stored order."""
    examples = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    return [(f"{e['book'].decode()} {e['chapter']}", e["text"].decode("utf-8")) for e in examples]


def load_language_model(*, data_dir: str, debug: bool, seq_len: int, vocab_size: int,
                        source_path: str = DEFAULT_SOURCE) -> LanguageModelData:
    """The King James Bible (its `debug` config if `debug`) as rows of ids, preparing the
    embedded builder in `data_dir` if needed; the subword model is learned on the train split."""
    check_source(source_path)
    config = "debug" if debug else "books"
    builder = prepare_embedded(KingJamesBible, data_dir, config=config, source_path=source_path)
    train, test = read_chapters(builder, "train"), read_chapters(builder, "test")
    train_texts = [text for _, text in train]
    tokenizer = SubwordTokenizer.train_or_load(lambda: word_pieces(train_texts),
                                               os.path.join(data_dir, "subword", f"{builder.name}_{config}"),
                                               vocab_size)
    return LanguageModelData(train=chunk(stream(tokenizer, train_texts), seq_len),
                             test=chunk(stream(tokenizer, [text for _, text in test]), seq_len),
                             test_texts=[f"{name}: {text}" for name, text in test], tokenizer=tokenizer)
