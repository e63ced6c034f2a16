"""Verse-aligned Bible translations from Debian's SWORD modules, as a TFDS builder.

The World English Bible (sword-text-web, module engWEB2015eb) and the Reina-Valera 1909
(sword-text-sparv, spaRV1909eb) are read with `diatheke`, one call per module for the whole
Bible (a range key; one call a verse would take hours), in OSIS form: its `<w>` word
elements keep words apart where a footnote was cut out of the text, which the plain form
runs together ("Godcreated"); a word left outside the elements is spaced from them too.
Verses are aligned by their key ("John 3:16"); only verses present and non-empty in both
modules are kept (the English module carries the deuterocanon, the Spanish one does not).

The held-out split is a hash of the chapter ("John 3"), not of the verse: neighbouring
verses of a chapter repeat names and phrases, so a test verse's own chapter is never seen
in training. Parallel passages in other books (Kings and Chronicles, the first three
gospels) still are, as in any split of this text.
"""
from __future__ import annotations

import hashlib
import html
import re
import shutil
import subprocess

import tensorflow_datasets as tfds

from common.data.tfds_io import DataError

ENGLISH, SPANISH = "engWEB2015eb", "spaRV1909eb"
WHOLE_BIBLE = "Gen 1:1-Rev 22:21"
INSTALL = "apt-get install diatheke sword-text-web sword-text-sparv"
TEST_PER_MILLE = 20
# Word-count ratios (target/source) outside this range mark verses the two versifications
# number differently (a verse against its neighbour, or a psalm title within verse 1).
MIN_RATIO, MAX_RATIO = 0.5, 2.0
DEBUG_TRAIN, DEBUG_TEST, DEBUG_MAX_WORDS = 400, 64, 8  # short verses, as --debug's max_len is short
DEBUG_TEST_PER_MILLE = 300

_KEY = re.compile(r"(?:^|(?<=\s\s))((?:I{1,3} )?[A-Z][a-z]+(?: [A-Za-z()]+)*? \d+:\d+): ")
_WORD_GAP = re.compile(r"</w>\s*<w")
# A word the module left outside the elements touches them: "<w>hay allí</w>también<w>bdelio</w>".
_WORD_AFTER, _WORD_BEFORE = re.compile(r"</w>(?=\w)"), re.compile(r"(?<=\w)<w\b")
_TAG = re.compile(r"<[^<>]*>")
# A run of 4+ spaces ends the verse: the WEB's last verse is followed by its glossary.
_TRAILER = re.compile(r"\s{4,}.*$")
_SPACES = re.compile(r"\s+")


def check_tools(*modules: str) -> None:
    """Raises DataError unless `diatheke` is on PATH and knows every module in `modules`;
    costs one short diatheke call."""
    if shutil.which("diatheke") is None:
        raise DataError(f"diatheke not found on PATH: the Bible corpus is read with it ({INSTALL})")
    listing = _diatheke("system", "modulelist")
    installed = {line.split(" : ")[0].strip() for line in listing.splitlines() if " : " in line}
    missing = [module for module in modules if module not in installed]
    if missing:
        raise DataError(f"SWORD module {', '.join(missing)} not installed ({INSTALL})")


def _diatheke(module: str, key: str, output_format: str = "plain") -> str:
    result = subprocess.run(["diatheke", "-b", module, "-f", output_format, "-k", key],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DataError(f"diatheke -b {module} failed ({result.stderr.strip()[:200]}): reinstall it ({INSTALL})")
    return result.stdout


def clean_verse(osis: str) -> str:
    """The text of one verse's OSIS markup: words kept apart, tags and Strong's numbers
    dropped, entities decoded, spaces tidied."""
    spaced = _WORD_BEFORE.sub(" <w", _WORD_AFTER.sub("</w> ", _WORD_GAP.sub("</w> <w", osis)))
    text = _TAG.sub("", spaced)
    return _SPACES.sub(" ", _TRAILER.sub("", html.unescape(text))).strip()


def parse_osis(output: str) -> dict[str, str]:
    """{verse key: text} of diatheke's OSIS output, one verse a line. A section title may
    precede the key on its line, two spaces before it (diatheke repeats a psalm's title on
    the lines after it), so the key is the first `<book> C:V: ` at the start of the line or
    after two spaces."""
    verses = {}
    for line in output.splitlines():
        match = _KEY.search(line)
        if match:
            text = clean_verse(line[match.end():])
            if text:
                verses[match.group(1)] = text
    return verses


def read_module(module: str) -> dict[str, str]:
    """{verse key: text} of a whole SWORD Bible module, in canonical order."""
    return parse_osis(_diatheke(module, WHOLE_BIBLE, "OSIS"))


def aligned_verses(source: str = ENGLISH, target: str = SPANISH) -> list[tuple[str, str, str]]:
    """(key, source text, target text) of every verse both modules hold, in the source's
    order, unless their lengths differ too much to be one verse's translations."""
    check_tools(source, target)
    source_verses, target_verses = read_module(source), read_module(target)
    return [(key, text, target_verses[key]) for key, text in source_verses.items()
            if key in target_verses and _similar_length(text, target_verses[key])]


def _similar_length(source: str, target: str) -> bool:
    return MIN_RATIO <= len(target.split()) / len(source.split()) <= MAX_RATIO


def chapter(key: str) -> str:
    """"John 3" of "John 3:16"."""
    return key.rsplit(":", 1)[0]


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def is_test(key: str, per_mille: int = TEST_PER_MILLE) -> bool:
    """Stable split assignment by chapter: a chapter's verses all land in the same split."""
    return _hash(chapter(key)) % 1000 < per_mille


def verse_splits(verses: list[tuple[str, str, str]], per_mille: int = TEST_PER_MILLE) -> dict[str, list]:
    """{"train": verses, "test": verses} by chapter. A held-out verse whose English text is
    also a training verse's ("Yahweh's word came to me, saying,") is dropped: it is not unseen."""
    splits = {"train": [], "test": []}
    for verse in verses:
        splits["test" if is_test(verse[0], per_mille) else "train"].append(verse)
    seen = {verse[1] for verse in splits["train"]}
    splits["test"] = [verse for verse in splits["test"] if verse[1] not in seen]
    return splits


def debug_splits(verses: list[tuple[str, str, str]]) -> dict[str, list[tuple[str, str, str]]]:
    """A small fixed sample of the short verses, spread over the whole Bible by ordering on
    the verse key's hash; more chapters are held out, as few short verses are."""
    short = [verse for verse in verses if len(verse[1].split()) <= DEBUG_MAX_WORDS]
    sizes = {"train": DEBUG_TRAIN, "test": DEBUG_TEST}
    return {split: sorted(chosen, key=lambda verse: _hash(verse[0]))[:sizes[split]]
            for split, chosen in verse_splits(short, DEBUG_TEST_PER_MILLE).items()}


class BibleVerses(tfds.core.GeneratorBasedBuilder):
    """Verse-aligned pairs of two SWORD Bible modules, English->Spanish by default."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "WEB 2015 (engWEB2015eb) -> Reina-Valera 1909 (spaRV1909eb), split by chapter.",
                     "1.1.0": "Words outside the modules' word elements kept apart (381 verses had words glued)."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="verses", description="Every verse both modules hold."),
        tfds.core.BuilderConfig(name="debug", description=f"{DEBUG_TRAIN} train and {DEBUG_TEST} test verses of "
                                                          f"at most {DEBUG_MAX_WORDS} English words."),
    ]
    DEFAULT_CONFIG_NAME = "verses"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {"key": tfds.features.Text(), "en": tfds.features.Text(), "es": tfds.features.Text()}),
            supervised_keys=("en", "es"),
            homepage="https://www.crosswire.org/sword/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is read from the installed SWORD modules.
        select = debug_splits if self.builder_config.name == "debug" else verse_splits
        return {split: self._generate_examples(verses) for split, verses in select(aligned_verses()).items()}

    def _generate_examples(self, verses):
        for number, (key, english, spanish) in enumerate(verses):
            yield number, {"key": key, "en": english, "es": spanish}
