"""Real conversations as (context -> next turn) pairs: the Chit Chat Challenge set (BYU PCC lab,
7,168 English conversations between two people, 138k turns), as a TFDS builder.

The conversations ship in the PyPI package `chitchat-dataset`, so the recipe trains without
network. A turn is one person's consecutive messages, joined by spaces, whitespace normalised.
(3,150 conversations hold one person's turn only, unanswered: they give no pair.)
Every turn after a conversation's first is a response; its context is the CONTEXT_TURNS turns
before it (fewer at the start), stored newline-separated, oldest first. The held-out split is
chosen by a hash of the conversation's id, so the test conversations are unseen in training.

The arrays a decoder-only model reads: the context's turns, each ending with eos, cut to its last
`context_len` tokens and padded on the left (the last turn always ends next to the response, at
the same position); the response as bos, ids, eos, as the other sequence recipes store targets.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import tensorflow_datasets as tfds

from common.data.seq2seq import open_builder, read_split
from common.data.subword import SubwordTokenizer
from common.data.tfds_io import DataError

CONTEXT_TURNS = 3
TEST_PER_MILLE = 50
DEBUG_TRAIN, DEBUG_TEST = 120, 12  # conversations of the debug config: the first ones by hash
TURN_SEPARATOR = "\n"
FEATURES = ("context", "response")


def check_installed():
    """The chitchat_dataset module; DataError if the package is missing (each rank checks by itself)."""
    try:
        import chitchat_dataset
    except ImportError:
        raise DataError("the conversations come from the PyPI package chitchat-dataset: "
                        "pip install chitchat-dataset (or run scripts/setup.sh)") from None
    return chitchat_dataset


def conversations() -> dict:
    """{conversation id: its turns as texts}, in sorted id order."""
    data = check_installed().Dataset()
    return {key: turns_of(conversation["messages"]) for key, conversation in sorted(data.items())}


def turns_of(messages: list[list[dict]]) -> list[str]:
    """The non-empty turns of a conversation: each one person's messages, joined by a space."""
    turns = (" ".join(" ".join(message["text"].split()) for message in turn) for turn in messages)
    return [turn for turn in (" ".join(text.split()) for text in turns) if turn]


def pairs_of(turns: list[str], context_turns: int = CONTEXT_TURNS) -> list[tuple[str, str]]:
    """(context: up to `context_turns` turns before, newline-separated, response) for every turn
    after the first."""
    return [(TURN_SEPARATOR.join(turns[max(0, i - context_turns):i]), turns[i]) for i in range(1, len(turns))]


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def is_test(conversation_id: str) -> bool:
    """Stable split assignment: a conversation always lands in the same split, all of its turns."""
    return _hash(conversation_id) % 1000 < TEST_PER_MILLE


def split_ids(ids, debug: bool) -> dict[str, list[str]]:
    """The conversation ids of each split in sorted order; under `debug`, the first
    DEBUG_TRAIN / DEBUG_TEST of each by hash (a fixed sample over the whole set)."""
    splits = {"train": sorted(i for i in ids if not is_test(i)), "test": sorted(i for i in ids if is_test(i))}
    if debug:
        sizes = {"train": DEBUG_TRAIN, "test": DEBUG_TEST}
        splits = {name: sorted(sorted(keys, key=_hash)[:sizes[name]]) for name, keys in splits.items()}
    return splits


class ChitchatConversations(tfds.core.GeneratorBasedBuilder):
    """Chit Chat Challenge conversations as (context, response) pairs, split by conversation."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": f"chitchat-dataset 0.9.0; the {CONTEXT_TURNS} turns before each response."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="full", description="Every conversation."),
        tfds.core.BuilderConfig(name="debug", description=f"{DEBUG_TRAIN} train and {DEBUG_TEST} test conversations."),
    ]
    DEFAULT_CONFIG_NAME = "full"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=f"Up to {CONTEXT_TURNS} turns of a conversation, newline-separated, and the next turn.",
            features=tfds.features.FeaturesDict({"conversation": tfds.features.Text(),
                                                 "context": tfds.features.Text(), "response": tfds.features.Text()}),
            supervised_keys=FEATURES,
            homepage="https://github.com/BYU-PCCL/chitchat-dataset",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is in the installed package.
        turns = {key: turns for key, turns in conversations().items() if len(turns) > 1}  # others hold no pair
        return {name: self._generate_examples({key: turns[key] for key in ids})
                for name, ids in split_ids(turns, self.builder_config.name == "debug").items()}

    def _generate_examples(self, turns_by_id):
        for key, turns in turns_by_id.items():
            for index, (context, response) in enumerate(pairs_of(turns)):
                yield f"{key}/{index}", {"conversation": key, "context": context, "response": response}


@dataclasses.dataclass(frozen=True)
class DialogueData:
    """Train and test pairs; context rows are padded on the left, response rows on the right."""

    train_context: np.ndarray  # int32 [n, context_len]
    train_response: np.ndarray  # int32 [n, response_len + 1]: bos, ids, eos, pad
    test_context: np.ndarray
    test_response: np.ndarray  # as train_response; a response cut short keeps no eos
    test_context_text: list[list[str]]  # each test context's turns
    test_response_text: list[str]
    tokenizer: SubwordTokenizer


def context_row(tokenizer: SubwordTokenizer, turns: list[str], context_len: int) -> list[int]:
    """The ids of `turns`, each ending with eos, cut to the last `context_len` and padded on the left."""
    ids = [token for turn in tokenizer.encode(turns) for token in turn + [tokenizer.eos_id]][-context_len:]
    return [tokenizer.pad_id] * (context_len - len(ids)) + ids


def _response_rows(tokenizer: SubwordTokenizer, responses: list[str], response_len: int) -> list[list[int]]:
    """bos, the ids, eos of each response, padded to response_len + 1 (kept whole only if it fits)."""
    rows = [[tokenizer.bos_id] + ids + [tokenizer.eos_id] for ids in tokenizer.encode(responses)]
    return [row[:response_len + 1] + [tokenizer.pad_id] * (response_len + 1 - len(row)) for row in rows]


def _arrays(tokenizer, contexts: list[str], responses: list[str], context_len: int, response_len: int,
            keep_long: bool):
    """Context and response arrays; pairs whose response does not fit with eos are dropped
    unless `keep_long` (the held-out set, which keeps each response's start)."""
    fits = [keep_long or len(ids) < response_len for ids in tokenizer.encode(responses)]
    kept = [i for i, fit in enumerate(fits) if fit]
    context_rows = [context_row(tokenizer, contexts[i].split(TURN_SEPARATOR), context_len) for i in kept]
    response_rows = _response_rows(tokenizer, [responses[i] for i in kept], response_len)
    return (np.array(context_rows, np.int32).reshape(-1, context_len),
            np.array(response_rows, np.int32).reshape(-1, response_len + 1))


def load_dialogue(*, data_dir: str, dataset: str | None, debug: bool, context_len: int, response_len: int,
                  vocab_size: int, max_test: int | None = None) -> DialogueData:
    """The embedded conversations (its debug config if `debug`) when `dataset` is None, else a
    prepared TFDS set with `context` (newline-separated turns) and `response` text features.
    The subword model is learned from the training responses; `max_test` keeps the first test pairs."""
    if dataset is None:
        check_installed()  # before the build lock: every rank fails at once
    builder, tokenizer_dir = open_builder(data_dir, dataset, ChitchatConversations, "debug" if debug else "full")
    if not set(FEATURES) <= set(builder.info.features.keys()):
        raise DataError(f"TFDS dataset {dataset!r} has no context and response features: pass a dialogue "
                        "data set of (context turns, response) text pairs, or drop --dataset")
    train_contexts, train_responses = read_split(builder, "train", *FEATURES)
    test_contexts, test_responses = (texts[:max_test] for texts in read_split(builder, "test", *FEATURES))
    tokenizer = SubwordTokenizer.train_or_load(lambda: iter(train_responses), tokenizer_dir, vocab_size)
    train_context, train_response = _arrays(tokenizer, train_contexts, train_responses, context_len, response_len,
                                            keep_long=False)
    test_context, test_response = _arrays(tokenizer, test_contexts, test_responses, context_len, response_len,
                                          keep_long=True)
    return DialogueData(train_context, train_response, test_context, test_response,
                        [context.split(TURN_SEPARATOR) for context in test_contexts], test_responses, tokenizer)

