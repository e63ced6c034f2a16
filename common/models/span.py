"""A Transformer encoder over [question; eos; passage] that points at the answer span.

The blocks are the shared Transformer's (`common.models.transformer.Block`, built from
`common.plans.tensor`'s layers), so the tensor plan splits attention by heads and the MLP
column-then-row; the embedding is split by vocabulary ranges. The span head (two logits per
position: start and end) is a plain dense layer every rank holds whole: it reads the
replicated activations, so every rank of a tensor group computes the same logits.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from common.data.subword import EOS_ID
from common.dist import Group
from common.models.transformer import Block, TransformerSize, embed, padding_mask
from common.plans.tensor import VocabParallelEmbedding

MASKED = -1e9


def passage_mask(ids: tf.Tensor) -> tf.Tensor:
    """[batch, length] booleans: the position holds a passage token (after the first eos, which
    ends the question; not padding)."""
    separator = tf.cast(tf.equal(ids, EOS_ID), tf.int32)
    return (tf.cumsum(separator, axis=1, exclusive=True) > 0) & tf.not_equal(ids, 0)


class SpanEncoder(keras.Model):
    """ids [batch, length] in; start and end logits [batch, length] out, MASKED outside the passage."""

    def __init__(self, size: TransformerSize, group: Group, **kwargs):
        super().__init__(**kwargs)
        self.size, self.group = size, group
        self.embedding = VocabParallelEmbedding(size.vocab_size, size.width, group, name="embedding")
        self.positions = keras.layers.Embedding(size.max_len, size.width, name="positions")
        self.blocks = [Block(size, group, cross=False, name=f"block_{i}") for i in range(size.layers)]
        self.final_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")
        self.span_head = keras.layers.Dense(2, name="span_head")
        self.drop = keras.layers.Dropout(size.dropout)

    def call(self, ids, training=False):
        x, mask = embed(self, ids, training), padding_mask(ids, ids)
        for block in self.blocks:
            x = block(x, mask, training=training)
        logits = self.span_head(self.final_norm(x))
        logits = tf.where(passage_mask(ids)[..., None], logits, tf.constant(MASKED, logits.dtype))
        return logits[..., 0], logits[..., 1]


def build_span_encoder(size: TransformerSize, group: Group) -> SpanEncoder:
    model = SpanEncoder(size, group, name="span_encoder")
    model(tf.zeros((1, size.max_len), tf.int32))  # the weights now, in a fixed order: the same draws in every plan
    return model


def span_loss_sums(model, batch, training):
    """Summed start and end cross-entropies over the examples, and how many of the starts,
    ends and whole spans the argmax positions get right."""
    ids, starts, ends = batch
    start_logits, end_logits = model(ids, training=training)
    losses = (keras.losses.sparse_categorical_crossentropy(starts, start_logits, from_logits=True)
              + keras.losses.sparse_categorical_crossentropy(ends, end_logits, from_logits=True))
    start_hit = tf.equal(tf.argmax(start_logits, -1, output_type=starts.dtype), starts)
    end_hit = tf.equal(tf.argmax(end_logits, -1, output_type=ends.dtype), ends)
    count = tf.cast(tf.size(starts), tf.float32)
    return tf.reduce_sum(losses), count, {"start_accuracy": tf.reduce_sum(tf.cast(start_hit, tf.float32)),
                                          "end_accuracy": tf.reduce_sum(tf.cast(end_hit, tf.float32)),
                                          "span_accuracy": tf.reduce_sum(tf.cast(start_hit & end_hit, tf.float32))}


def best_spans(start_logits: np.ndarray, end_logits: np.ndarray, max_answer_len: int) -> np.ndarray:
    """int [batch, 2]: the (start, end) positions of the highest start + end score with
    start <= end < start + max_answer_len, both inside the passage (masked logits elsewhere)."""
    scores = start_logits[:, :, None] + end_logits[:, None, :]
    length = scores.shape[1]
    offsets = np.arange(length)[None, :] - np.arange(length)[:, None]
    scores = np.where((offsets >= 0) & (offsets < max_answer_len), scores, -np.inf)
    flat = scores.reshape(len(scores), -1).argmax(-1)
    return np.stack([flat // length, flat % length], axis=-1)
