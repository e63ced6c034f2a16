"""Extractive question answering data: a cloze set made from WordNet as a TFDS builder, the
TFDS `squad` set, and both encoded as [question; eos; passage] rows with answer positions.

The embedded set comes from the Princeton WordNet 3.0 files of Debian's `wordnet-base`.
Each *item* is one synset with a usage example that contains one of the synset's words
verbatim (a whole word, any case); the first such example and word of the synset is used.

* The passage is a group of ENTRIES_PER_PASSAGE items, each written as the sentence
  "word: gloss." in a fixed pseudo-random order. The items of a group come from the same
  WordNet lexicographer file (noun.animal, verb.motion, ...), so their entries look alike.
* Each item of the group asks one question about that passage: its usage example with every
  occurrence of the word blanked out as "___". The answer is the item's own headword, the
  characters before the colon of its entry: an exact span of the passage, found by position.

So a question never contains its answer, and no string match between the question and the
passage finds it; a model has to judge which of the entries' words fits the blank, from the
sentence's sense and the glosses. The split is by synset (a hash of its offset and part of
speech), and the passages are grouped within each split, so no held-out passage, question or
entry was seen in training. Items whose word already heads an entry of the group being filled
are dropped, so every passage's headwords differ.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterator

import numpy as np
import sentencepiece as spm
import tensorflow_datasets as tfds

from common.data.subword import SubwordTokenizer
from common.data.tfds_io import DataError, load_prepared, prepare_embedded

DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")
ENTRIES_PER_PASSAGE = 4
TEST_PER_MILLE = 50
DEBUG_TRAIN, DEBUG_TEST = 2000, 200
BLANK = "___"

_LEXICAL_MARKER = re.compile(r"\([a-z]+\)$")  # adjective position markers: beautiful(a)
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")


@dataclasses.dataclass(frozen=True)
class Item:
    key: str  # "noun:02084071": part of speech and synset offset
    lexicographer_file: str
    word: str
    gloss: str
    example: str


def check_source(wordnet_dir: str) -> None:
    """Raises DataError unless the WordNet data files are in `wordnet_dir`."""
    missing = [pos for pos in PARTS_OF_SPEECH if not os.path.isfile(os.path.join(wordnet_dir, f"data.{pos}"))]
    if missing:
        raise DataError(f"WordNet data files not found in {wordnet_dir} (no data.{missing[0]}): install the "
                        "Debian package wordnet-base (apt-get install wordnet-base) or run scripts/setup.sh")


def whole_word(word: str) -> re.Pattern:
    return re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])", re.IGNORECASE)


def parse_synset(line: str, pos: str) -> Item | None:
    """The item of one line of a WordNet data file, or None if no example holds a word of it.

    A line is `offset lexfile type word_count (word lex_id)... pointers... | gloss; "example"...`.
    """
    head, _, gloss_field = line.partition(" | ")
    fields = head.split()
    words = [_LEXICAL_MARKER.sub("", fields[4 + 2 * i]).replace("_", " ") for i in range(int(fields[3], 16))]
    parts = [part.strip() for part in gloss_field.strip().split(";")]
    examples = [part.strip('"').strip() for part in parts if part.startswith('"')]
    gloss = "; ".join(part for part in parts if part and not part.startswith('"'))
    if not gloss:
        return None
    for example in examples:
        for word in words:
            if word.lower() in example.lower() and whole_word(word).search(example):
                return Item(f"{pos}:{fields[0]}", f"{pos}.{fields[1]}", word, gloss, example)
    return None


def read_items(wordnet_dir: str) -> list[Item]:
    """Every qualifying synset of the four data files, in file order."""
    items = []
    for pos in PARTS_OF_SPEECH:
        with open(os.path.join(wordnet_dir, f"data.{pos}"), encoding="utf-8") as handle:
            items.extend(item for line in handle if not line.startswith("  ")
                         for item in [parse_synset(line, pos)] if item)
    return items


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def is_test(item: Item) -> bool:
    return _hash(item.key) % 1000 < TEST_PER_MILLE


def passages(items: list[Item]) -> list[list[Item]]:
    """Groups of ENTRIES_PER_PASSAGE items of one lexicographer file with different words, in
    hash order within each file (the files in sorted order); an incomplete last group is dropped."""
    by_file: dict[str, list[Item]] = {}
    for item in items:
        by_file.setdefault(item.lexicographer_file, []).append(item)
    groups = []
    for name in sorted(by_file):
        group: list[Item] = []
        for item in sorted(by_file[name], key=lambda item: _hash(item.key)):
            if item.word.lower() not in {member.word.lower() for member in group}:
                group.append(item)
            if len(group) == ENTRIES_PER_PASSAGE:
                groups.append(group)
                group = []
    return groups


def entry(item: Item) -> str:
    gloss = item.gloss if item.gloss[-1] in ".?!" else item.gloss + "."
    return f"{item.word}: {gloss}"


def question(item: Item) -> str:
    return f'Which word fills the blank in "{whole_word(item.word).sub(BLANK, item.example)}"?'


def examples_of(group: list[Item]) -> Iterator[dict]:
    """One SQuAD-style example per item of the group, all on the group's passage."""
    entries = [entry(item) for item in group]
    context = " ".join(entries)
    starts = np.cumsum([0] + [len(text) + 1 for text in entries[:-1]])
    for item, start in zip(group, starts):
        yield {"id": item.key, "title": item.lexicographer_file, "context": context, "question": question(item),
               "answers": {"text": [item.word], "answer_start": [int(start)]}}


def split_examples(items: list[Item], debug: bool) -> dict[str, list[dict]]:
    """The train and test examples of the items; with `debug`, DEBUG_TRAIN and DEBUG_TEST of
    them, chosen by a hash of their passage."""
    splits = {"train": [item for item in items if not is_test(item)], "test": [item for item in items if is_test(item)]}
    examples = {split: [example for group in passages(chosen) for example in examples_of(group)]
                for split, chosen in splits.items()}
    if debug:
        sizes = {"train": DEBUG_TRAIN, "test": DEBUG_TEST}
        examples = {split: sorted(rows, key=lambda row: _hash(row["context"]))[:sizes[split]]
                    for split, rows in examples.items()}
    return examples


class WordnetCloze(tfds.core.GeneratorBasedBuilder):
    """Cloze questions on passages of WordNet entries (extractive, SQuAD v1.1 features)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "WordNet 3.0 usage examples, blanked, on passages of four entries."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="passages", description="Every qualifying synset."),
        tfds.core.BuilderConfig(name="debug", description=f"{DEBUG_TRAIN} train and {DEBUG_TEST} test questions."),
    ]
    DEFAULT_CONFIG_NAME = "passages"

    def __init__(self, *, wordnet_dir: str = DEFAULT_WORDNET_DIR, **kwargs):
        self._wordnet_dir = wordnet_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Usage examples of WordNet synsets with their word blanked out; the answer is the "
                        "headword of one of four dictionary entries in the passage.",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(), "title": tfds.features.Text(), "context": tfds.features.Text(),
                "question": tfds.features.Text(),
                "answers": tfds.features.Sequence({"text": tfds.features.Text(), "answer_start": np.int32}),
            }),
            homepage="https://wordnet.princeton.edu/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is read from the local WordNet files
        check_source(self._wordnet_dir)
        examples = split_examples(read_items(self._wordnet_dir), debug=self.builder_config.name == "debug")
        return {split: self._generate_examples(rows) for split, rows in examples.items()}

    def _generate_examples(self, rows):
        for number, row in enumerate(rows):
            yield number, row


# ------------------------------------------------------------------ encoding
@dataclasses.dataclass(frozen=True)
class Question:
    """A held-out question: its texts, references, and where each passage token sits."""

    question: str
    context: str
    answers: list[str]
    passage_start: int  # the row position of the first passage token
    token_bytes: list[tuple[int, int]]  # UTF-8 byte range in `context` of each passage token in the row

    def span_text(self, start: int, end: int) -> str:
        """The passage text from the token at row position `start` to the one at `end` (inclusive)."""
        raw = self.context.encode("utf-8")
        first, last = self.token_bytes[start - self.passage_start], self.token_bytes[end - self.passage_start]
        return raw[first[0]:last[1]].decode("utf-8").strip()

    def first_sentence(self) -> str:
        """The trivial baseline's answer: the passage up to its first sentence end."""
        return _SENTENCE_END.split(self.context.strip(), maxsplit=1)[0]


@dataclasses.dataclass(frozen=True)
class QAData:
    train_ids: np.ndarray  # int32 [n, max_len]: question ids, eos, passage ids, padding
    train_starts: np.ndarray  # int32 [n]: row position of the answer's first token
    train_ends: np.ndarray  # int32 [n]: row position of its last token
    test_ids: np.ndarray
    test_starts: np.ndarray  # -1 where the answer lies beyond the row's passage tokens
    test_ends: np.ndarray
    test_questions: list[Question]
    tokenizer: SubwordTokenizer


def read_rows(builder, split: str) -> list[dict]:
    """{question, context, answers, answer_starts} of every example of `split`, in stored order."""
    rows = []
    for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
        answers = example["answers"]
        rows.append({"question": example["question"].decode("utf-8"), "context": example["context"].decode("utf-8"),
                     "answers": [text.decode("utf-8") for text in answers["text"]],
                     "answer_starts": [int(start) for start in answers["answer_start"]]})
    return rows


def passage_tokens(processor: spm.SentencePieceProcessor, context: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The context's ids and the byte range of each, without the empty word-start pieces."""
    pieces = [piece for piece in processor.encode(context, out_type="proto").pieces if piece.end > piece.begin]
    return [piece.id for piece in pieces], [(piece.begin, piece.end) for piece in pieces]


def answer_positions(token_bytes: list[tuple[int, int]], context: str, start: int, text: str) -> tuple[int, int]:
    """Indices of the first and last passage token overlapping the answer's characters;
    (-1, -1) if no kept token does."""
    begin = len(context[:start].encode("utf-8"))
    end = begin + len(text.encode("utf-8"))
    inside = [i for i, (lo, hi) in enumerate(token_bytes) if lo < end and hi > begin]
    return (inside[0], inside[-1]) if inside else (-1, -1)


def encode(tokenizer: SubwordTokenizer, rows: list[dict], max_len: int, max_question_len: int):
    """Rows [question ids (at most max_question_len); eos; passage ids; padding] of max_len ids,
    the row positions of each first answer's first and last token (-1 if cut off), and the
    held-out view of each question."""
    processor = spm.SentencePieceProcessor(model_file=tokenizer.model_path)
    question_ids = tokenizer.encode([row["question"] for row in rows])
    ids = np.zeros((len(rows), max_len), np.int32)
    starts, ends, questions = np.full(len(rows), -1, np.int32), np.full(len(rows), -1, np.int32), []
    for index, (row, asked) in enumerate(zip(rows, question_ids)):
        head = asked[:max_question_len] + [tokenizer.eos_id]
        passage, token_bytes = passage_tokens(processor, row["context"])
        passage, token_bytes = passage[:max_len - len(head)], token_bytes[:max_len - len(head)]
        ids[index, :len(head) + len(passage)] = head + passage
        first, last = answer_positions(token_bytes, row["context"], row["answer_starts"][0], row["answers"][0])
        if first >= 0:
            starts[index], ends[index] = first + len(head), last + len(head)
        questions.append(Question(row["question"], row["context"], row["answers"], len(head), token_bytes))
    return ids, starts, ends, questions


def open_qa_builder(data_dir: str, dataset: str | None, debug: bool, wordnet_dir: str):
    """(builder, its test split, the folder of its subword model): the embedded WordNet set
    (prepared here if needed) when `dataset` is None, else a prepared TFDS set such as squad."""
    if dataset is not None:
        builder = load_prepared(dataset, data_dir)
        test_split = "validation" if "validation" in builder.info.splits else "test"
        return builder, test_split, os.path.join(data_dir, "subword", dataset.replace("/", "_"))
    check_source(wordnet_dir)
    config = "debug" if debug else "passages"
    builder = prepare_embedded(WordnetCloze, data_dir, config=config, wordnet_dir=wordnet_dir)
    return builder, "test", os.path.join(data_dir, "subword", f"{builder.name}_{config}")


def load_qa(*, data_dir: str, dataset: str | None, debug: bool, max_len: int, max_question_len: int,
            vocab_size: int, max_test: int | None = None, wordnet_dir: str = DEFAULT_WORDNET_DIR) -> QAData:
    """Encoded train and test splits; the subword model is learned from the train split's
    questions and passages. Training examples whose answer does not fit the row are dropped."""
    builder, test_split, tokenizer_dir = open_qa_builder(data_dir, dataset, debug, wordnet_dir)
    train_rows, test_rows = read_rows(builder, "train"), read_rows(builder, test_split)[:max_test]
    if not train_rows or not test_rows:
        raise DataError(f"{builder.name} has an empty train or {test_split} split: rebuild it in a fresh --data_dir")
    contexts = list(dict.fromkeys(row["context"] for row in train_rows))
    tokenizer = SubwordTokenizer.train_or_load(lambda: contexts + [row["question"] for row in train_rows],
                                               tokenizer_dir, vocab_size)
    train_ids, train_starts, train_ends, _ = encode(tokenizer, train_rows, max_len, max_question_len)
    kept = train_starts >= 0
    test_ids, test_starts, test_ends, questions = encode(tokenizer, test_rows, max_len, max_question_len)
    return QAData(train_ids[kept], train_starts[kept], train_ends[kept], test_ids, test_starts, test_ends,
                  questions, tokenizer)
