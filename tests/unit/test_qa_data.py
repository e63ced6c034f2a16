"""Unit tests of the question-answering pieces: SQuAD v1.1 exact match and F1 on hand-worked
cases, the WordNet cloze set built from the installed WordNet files, the answer positions of
encoded rows, and the span search."""
import numpy as np
import pytest

from common.data import qa
from common.data.subword import SubwordTokenizer
from common.data.tfds_io import DataError
from common.metrics import answer_f1, normalize_answer, squad_scores
from common.models.span import best_spans


# ------------------------------------------------------------------ metrics
def test_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("  The Eiffel-Tower, in   PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # an article only as a whole word


def test_f1_counts_common_tokens_with_multiplicity():
    # "cat sat" against "cat sat down": 2 common tokens, precision 2/2, recall 2/3 -> F1 0.8.
    assert answer_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # "to to be" against "to be": common min(2,1) + 1 = 2, precision 2/3, recall 1 -> 0.8.
    assert answer_f1("to to be", "to be") == pytest.approx(0.8)
    assert answer_f1("dog", "cat") == 0.0
    assert answer_f1("the", "a") == 0.0  # both normalise to nothing


def test_squad_scores_take_the_best_reference_and_the_mean_over_questions():
    scores = squad_scores(["Denver Broncos", "in 1990", "blue"],
                          [["Broncos", "the Denver Broncos"], ["1990s", "1990"], ["red"]])
    # EM: 1 (matches "the Denver Broncos"), 0, 0. F1: 1; max(0, 2*(1/2*1)/(1/2+1)=2/3); 0.
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)


def test_squad_scores_reject_mismatched_lists():
    with pytest.raises(ValueError):
        squad_scores(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        squad_scores(["a"], [[]])


# ------------------------------------------------------------------ the WordNet cloze set
@pytest.fixture(scope="module")
def items():
    qa.check_source(qa.DEFAULT_WORDNET_DIR)
    return qa.read_items(qa.DEFAULT_WORDNET_DIR)


@pytest.fixture(scope="module")
def examples(items):
    return qa.split_examples(items, debug=False)


def test_a_missing_wordnet_names_the_package(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install wordnet-base"):
        qa.check_source(str(tmp_path))


def test_every_answer_is_the_exact_span_at_its_start_and_absent_from_its_question(examples):
    for rows in examples.values():
        for row in rows:
            (text,), (start,) = row["answers"]["text"], row["answers"]["answer_start"]
            assert row["context"][start:start + len(text)] == text
            assert row["context"][start + len(text)] == ":"
            assert qa.BLANK in row["question"]
            assert not qa.whole_word(text).search(row["question"].split('"')[1]), row


def test_held_out_passages_and_synsets_are_unseen_in_training(examples):
    train, test = examples["train"], examples["test"]
    assert len(train) > 20000 and len(test) > 1000
    assert not {row["id"] for row in train} & {row["id"] for row in test}
    assert not {row["context"] for row in train} & {row["context"] for row in test}


def test_each_passage_has_four_entries_with_different_headwords_and_one_question_each(examples):
    by_passage = {}
    for row in examples["test"]:
        by_passage.setdefault(row["context"], []).append(row["answers"]["text"][0].lower())
    assert {len(words) for words in by_passage.values()} == {qa.ENTRIES_PER_PASSAGE}
    assert all(len(set(words)) == len(words) for words in by_passage.values())


def test_the_debug_set_is_a_sample_of_the_full_one(items, examples):
    debug = qa.split_examples(items, debug=True)
    for split, size in (("train", qa.DEBUG_TRAIN), ("test", qa.DEBUG_TEST)):
        assert len(debug[split]) == size
        assert all(row in examples[split] for row in debug[split][:20])


def test_parse_synset_reads_a_wordnet_line():
    line = ("00101277 29 v 03 tone 0 tone_up 0 strengthen 0 002 @ 00099721 v 0000 + 14544672 n 0103 01 + 08 00 "
            '| give a healthy elasticity to; "Let\'s tone our muscles"  \n')
    assert qa.parse_synset(line, "verb") == qa.Item("verb:00101277", "verb.29", "tone", "give a healthy elasticity to",
                                                    "Let's tone our muscles")
    assert qa.parse_synset(line.replace("tone our", "firm our"), "verb") is None


# ------------------------------------------------------------------ encoding and the span search
def test_encoded_answer_positions_give_back_the_answer_text(examples, tmp_path):
    rows = [{"question": r["question"], "context": r["context"], "answers": r["answers"]["text"],
             "answer_starts": r["answers"]["answer_start"]} for r in examples["test"][:200]]
    tokenizer = SubwordTokenizer.train_or_load(lambda: [r["context"] for r in rows] + [r["question"] for r in rows],
                                               str(tmp_path), 300)
    ids, starts, ends, questions = qa.encode(tokenizer, rows, max_len=256, max_question_len=32)
    assert (starts >= 0).all() and (ends >= starts).all()
    for row, question, start, end, row_ids in zip(rows, questions, starts, ends, ids):
        assert question.span_text(start, end) == row["answers"][0]
        assert row_ids[question.passage_start - 1] == tokenizer.eos_id
    # A row too short for the passage cuts it, and an answer beyond the cut has no positions.
    _, cut_starts, _, _ = qa.encode(tokenizer, rows, max_len=40, max_question_len=32)
    assert (cut_starts == -1).any() and (cut_starts[cut_starts >= 0] < 40).all()


def test_first_sentence_baseline_is_the_first_entry():
    question = qa.Question("q", "tone: give a healthy elasticity to. firm: make taut.", ["firm"], 3, [])
    assert question.first_sentence() == "tone: give a healthy elasticity to."


def test_best_span_keeps_end_at_or_after_start_and_within_the_length():
    start = np.array([[0.0, 5.0, 1.0, 0.0, 9.0]])
    end = np.array([[0.0, 0.0, 1.0, 8.0, 0.0]])
    # The best pair overall (start 4, end 3) runs backwards; within 3 tokens from 1 the best is (1, 3).
    assert best_spans(start, end, max_answer_len=3).tolist() == [[1, 3]]
    assert best_spans(start, end, max_answer_len=1).tolist() == [[4, 4]]
