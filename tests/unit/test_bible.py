"""The Bible corpus, read from the installed SWORD modules with diatheke, and beam search."""
import re
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from common.data import bible
from common.data.tfds_io import DataError
from common.models.beam import beam_decode
from common.models.transformer import greedy_decode
from tests.unit.one_process import ALONE


@pytest.fixture(scope="module")
def verses():
    return bible.aligned_verses()


STRONGS = re.compile(r"\s*<[GH]\d+>")  # Strong's numbers, in the Spanish module's plain form


def one_verse(module: str, key: str) -> str:
    """A verse as diatheke prints it alone, in plain form, without its key and module lines."""
    output = subprocess.run(["diatheke", "-b", module, "-f", "plain", "-k", key],
                            capture_output=True, text=True, check=True).stdout
    return " ".join(output.rsplit("\n(", 1)[0].split(": ", 1)[1].split())


def test_the_whole_bible_read_at_once_holds_each_verse_as_diatheke_gives_it_alone(verses):
    assert len(verses) > 30_000
    by_key = {key: (english, spanish) for key, english, spanish in verses}
    assert by_key["John 3:16"][1] == one_verse(bible.SPANISH, "John 3:16")
    picked = [verses[index] for index in np.random.default_rng(0).choice(len(verses), 12, replace=False)]
    for key, english, spanish in picked:
        # The plain form runs words together where a footnote was cut out; the OSIS form does not.
        assert spanish.replace(" ", "") == STRONGS.sub("", one_verse(bible.SPANISH, key)).replace(" ", ""), key
        assert english.replace(" ", "") == one_verse(bible.ENGLISH, key).replace(" ", ""), key


def test_a_word_outside_the_word_elements_stays_apart_from_them(verses):
    by_key = {key: (english, spanish) for key, english, spanish in verses}
    assert "his only born Son, that" in by_key["John 3:16"][0]  # "bornSon" in both forms' text
    assert "hay allí también bdelio y" in by_key["Genesis 2:12"][1]
    glued = re.compile(r"[a-záéíóúñ][A-ZÁÉÍÓÚ]")  # a capital inside a word: names run into a word
    assert not [verse for verse in verses if glued.search(verse[1] + " " + verse[2])]


def test_the_texts_keep_no_markup_and_no_appendix(verses):
    assert not [verse for verse in verses if "<" in verse[1] + verse[2] or ">" in verse[1] + verse[2]]
    last = verses[-1]
    assert last[0] == "Revelation of John 22:21" and last[1].endswith("Amen.")  # the glossary is cut off
    assert dict((key, english) for key, english, _ in verses)["Genesis 1:1"] == \
        "In the beginning, God created the heavens and the earth."  # "Godcreated" in the plain form


def test_a_title_before_the_key_is_not_part_of_the_verse():
    line = ('A Psalm by David, when he fled from Absalom his son.  Psalms 3:1: Yahweh, how <w>my</w> adversaries '
            'increased!<milestone type="line"/>\nALEPH  Psalms 119:1: <w lemma="G1">Blessed</w><w>are</w> they.')
    assert bible.parse_osis(line) == {"Psalms 3:1": "Yahweh, how my adversaries increased!",
                                      "Psalms 119:1": "Blessed are they."}


def test_held_out_verses_share_no_chapter_and_no_text_with_training(verses):
    splits = bible.verse_splits(verses)
    assert 400 < len(splits["test"]) < 700
    train_chapters = {bible.chapter(key) for key, _, _ in splits["train"]}
    assert not {bible.chapter(key) for key, _, _ in splits["test"]} & train_chapters
    assert not {english for _, english, _ in splits["test"]} & {english for _, english, _ in splits["train"]}
    assert bible.verse_splits(verses) == splits  # the same split on every run and machine


def test_a_missing_program_or_module_names_the_packages(monkeypatch, tmp_path):
    with pytest.raises(DataError, match=r"SWORD module nosuchBible not installed \(apt-get install diatheke "
                                        r"sword-text-web sword-text-sparv\)"):
        bible.check_tools(bible.ENGLISH, "nosuchBible")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match=r"diatheke not found on PATH.*apt-get install diatheke"):
        bible.check_tools(bible.ENGLISH)


# ------------------------------------------------------------------------ beam search
# A model of three tokens and eos whose next-token scores depend on the last token only:
# from bos, token 4 is likelier than 5, but 4 leads to a flat choice and 5 to a sure eos, so
# the likeliest whole sequence (5, eos: 0.4) is not the greedy one (4, then 0.25 at best).
BOS, EOS = 2, 3
NEXT = np.log(np.array([
    [1e-9, 1e-9, 1e-9, 1e-9, 0.6, 0.4],   # after pad (unused)
    [1e-9, 1e-9, 1e-9, 1e-9, 0.6, 0.4],   # after unk (unused)
    [1e-9, 1e-9, 1e-9, 1e-9, 0.6, 0.4],   # after bos
    [1e-9, 1e-9, 1e-9, 0.97, 0.01, 0.02],  # after eos
    [1e-9, 1e-9, 1e-9, 0.25, 0.4, 0.35],  # after 4
    [1e-9, 1e-9, 1e-9, 0.98, 0.01, 0.01],  # after 5
]), dtype=np.float32)


def markov_forward(batch, head):
    _, tokens = batch
    return head(tf.gather(tf.constant(NEXT), tokens[:, :-1]))


def test_beam_search_finds_the_likelier_sequence_that_greedy_misses():
    source = np.ones((2, 3), np.int32)
    assert greedy_decode(markov_forward, ALONE, source, 4, BOS, EOS) == [[4, 4, 4, 4]] * 2
    assert beam_decode(markov_forward, ALONE, source, 4, BOS, EOS, beam=2, alpha=0.0) == [[5]] * 2


def test_a_length_penalty_favours_longer_sequences():
    # (5, eos): log(0.4 * 0.98) = -0.94 over ((5 + 2) / 6) ** 4 = 1.85 is -0.51; (4, 4, 5, eos):
    # log(0.6 * 0.4 * 0.35 * 0.98) = -2.50 over (9 / 6) ** 4 = 5.06 is -0.49, the best of length 4.
    source = np.ones((1, 3), np.int32)
    assert beam_decode(markov_forward, ALONE, source, 4, BOS, EOS, beam=3, alpha=2.0) == [[5]]
    assert beam_decode(markov_forward, ALONE, source, 4, BOS, EOS, beam=3, alpha=4.0) == [[4, 4, 5]]
