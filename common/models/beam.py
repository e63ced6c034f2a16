"""Beam search over a sequence model whose output vocabulary may be split over a tensor group.

Each step runs the model once on every live hypothesis of every row (the whole prefix, as
greedy decoding does), and the group together finds each hypothesis's best `beam`
continuations: every rank takes the top ids of its vocabulary range, normalised by the
log-sum-exp over the whole vocabulary, and the ranks' candidates are gathered. The choice
among them is made on the host, identically on every rank, so all ranks of the group run the
same number of steps.

Hypotheses that end (eos) leave the beam for a pool of finished ones, scored with the length
penalty of Wu et al. 2016 (GNMT), `((5 + length) / 6) ** alpha`, where alpha 0 is none and
larger values favour longer outputs; the beam keeps `beam` live hypotheses until no live one
can beat the best finished.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from common.dist import Group


def length_penalty(length: np.ndarray | int, alpha: float) -> np.ndarray:
    return ((5.0 + np.asarray(length, np.float64)) / 6.0) ** alpha


def top_log_probs(local_logits: tf.Tensor, group: Group, count: int) -> tuple[tf.Tensor, tf.Tensor]:
    """The `count` best (log-probabilities, ids) of each row, from [rows, local vocabulary]
    logits whose vocabulary is split over `group` in contiguous ranges; [rows, count] each."""
    rows = local_logits.shape[-1]
    logits_max = group.max(tf.reduce_max(local_logits, axis=-1))
    shifted = local_logits - logits_max[:, None]
    log_sum_exp = tf.math.log(group.sum([tf.reduce_sum(tf.exp(shifted), -1)])[0])
    values, ids = tf.math.top_k(shifted - log_sum_exp[:, None], k=min(count, rows))
    if group.size > 1:  # the members' candidates side by side: [rows, size * count]
        values = tf.transpose(group.gather(tf.transpose(values)))
        ids = tf.transpose(group.gather(tf.transpose(ids + group.index * rows)))
    best = tf.math.top_k(values, k=count)
    return best.values, tf.gather(ids, best.indices, batch_dims=1)


@dataclasses.dataclass
class Finished:
    """The best finished hypothesis of each row so far: its ids and length-penalised score."""

    ids: list[list[int] | None]
    scores: np.ndarray

    @classmethod
    def empty(cls, rows: int) -> "Finished":
        return cls([None] * rows, np.full(rows, -np.inf))

    def offer(self, row: int, ids: list[int], score: float) -> None:
        if score > self.scores[row]:
            self.ids[row], self.scores[row] = ids, score


def beam_decode(forward, group: Group, source: np.ndarray, length: int, bos: int, eos: int, beam: int,
                alpha: float = 0.6) -> list[list[int]]:
    """Beam search of up to `length` ids after each source row, through `forward(batch, head)`
    of the plan (as `transformer.greedy_decode`, without a pipeline axis: the head returns two
    tensors) on (source, target) batches; every rank of a tensor group calls it alike. Returns
    each row's best ids, without bos and eos, by log-probability over the length penalty."""
    rows = len(source)
    tokens = np.zeros((rows, beam, length + 1), np.int32)
    tokens[:, :, 0] = bos
    scores = np.full((rows, beam), -np.inf)
    scores[:, 0] = 0.0  # one live hypothesis at first: the others would repeat it
    finished = Finished.empty(rows)
    sources = tf.constant(np.repeat(source, beam, axis=0))
    for t in range(length):
        head = lambda logits: top_log_probs(logits[:, t], group, beam)  # noqa: E731 (binds this step's t)
        values, ids = (array.numpy() for array in forward((sources, tf.constant(tokens.reshape(rows * beam, -1))), head))
        candidates = scores[:, :, None] + values.reshape(rows, beam, beam)
        tokens, scores = _advance(tokens, candidates, ids.reshape(rows, beam, beam), t, eos, alpha, finished)
        if _done(scores, finished, length, alpha):
            break
    for row in range(rows):  # the best hypothesis still live, cut at `length` ids
        finished.offer(row, list(tokens[row, 0, 1:]), scores[row, 0] / length_penalty(length, alpha))
    return [[int(token) for token in ids] for ids in finished.ids]


def _advance(tokens, candidates, ids, t, eos, alpha, finished):
    """The next live hypotheses of every row (the best `beam` of its beam * beam candidates
    that do not end), after offering those that end to `finished`."""
    rows, beam = candidates.shape[:2]
    flat = candidates.reshape(rows, -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    next_tokens, next_scores = np.zeros_like(tokens), np.full((rows, beam), -np.inf)
    for row in range(rows):
        kept = 0
        for index in order[row]:
            score = flat[row, index]
            if kept == beam or score == -np.inf:
                break
            parent, token = divmod(int(index), beam)
            token_id = int(ids[row, parent, token])
            if token_id == eos:
                finished.offer(row, list(tokens[row, parent, 1:t + 1]), score / length_penalty(t + 1, alpha))
                continue
            next_tokens[row, kept] = tokens[row, parent]
            next_tokens[row, kept, t + 1] = token_id
            next_scores[row, kept] = score
            kept += 1
    return next_tokens, next_scores


def _done(scores, finished: Finished, length: int, alpha: float) -> bool:
    """No live hypothesis can still beat its row's best finished one: log-probabilities only
    fall as a hypothesis grows, so the best it can reach is its score now over the largest
    penalty (at `length` ids, for alpha >= 0)."""
    best_live = scores.max(axis=1) / length_penalty(length, alpha)
    return bool(np.all(finished.scores >= best_live))
