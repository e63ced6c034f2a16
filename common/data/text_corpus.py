"""Running English text for language modelling: the King James Bible, as a TFDS builder.

Debian's `bible-kjv-text` ships the text as one file (`/usr/lib/bible.data`) in the format of
the `bible` reader of `bible-kjv`: a header, the number of windows and their offsets, then
each 64 KiB window of the text as its own Unix `compress` (LZW) stream, so a reader can
decompress any window alone. `read_verses` decodes it here, in Python, so the reader program
is not needed. The text is one verse per line, `Ge1:1 In the beginning ...`.

An example is one chapter (its verses joined by spaces). The split is by book: the books of
HELD_OUT_BOOKS (narrative, wisdom, prophecy, gospel and epistles, about 4% of the verses)
are the test split, so held-out text is unseen in training, not a neighbour of it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import struct

import numpy as np
import tensorflow_datasets as tfds

from common.data.subword import SubwordTokenizer
from common.data.tfds_io import DataError, prepare_embedded

DEFAULT_SOURCE = "/usr/lib/bible.data"
MAGIC = b"EC02"
HELD_OUT_BOOKS = ("Ruth", "Eccl", "Jonah", "Mark", "Phi", "Jas")
DEBUG_BOOKS = {"train": ("Ge",), "test": ("Ruth", "Jonah")}

_HEADER = struct.Struct(">III")  # format version, window size, number of windows (at WINDOWS_AT)
WINDOWS_AT = 0x50
_CLEAR = 256  # compress's "block mode" code: start a new dictionary
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def check_source(path: str) -> None:
    """Raises DataError unless `path` is the bible-kjv-text data file; costs a stat and a read of 4 bytes."""
    if not os.path.isfile(path):
        raise DataError(f"King James Bible text not found at {path}: install the Debian package bible-kjv-text "
                        "(apt-get install bible-kjv-text) or run scripts/setup.sh")
    with open(path, "rb") as handle:
        if handle.read(len(MAGIC)) != MAGIC:
            raise DataError(f"{path} is not a bible-kjv-text data file: reinstall it "
                            "(apt-get install --reinstall bible-kjv-text)")


def uncompress(stream: bytes, max_bits: int = 16) -> bytes:
    """Decode one Unix `compress` stream without its 3-byte header (block mode, codes of 9 to
    `max_bits` bits, least significant bit first). Like compress, a change of code width skips
    to the end of the current group of 8 codes, which compress writes whole."""
    total, padded = 8 * len(stream), stream + b"\0\0"
    table = [bytes([i]) for i in range(256)] + [b""]
    out, previous = bytearray(), None
    position, group_start, width = 0, 0, 9
    while position + width <= total:
        # A code of at most 16 bits, starting at any bit of its first byte, lies within 3 bytes.
        start = position >> 3
        code = (int.from_bytes(padded[start:start + 3], "little") >> (position & 7)) & ((1 << width) - 1)
        position += width
        if code == _CLEAR:
            del table[_CLEAR + 1:]
            previous = None
            position += (group_start - position) % (8 * width)
            group_start, width = position, 9
            continue
        if previous is None:
            entry = table[code]
        else:
            entry = table[code] if code < len(table) else previous + previous[:1]
            table.append(previous + entry[:1])
        out += entry
        previous = entry
        if len(table) >= 1 << width and width < max_bits:
            position += (group_start - position) % (8 * width)
            group_start, width = position, width + 1
    return bytes(out)


def read_text(path: str) -> str:
    """The whole text of the data file (its first line is a title)."""
    with open(path, "rb") as handle:
        data = handle.read()
    _, _, windows = _HEADER.unpack_from(data, WINDOWS_AT)
    offsets = struct.unpack_from(f">{windows + 1}I", data, WINDOWS_AT + _HEADER.size)
    return b"".join(uncompress(data[start:end]) for start, end in zip(offsets, offsets[1:])).decode("ascii")


def read_verses(path: str) -> list[tuple[str, int, int, str]]:
    """(book abbreviation, chapter, verse, text) of every verse, in the order of the Bible."""
    verses = []
    for line in read_text(path).splitlines()[1:]:
        match = _VERSE.match(line)
        if match is None:
            raise DataError(f"{path}: unexpected line {line[:60]!r}: reinstall bible-kjv-text")
        book, chapter, verse, text = match.groups()
        verses.append((book, int(chapter), int(verse), text))
    return verses


def chapters(verses) -> list[tuple[str, int, str]]:
    """(book, chapter, the chapter's verses joined by spaces), in order."""
    grouped: dict[tuple[str, int], list[str]] = {}
    for book, chapter, _, text in verses:
        grouped.setdefault((book, chapter), []).append(text)
    return [(book, chapter, " ".join(texts)) for (book, chapter), texts in grouped.items()]


def split_chapters(verses, debug: bool) -> dict[str, list[tuple[str, int, str]]]:
    """The chapters of `verses` in each split: the held-out books are `test` (DEBUG_BOOKS under `debug`)."""
    all_chapters = chapters(verses)
    if debug:
        return {split: [c for c in all_chapters if c[0] in books] for split, books in DEBUG_BOOKS.items()}
    return {"train": [c for c in all_chapters if c[0] not in HELD_OUT_BOOKS],
            "test": [c for c in all_chapters if c[0] in HELD_OUT_BOOKS]}


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
