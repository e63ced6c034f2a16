"""A joint English+German subword vocabulary, trained once per data set with sentencepiece."""
import os
import tempfile
from collections.abc import Callable, Iterable

import sentencepiece as spm

from common.data.tfds_io import file_lock

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SEED = 1234
# Sentences sampled (with SEED) from larger corpora, to keep single-threaded training short.
MAX_SENTENCES = 200_000


def _train(texts: Iterable[str], prefix: str, vocab_size: int) -> None:
    """Trains a unigram model to `prefix`.model, writing it atomically.

    Readers look for the model file without taking the lock, so it must never be
    seen half-written: it is trained under a temporary name and renamed into place.
    With `hard_vocab_limit=False` a corpus too small for `vocab_size` yields a
    smaller vocabulary instead of an error.
    """
    model_dir = os.path.dirname(prefix)
    with tempfile.TemporaryDirectory(dir=model_dir) as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as handle:
            for text in texts:
                handle.write(text.replace("\n", " ") + "\n")
        spm.set_random_generator_seed(SEED)
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=os.path.join(tmp, "spm"), vocab_size=vocab_size,
            model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
            num_threads=1, input_sentence_size=MAX_SENTENCES, shuffle_input_sentence=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            minloglevel=2)
        os.replace(os.path.join(tmp, "spm.vocab"), prefix + ".vocab")
        os.replace(os.path.join(tmp, "spm.model"), prefix + ".model")


class SubwordTokenizer:
    """Sentencepiece model with fixed special ids: pad 0, unk 1, bos 2, eos 3."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self._processor = spm.SentencePieceProcessor(model_file=model_path)

    @classmethod
    def train_or_load(cls, texts_iterable_factory: Callable[[], Iterable[str]],
                      model_dir: str, vocab_size: int) -> "SubwordTokenizer":
        """Loads the model of `vocab_size` in `model_dir`, training it first if missing.

        Concurrent processes train it once: the first to take the lock trains, the
        others wait and load. The factory is only called by the process that trains,
        and must yield the texts in the same order every time for a reproducible model.
        """
        os.makedirs(model_dir, exist_ok=True)
        prefix = os.path.join(model_dir, f"spm_unigram_{vocab_size}")
        if not os.path.exists(prefix + ".model"):
            with file_lock(prefix + ".lock"):
                if not os.path.exists(prefix + ".model"):
                    _train(texts_iterable_factory(), prefix, vocab_size)
        return cls(prefix + ".model")

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without bos or eos."""
        return self._processor.encode(list(texts), out_type=int)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` up to the first eos; pad and bos ids are ignored, and so are ids past
        the vocabulary (models pad their embedding rows to a round number)."""
        kept = []
        for token in ids:
            token = int(token)
            if token == EOS_ID:
                break
            if token not in (PAD_ID, BOS_ID) and token < self.vocab_size:
                kept.append(token)
        return self._processor.decode(kept)
