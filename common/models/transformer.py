"""Transformer encoder-decoder built from the tensor-parallel layers of `common.plans.tensor`.

One definition serves every plan: with a tensor group of one process the layers are plain
dense layers; with a larger group, attention is split by heads, the MLP column-then-row, and
the embedding and output projection by vocabulary ranges, so no rank holds all the logits.
Weight paths do not depend on the plan, so checkpoints of full tensors load into any plan.
"""
from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from common.dist import Group
from common.plans.tensor import (ColumnParallelDense, ParallelAttention, ParallelMLP, VocabParallelEmbedding,
                                 vocab_parallel_argmax, vocab_parallel_cross_entropy)


@dataclasses.dataclass(frozen=True)
class TransformerSize:
    vocab_size: int
    max_len: int
    width: int
    heads: int
    layers: int
    ff_dim: int
    dropout: float = 0.0


def padding_mask(query_ids: tf.Tensor, key_ids: tf.Tensor, causal: bool = False) -> tf.Tensor:
    """[batch, query, key] booleans: the key is not padding (and, if causal, not in the future)."""
    mask = tf.not_equal(key_ids, 0)[:, None, :] & tf.ones_like(query_ids, dtype=tf.bool)[:, :, None]
    if causal:
        length = tf.shape(query_ids)[1]
        mask &= tf.range(length)[:, None] >= tf.range(length)[None, :]
    return mask


class Block(keras.layers.Layer):
    """Pre-norm block: self-attention, cross-attention over the encoder (decoder only), MLP."""

    def __init__(self, size: TransformerSize, group: Group, cross: bool, **kwargs):
        super().__init__(**kwargs)
        self.self_attention = ParallelAttention(size.width, size.heads, group, size.dropout, name="self_attention")
        self.cross_attention = (ParallelAttention(size.width, size.heads, group, size.dropout, name="cross_attention")
                                if cross else None)
        self.mlp = ParallelMLP(size.width, size.ff_dim, group, name="mlp")
        self.norms = [keras.layers.LayerNormalization(epsilon=1e-6, name=f"norm_{i}") for i in range(3 if cross else 2)]
        self.drop = keras.layers.Dropout(size.dropout)

    def call(self, x, self_mask, memory=None, cross_mask=None, training=False):
        h = self.norms[0](x)
        x = x + self.drop(self.self_attention(h, h, self_mask, training=training), training=training)
        if self.cross_attention is not None:
            h = self.norms[1](x)
            x = x + self.drop(self.cross_attention(h, memory, cross_mask, training=training), training=training)
        return x + self.drop(self.mlp(self.norms[-1](x)), training=training)


class Seq2SeqTransformer(keras.Model):
    """Token ids in, vocabulary-split logits out; `loss_sums` and `greedy_decode` handle the split."""

    def __init__(self, size: TransformerSize, group: Group, **kwargs):
        super().__init__(**kwargs)
        self.size, self.group = size, group
        self.embedding = VocabParallelEmbedding(size.vocab_size, size.width, group, name="embedding")
        self.positions = keras.layers.Embedding(size.max_len, size.width, name="positions")
        self.encoder_blocks = [Block(size, group, cross=False, name=f"encoder_{i}") for i in range(size.layers)]
        self.decoder_blocks = [Block(size, group, cross=True, name=f"decoder_{i}") for i in range(size.layers)]
        self.encoder_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="encoder_norm")
        self.decoder_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="decoder_norm")
        self.logits = ColumnParallelDense(size.vocab_size, group, name="logits")
        self.drop = keras.layers.Dropout(size.dropout)

    def embed(self, ids, training):
        positions = self.positions(tf.range(tf.shape(ids)[1]))[None]
        return self.drop(self.embedding(ids) * (self.size.width ** 0.5) + positions, training=training)

    def encode(self, source, training=False):
        x, mask = self.embed(source, training), padding_mask(source, source)
        for block in self.encoder_blocks:
            x = block(x, mask, training=training)
        return self.encoder_norm(x)

    def decode(self, target_in, memory, source, training=False):
        """Logits of this rank's vocabulary range, [batch, target length, vocab / group size]."""
        y = self.embed(target_in, training)
        self_mask, cross_mask = padding_mask(target_in, target_in, causal=True), padding_mask(target_in, source)
        for block in self.decoder_blocks:
            y = block(y, self_mask, memory, cross_mask, training=training)
        return self.logits(self.decoder_norm(y))

    def call(self, inputs, training=False):
        source, target_in = inputs
        return self.decode(target_in, self.encode(source, training), source, training)


def build_transformer(size: TransformerSize, group: Group) -> Seq2SeqTransformer:
    model = Seq2SeqTransformer(size, group, name="transformer")
    ids = tf.zeros((1, size.max_len), tf.int32)
    model((ids, ids))  # create the weights now, in a fixed order: the same draws in every plan
    return model


def loss_sums(model: Seq2SeqTransformer, batch, training: bool):
    """Summed token cross-entropy and correct tokens over the non-padding target tokens."""
    source, target = batch
    labels = target[:, 1:]
    losses, correct = vocab_parallel_cross_entropy(model((source, target[:, :-1]), training=training),
                                                   labels, model.group)
    weights = tf.cast(labels != 0, tf.float32)
    return tf.reduce_sum(losses * weights), tf.reduce_sum(weights), {"token_accuracy": tf.reduce_sum(correct * weights)}


class GreedyDecoder:
    """Greedy translation of id batches. Every rank of a tensor group must decode the same
    batch at the same time: the argmax over the split vocabulary is a collective."""

    def __init__(self, model: Seq2SeqTransformer, bos: int, eos: int):
        self.model, self.bos, self.eos = model, bos, eos
        self._encode = tf.function(lambda source: model.encode(source))
        self._next_ids = tf.function(self._next_ids_at)

    def _next_ids_at(self, tokens, memory, source, t):
        logits = self.model.decode(tokens, memory, source)
        return vocab_parallel_argmax(tf.gather(logits, t, axis=1), self.model.group)

    def __call__(self, source: np.ndarray) -> list[list[int]]:
        """Output ids of each source row, without bos and eos."""
        memory = self._encode(tf.constant(source))
        tokens = np.zeros_like(source)
        tokens[:, 0] = self.bos
        outputs = np.zeros_like(source)
        for t in range(source.shape[1]):
            outputs[:, t] = self._next_ids(tf.constant(tokens), memory, tf.constant(source), tf.constant(t)).numpy()
            if t + 1 < source.shape[1]:
                tokens[:, t + 1] = outputs[:, t]
            if (outputs[:, :t + 1] == self.eos).any(axis=1).all():
                break
        return [list(row[:list(row).index(self.eos)]) if self.eos in row else list(row) for row in outputs]
