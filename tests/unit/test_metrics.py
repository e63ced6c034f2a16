"""Unit tests of the text-generation metrics on tiny cases with known scores."""
import pytest

from common.metrics import bleu, rouge

SENTENCES = ["the cat sat on the mat today", "a quick brown fox jumps over it"]
UNRELATED = ["seven green apples fell down slowly", "nobody answered those letters again"]


def test_identical_texts_score_100():
    assert bleu(SENTENCES, SENTENCES)["bleu"] == pytest.approx(100)
    assert rouge(SENTENCES, SENTENCES) == pytest.approx(
        {"rouge1": 100, "rouge2": 100, "rougeL": 100})


def test_disjoint_texts_score_0():
    assert bleu(UNRELATED, SENTENCES)["bleu"] == 0
    assert rouge(UNRELATED, SENTENCES) == {"rouge1": 0, "rouge2": 0, "rougeL": 0}


def test_rouge_is_the_mean_of_stemmed_lowercase_f_measures():
    # "The cats sat" vs "the cat sat down": 3 of 3 and 3 of 4 unigrams match after
    # stemming; 2 of 2 and 2 of 3 bigrams; the second pair shares nothing.
    scores = rouge(["The cats sat", "x"], ["the cat sat down", "y"])
    assert scores["rouge1"] == pytest.approx(100 * (6 / 7) / 2)
    assert scores["rouge2"] == pytest.approx(100 * (4 / 5) / 2)
    assert scores["rougeL"] == pytest.approx(scores["rouge1"])


def test_bleu_reports_its_settings():
    result = bleu(["the cat sat on a mat today"], ["the cat sat on the mat today"])
    assert 0 < result["bleu"] < 100
    assert result["bleu_detail"].startswith("BLEU = ")
    assert "tok:13a" in result["bleu_signature"] and "version:" in result["bleu_signature"]


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="one hypothesis per reference"):
        rouge(["a b c"], [])
    with pytest.raises(ValueError, match="one hypothesis per reference"):
        bleu([], [])
