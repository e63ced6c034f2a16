"""Count-based baselines for a language model's held-out perplexity, on the same rows of ids.

Both score exactly the tokens the Transformer scores: in each row of seq_len + 1 ids, ids
1..seq_len, each given the one before (padding, id 0, is not scored).
- unigram: add-one (Laplace) smoothed counts of the training ids;
- bigram: interpolated Kneser-Ney with one absolute discount (0.75): the discounted pair count
  plus the discounted mass spread by the continuation distribution (how many distinct ids
  precede an id), itself add-one smoothed so that an id never seen after anything keeps some.
"""
from __future__ import annotations

import numpy as np

DISCOUNT = 0.75


def _scored(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(previous ids, ids) of the scored tokens of `rows`."""
    previous, targets = rows[:, :-1].ravel(), rows[:, 1:].ravel()
    keep = targets != 0
    return previous[keep], targets[keep]


def _perplexity(probabilities: np.ndarray) -> float:
    return float(np.exp(-np.mean(np.log(probabilities))))


def unigram_perplexity(train_rows: np.ndarray, test_rows: np.ndarray, vocab_size: int) -> float:
    """Held-out perplexity of add-one smoothed unigram frequencies of the training targets."""
    _, train_targets = _scored(train_rows)
    counts = np.bincount(train_targets, minlength=vocab_size) + 1.0
    _, targets = _scored(test_rows)
    return _perplexity(counts[targets] / counts.sum())


def bigram_perplexity(train_rows: np.ndarray, test_rows: np.ndarray, vocab_size: int,
                      discount: float = DISCOUNT) -> float:
    """Held-out perplexity of an interpolated Kneser-Ney bigram model (module docstring)."""
    previous, targets = _scored(train_rows)
    pairs, pair_counts = np.unique(previous.astype(np.int64) * vocab_size + targets, return_counts=True)
    first, second = np.divmod(pairs, vocab_size)
    context_counts = np.bincount(first, weights=pair_counts, minlength=vocab_size)
    followers = np.bincount(first, minlength=vocab_size)  # distinct ids seen after each id
    continuation = np.bincount(second, minlength=vocab_size) + 1.0  # distinct ids seen before each id
    continuation /= continuation.sum()

    test_previous, test_targets = _scored(test_rows)
    codes = test_previous.astype(np.int64) * vocab_size + test_targets
    found = np.searchsorted(pairs, codes)
    seen = (found < len(pairs)) & (pairs[np.minimum(found, len(pairs) - 1)] == codes)
    pair_count = np.where(seen, pair_counts[np.minimum(found, len(pairs) - 1)], 0)
    context = context_counts[test_previous]
    spread = np.where(context > 0, discount * followers[test_previous] / np.maximum(context, 1), 1.0)
    probabilities = np.maximum(pair_count - discount, 0) / np.maximum(context, 1) \
        + spread * continuation[test_targets]
    return _perplexity(probabilities)
