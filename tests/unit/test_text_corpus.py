"""The King James Bible reader (Debian bible-kjv-text), the language model's rows of ids and
the n-gram baselines."""
import numpy as np
import pytest

from common.data import kjv, text_corpus
from common.errors import RecipeError
from common.models.ngram import bigram_perplexity, unigram_perplexity


@pytest.fixture(scope="module")
def verses():
    return kjv.read_verses(kjv.DEFAULT_SOURCE)


def test_the_whole_text_decodes_verse_by_verse(verses):
    assert len(verses) == 31102
    assert len({book for book, *_ in verses}) == 66
    assert verses[0] == ("Ge", 1, 1, "In the beginning God created the heaven and the earth.")
    assert verses[-1] == ("Rev", 22, 21, "The grace of our Lord Jesus Christ be with you all. Amen.")
    # A verse that straddles two 64 KiB compression windows comes out whole.
    assert ("Ge", 20, 6, "And God said unto him in a dream, Yea, I know that thou didst this in the integrity "
            "of thy heart; for I also withheld thee from sinning against me: therefore suffered I thee not to "
            "touch her.") in verses


def test_held_out_books_are_never_trained_on(verses):
    splits = kjv.split_chapters(verses, debug=False)
    assert {book for book, _, _ in splits["test"]} == set(kjv.HELD_OUT_BOOKS)
    assert not {book for book, _, _ in splits["train"]} & set(kjv.HELD_OUT_BOOKS)
    assert len(splits["train"]) + len(splits["test"]) == 1189  # every chapter once
    jonah = [text for book, _, text in splits["test"] if book == "Jonah"]
    assert len(jonah) == 4 and jonah[0].startswith("Now the word of the LORD came unto Jonah the son of Amittai")


@pytest.mark.parametrize("make_bad", [lambda tmp: tmp / "missing.data",
                                      lambda tmp: (tmp / "other.data").write_bytes(b"not it") and tmp / "other.data"],
                         ids=["missing", "not-the-format"])
def test_a_missing_or_foreign_file_names_the_package(make_bad, tmp_path):
    with pytest.raises(RecipeError, match="apt-get install .*bible-kjv-text"):
        kjv.check_source(str(make_bad(tmp_path)))


class Letters:
    """A stand-in tokenizer: one id per character, eos 3."""
    eos_id = 3

    def encode(self, texts):
        return [[ord(c) - ord("a") + 4 for c in text] for text in texts]


def test_rows_follow_each_other_overlapping_by_one_id():
    ids = text_corpus.stream(Letters(), ["abc", "de"])
    assert list(ids) == [4, 5, 6, 3, 7, 8, 3]
    rows = text_corpus.chunk(ids, seq_len=3)
    assert rows.tolist() == [[4, 5, 6, 3], [3, 7, 8, 3]]
    assert text_corpus.chunk(ids[:3], seq_len=3).shape == (0, 4)


def test_long_chapters_reach_the_tokenizer_in_pieces():
    pieces = list(text_corpus.word_pieces(["w " * 250, "short text"], words=100))
    assert [len(p.split()) for p in pieces] == [100, 100, 50, 2]


TRAIN = np.array([[4, 5, 6, 4, 5, 7, 4, 5, 6, 8, 9]])


@pytest.mark.parametrize("perplexity", [unigram_perplexity, bigram_perplexity], ids=["unigram", "bigram"])
@pytest.mark.parametrize("context", [4, 6, 2], ids=["frequent-context", "rare-context", "unseen-context"])
def test_baseline_probabilities_sum_to_one(perplexity, context):
    vocab = 12
    # One scored token: the perplexity is one over its probability.
    probabilities = [1 / perplexity(TRAIN, np.array([[context, w]]), vocab) for w in range(1, vocab)]
    assert all(p > 0 for p in probabilities)
    # What is missing is id 0's share (padding, never scored), smoothed: above 0, below 1 / vocab.
    assert 1 - 1 / vocab < sum(probabilities) < 1


def test_the_bigram_baseline_knows_what_follows():
    test = np.array([[4, 5, 6, 4, 5, 6]])
    assert bigram_perplexity(TRAIN, test, 12) < unigram_perplexity(TRAIN, test, 12) / 2
