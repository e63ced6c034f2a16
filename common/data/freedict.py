"""English->German sentence pairs from the FreeDict (Ding) dictionary, as a TFDS builder.

The dictionary ships with Debian (dict-freedict-eng-deu), so the recipes can train a
translation model on machines without network. Pairs come from two places in each
dictd entry:

* the headword and the first alternative of its first German translation line;
* the example lines, `      "English text"  - German text`, which hold real phrases
  and sentences.

Pairs whose text contains `/` (spelling variants such as `tyre/tire`) are skipped
rather than guessed at. Pairs are deduplicated by lowercased English text, keeping
the first in dictionary order, and the test split is chosen by a hash of that same
text, so no English sentence is in both splits.
"""
import gzip
import hashlib
import os
import re

import tensorflow_datasets as tfds

from common.data.tfds_io import DataError

DEFAULT_SOURCE = "/usr/share/dictd/freedict-eng-deu.dict.dz"
TEST_PER_MILLE = 20
MIN_WORDS, MAX_WORDS = 3, 12  # two-word entries are mostly technical compounds
DEBUG_TRAIN, DEBUG_TEST = 3000, 200

_B64 = {char: value for value, char in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_IPA = re.compile(r"\s+/[^/]*/$")
_TAG = re.compile(r"<[^<>]{1,40}>|\[[^\[\]]{0,60}\]")
_EXAMPLE = re.compile(r'^ {6}"(.+)"\s+- (.+)$', re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.?!]),\s+")
_SPACES = re.compile(r"\s+")


def check_source(path: str) -> None:
    """Raises DataError unless the dictionary and its index exist; costs two stat calls."""
    for needed in (path, index_path(path)):
        if not os.path.isfile(needed):
            raise DataError(
                f"FreeDict English-German dictionary not found at {needed}: install the "
                "Debian package dict-freedict-eng-deu (apt-get install "
                "dict-freedict-eng-deu) or run scripts/setup.sh")


def index_path(path: str) -> str:
    """The dictd index next to `path` (`x.dict.dz` -> `x.index`)."""
    return re.sub(r"\.dict(\.dz)?$", "", path) + ".index"


def _b64(text: str) -> int:
    """Decodes dictd's base-64 numbers (most significant digit first, no padding)."""
    value = 0
    for char in text:
        value = value * 64 + _B64[char]
    return value


def read_entries(path: str) -> list[str]:
    """Returns the dictionary entries in file order, without the 00-database headers.

    The index gives each entry's byte range; several headwords may share one range.
    """
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ranges = {}
    with open(index_path(path), encoding="utf-8") as index:
        for line in index.read().splitlines():
            key, offset, length = line.split("\t")
            if not key.startswith("00database"):
                ranges[_b64(offset)] = _b64(length)
    return [data[start:start + ranges[start]].decode("utf-8") for start in sorted(ranges)]


def _clean(text: str) -> str:
    """Drops grammar tags (`<masc>`, `<v, trans>`) and labels (`[coll.]`), tidies spaces."""
    if "<" in text or "[" in text:
        text = _SPACES.sub(" ", _TAG.sub(" ", text)).replace(" ,", ",").replace(" .", ".")
    return text.strip()


def _first_alternative(text: str, is_sentence: bool) -> str:
    """First of the comma-separated alternatives. Alternatives that are sentences are
    split only after sentence-final punctuation, as sentences may hold commas; a pair
    counts as a sentence when its English side is capitalised and punctuated (so that
    phrases ending in `sth.` do not)."""
    if is_sentence:
        return _SENTENCE_END.split(text)[0]
    return text.split(", ")[0]


def _pair(english: str, german: str) -> tuple[str, str] | None:
    """Pair of first alternatives, or None where either side is empty or has a `/`."""
    if "/" in english or "/" in german:
        return None
    is_sentence = english[:1].isupper() and english[-1:] in (".", "?", "!")
    english = _first_alternative(_clean(english), is_sentence).strip()
    german = _first_alternative(_clean(german), is_sentence).strip()
    return (english, german) if english and german else None


def entry_pairs(entry: str) -> list[tuple[str, str]]:
    """(English, German) pairs of one entry: headword first, then its examples."""
    headword, _, rest = entry.partition("\n")
    translation = rest.partition("\n")[0]
    pairs = []
    if translation and not translation.startswith(" "):
        pairs.append(_pair(_IPA.sub("", _clean(headword)), translation))
    if '\n      "' in rest:
        pairs.extend(_pair(*match.groups()) for match in _EXAMPLE.finditer(rest))
    return [pair for pair in pairs if pair]


def _hash(english: str) -> int:
    return int.from_bytes(hashlib.sha256(english.lower().encode()).digest()[:8], "big")


def is_test(english: str) -> bool:
    """Stable split assignment: the same English text always lands in the same split."""
    return _hash(english) % 1000 < TEST_PER_MILLE


def all_pairs(path: str) -> list[tuple[str, str]]:
    """Every pair of the dictionary, deduplicated by lowercased English, in file order."""
    seen, pairs = set(), []
    for entry in read_entries(path):
        for english, german in entry_pairs(entry):
            if english.lower() not in seen:
                seen.add(english.lower())
                pairs.append((english, german))
    return pairs


def sentence_pairs(path: str) -> dict[str, list[tuple[str, str]]]:
    """The `sentences` set: pairs with MIN_WORDS..MAX_WORDS English words, by split."""
    splits = {"train": [], "test": []}
    for english, german in all_pairs(path):
        if MIN_WORDS <= len(english.split()) <= MAX_WORDS:
            splits["test" if is_test(english) else "train"].append((english, german))
    return splits


def debug_pairs(path: str) -> dict[str, list[tuple[str, str]]]:
    """A small, fixed sample of the `sentences` set.

    Ordering by hash rather than taking the file's head spreads the sample over the
    whole dictionary (the file is sorted by German headword).
    """
    sizes = {"train": DEBUG_TRAIN, "test": DEBUG_TEST}
    return {split: sorted(pairs, key=lambda pair: _hash(pair[0]))[:sizes[split]]
            for split, pairs in sentence_pairs(path).items()}


class FreedictEngDeu(tfds.core.GeneratorBasedBuilder):
    """English->German pairs from the FreeDict dictionary installed by Debian."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Headword and example pairs of freedict-eng-deu 1.9-fd1.",
                     "1.1.0": "At least 3 English words (was 2): phrases and sentences, fewer compounds."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name="sentences",
            description=f"Pairs with {MIN_WORDS} to {MAX_WORDS} English words."),
        tfds.core.BuilderConfig(
            name="debug",
            description=f"{DEBUG_TRAIN} train and {DEBUG_TEST} test pairs of `sentences`."),
    ]
    DEFAULT_CONFIG_NAME = "sentences"

    def __init__(self, *, source_path: str = DEFAULT_SOURCE, **kwargs):
        self._source_path = source_path
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {"en": tfds.features.Text(), "de": tfds.features.Text()}),
            supervised_keys=("en", "de"),
            homepage="https://freedict.org/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is read from the local dictionary.
        check_source(self._source_path)
        select = debug_pairs if self.builder_config.name == "debug" else sentence_pairs
        return {split: self._generate_examples(pairs)
                for split, pairs in select(self._source_path).items()}

    def _generate_examples(self, pairs):
        for number, (english, german) in enumerate(pairs):
            yield number, {"en": english, "de": german}
