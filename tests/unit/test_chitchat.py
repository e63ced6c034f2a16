"""The Chit Chat conversations as (context -> response) pairs: turns, split by conversation, id rows."""
import sys

import numpy as np
import pytest

from common.data import chitchat
from common.data.chitchat import DataError, context_row, pairs_of, split_ids, turns_of
from common.data.subword import SubwordTokenizer


def message(*texts):
    return [{"text": text, "sender": "a"} for text in texts]


def test_a_turn_joins_one_persons_messages_and_empty_turns_are_dropped():
    turns = turns_of([message("Hello", "How  are\nyou?"), message("  "), message("fine", "thanks")])
    assert turns == ["Hello How are you?", "fine thanks"]


def test_every_turn_after_the_first_is_a_response_to_the_turns_before_it():
    pairs = pairs_of(["a", "b", "c", "d", "e"], context_turns=3)
    assert pairs == [("a", "b"), ("a\nb", "c"), ("a\nb\nc", "d"), ("b\nc\nd", "e")]


def test_the_split_is_by_conversation_and_stable():
    ids = [f"conversation-{i}" for i in range(2000)]
    splits = split_ids(ids, debug=False)
    assert not set(splits["train"]) & set(splits["test"]) and len(splits["train"]) + len(splits["test"]) == 2000
    assert 0.03 < len(splits["test"]) / 2000 < 0.07  # TEST_PER_MILLE = 50
    assert split_ids(list(reversed(ids)), debug=False) == splits
    debug = split_ids(ids, debug=True)
    assert [len(debug["train"]), len(debug["test"])] == [chitchat.DEBUG_TRAIN, chitchat.DEBUG_TEST]
    assert set(debug["train"]) <= set(splits["train"]) and set(debug["test"]) <= set(splits["test"])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    lines = ["hello there how are you", "i am fine thanks", "what do you do for fun", "i like to read"] * 20
    return SubwordTokenizer.train_or_load(lambda: iter(lines), str(tmp_path_factory.mktemp("spm")), 40)


def test_a_context_row_ends_each_turn_with_eos_keeps_its_end_and_is_padded_on_the_left(tokenizer):
    first, second = tokenizer.encode(["hello there", "i am fine"])
    eos, pad = tokenizer.eos_id, tokenizer.pad_id
    whole = first + [eos] + second + [eos]
    assert context_row(tokenizer, ["hello there", "i am fine"], len(whole) + 3) == [pad] * 3 + whole
    assert context_row(tokenizer, ["hello there", "i am fine"], len(second) + 2) == whole[-(len(second) + 2):]


def test_a_missing_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "chitchat_dataset", None)  # what an absent package makes `import` raise
    with pytest.raises(DataError, match="pip install chitchat-dataset"):
        chitchat.check_installed()


def test_the_debug_set_holds_unseen_test_conversations_of_real_turns(tmp_path):
    from common.data.tfds_io import prepare_embedded
    import tensorflow_datasets as tfds
    builder = prepare_embedded(chitchat.ChitchatConversations, str(tmp_path), config="debug")
    pairs = {split: list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
             for split in ("train", "test")}
    conversations = {split: {pair["conversation"].decode() for pair in rows} for split, rows in pairs.items()}
    assert [len(conversations["train"]), len(conversations["test"])] == [chitchat.DEBUG_TRAIN, chitchat.DEBUG_TEST]
    assert not conversations["train"] & conversations["test"]
    turns = chitchat.conversations()
    assert len(turns) == 7168 and sum(len(t) > 1 for t in turns.values()) == 4017  # the others are unanswered
    # Each turn of a conversation after its first, as the response to the turns before it (TFDS
    # stores the examples in an order of its own).
    key = sorted(conversations["test"])[0]
    stored = [(pair["context"].decode(), pair["response"].decode())
              for pair in pairs["test"] if pair["conversation"].decode() == key]
    assert sorted(stored) == sorted(pairs_of(turns[key])) and len(stored) == len(turns[key]) - 1
