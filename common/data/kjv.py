"""The King James Bible from Debian's `bible-kjv-text`, read in pure Python (no TensorFlow, so
a recipe checks for it before TensorFlow loads).

The package ships the text as one file (`/usr/lib/bible.data`) in the format of the `bible`
reader of `bible-kjv`: a header, the number of windows and their offsets, then each 64 KiB
window of the text as its own Unix `compress` (LZW) stream, so a reader can decompress any
window alone. `read_verses` decodes it here, so the reader program is not needed. The text is
one verse per line, `Ge1:1 In the beginning ...`. The split is by book: the books of
HELD_OUT_BOOKS (narrative, wisdom, prophecy, gospel and epistles, about 4% of the verses) are
the test split, so held-out text is unseen in training, not a neighbour of it.
"""
from __future__ import annotations

import os
import re
import struct

from common.errors import RecipeError

DEFAULT_SOURCE = "/usr/lib/bible.data"
MAGIC = b"EC02"
HELD_OUT_BOOKS = ("Ruth", "Eccl", "Jonah", "Mark", "Phi", "Jas")
DEBUG_BOOKS = {"train": ("Ge",), "test": ("Ruth", "Jonah")}

_HEADER = struct.Struct(">III")  # format version, window size, number of windows (at WINDOWS_AT)
WINDOWS_AT = 0x50
_CLEAR = 256  # compress's "block mode" code: start a new dictionary
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def check_source(path: str) -> None:
    """Raises RecipeError unless `path` is the bible-kjv-text data file; costs a stat and a read of 4 bytes."""
    if not os.path.isfile(path):
        raise RecipeError(f"King James Bible text not found at {path}: install the Debian package bible-kjv-text "
                        "(apt-get install bible-kjv-text) or run scripts/setup.sh")
    with open(path, "rb") as handle:
        if handle.read(len(MAGIC)) != MAGIC:
            raise RecipeError(f"{path} is not a bible-kjv-text data file: reinstall it "
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
            raise RecipeError(f"{path}: unexpected line {line[:60]!r}: reinstall bible-kjv-text")
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
