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

from common.config import TransformerConfig
from common.dist import Group
from common.plans.tensor import (ColumnParallelDense, ParallelAttention, ParallelMLP, VocabParallelEmbedding,
                                 vocab_parallel_argmax, vocab_parallel_cross_entropy)


# The embedding and output rows are padded to this multiple, the same for every plan, so that
# any tensor degree dividing it splits the vocabulary evenly (padding ids never occur).
VOCAB_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class TransformerSize:
    vocab_size: int
    max_len: int
    width: int
    heads: int
    layers: int
    ff_dim: int
    dropout: float = 0.0

    @classmethod
    def of(cls, config: TransformerConfig, vocab_size: int, max_len: int) -> "TransformerSize":
        """The size `config`'s flags give, the vocabulary padded to a multiple of VOCAB_MULTIPLE."""
        dropout = 0.0 if config.deterministic else config.dropout  # masks depend on how the batch is split
        padded_vocab = -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        return cls(padded_vocab, max_len, config.d_model, config.heads, config.layers, config.ff_dim, dropout)


def embed(model, ids, training):
    """Token embeddings, scaled by the root of the width, plus learned positions, with dropout."""
    positions = model.positions(tf.range(tf.shape(ids)[1]))[None]
    return model.drop(model.embedding(ids) * (model.size.width ** 0.5) + positions, training=training)


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
    """A (source, target) batch in; out, the logits of this rank's vocabulary range that predict
    target[:, 1:], the target without its last token as decoder input."""

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

    def call(self, batch, training=False):
        source, target = batch
        target_in = target[:, :-1]
        x, mask = embed(self, source, training), padding_mask(source, source)
        for block in self.encoder_blocks:
            x = block(x, mask, training=training)
        memory = self.encoder_norm(x)
        y = embed(self, target_in, training)
        self_mask, cross_mask = padding_mask(target_in, target_in, causal=True), padding_mask(target_in, source)
        for block in self.decoder_blocks:
            y = block(y, self_mask, memory, cross_mask, training=training)
        return self.logits(self.decoder_norm(y))


def build_transformer(size: TransformerSize, group: Group) -> Seq2SeqTransformer:
    model = Seq2SeqTransformer(size, group, name="transformer")
    # Create the weights now, in a fixed order: the same draws in every plan.
    model((tf.zeros((1, size.max_len), tf.int32), tf.zeros((1, size.max_len + 1), tf.int32)))
    return model


def token_loss_sums(logits, labels, group: Group):
    """Summed token cross-entropy and correct tokens over the non-padding labels, from logits
    whose vocabulary is split over `group`."""
    losses, correct = vocab_parallel_cross_entropy(logits, labels, group)
    weights = tf.cast(labels != 0, tf.float32)
    return tf.reduce_sum(losses * weights), tf.reduce_sum(weights), {"token_accuracy": tf.reduce_sum(correct * weights)}


def token_loss(group: Group):
    """The `loss_sums` of a Seq2SeqTransformer or a CausalLM (or its last pipeline stage) whose
    vocabulary is split over `group`: `token_loss_sums` of target[:, 1:]."""
    def loss_sums(model, batch, training):
        return token_loss_sums(model(batch, training=training), batch[1][:, 1:], group)
    return loss_sums


def greedy_decode(forward, group: Group, source: np.ndarray, length: int, bos: int, eos: int) -> list[list[int]]:
    """Greedy decoding of up to `length` ids after each source row, through `forward(batch, head)`
    of the plan (`plans.pipeline.make_forward`) on (source, target) batches; every rank of a
    tensor or pipeline group calls it alike (the argmax over the split vocabulary is a
    collective). It stops once every row has an eos; returns each row's ids without bos and eos."""
    tokens = np.zeros((len(source), length + 1), np.int32)
    tokens[:, 0] = bos
    source = tf.constant(source)
    for t in range(length):
        next_ids = forward((source, tf.constant(tokens)), lambda logits: vocab_parallel_argmax(logits[:, t], group))
        tokens[:, t + 1] = next_ids.numpy()
        if (tokens[:, 1:t + 2] == eos).any(axis=1).all():
            break
    return [list(row[1:list(row).index(eos)]) if eos in row else list(row[1:]) for row in tokens]


# ------------------------------------------------------------------ decoder-only (prefix) LM
class CausalLM(keras.Model):
    """A decoder-only Transformer over [document; summary]: attention is causal over the whole
    sequence, the loss covers the summary tokens only. Called on a (document, summary) batch;
    with `source_len` 0 (an empty document) it is a plain language model over the summary.
    Pipeline plans cut it into stages of consecutive blocks (`stage`, `plans.pipeline.cut`);
    other plans may `recompute` each block's forward in the backward pass (`recomputed`)."""

    first = last = True

    def __init__(self, size: TransformerSize, group: Group, source_len: int, recompute: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.size, self.group, self.source_len, self.recompute = size, group, source_len, recompute
        self.embedding = VocabParallelEmbedding(size.vocab_size, size.width, group, name="embedding")
        self.positions = keras.layers.Embedding(size.max_len, size.width, name="positions")
        self.blocks = [Block(size, group, cross=False, name=f"block_{i}") for i in range(size.layers)]
        self.final_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")
        self.logits = ColumnParallelDense(size.vocab_size, group, name="logits")
        self.drop = keras.layers.Dropout(size.dropout)

    def call(self, batch, incoming=None, training=False):
        return lm_forward(self, batch, incoming, training)

    def activation_shape(self, rows: int) -> tuple[int, int, int]:
        """The shape of what one block passes to the next."""
        return rows, self.size.max_len, self.size.width

    def stage(self, blocks: range, first: bool, last: bool) -> "LMStage":
        """A pipeline stage of these blocks, its weights built (they are the LM's)."""
        stage = LMStage(self, blocks, first, last, name=self.name)
        rows = 1
        batch = (tf.zeros((rows, self.source_len), tf.int32), tf.zeros((rows, self.size.max_len - self.source_len + 1),
                                                                        tf.int32))
        stage(batch, None if first else tf.zeros(self.activation_shape(rows)))
        return stage


class LMStage(keras.Model):
    """Consecutive blocks of a CausalLM, plus the embedding on the first stage and the output
    head on the last. It shares the LM's layers, so weight paths stay the LM's."""

    def __init__(self, lm: CausalLM, blocks: range, first: bool, last: bool, **kwargs):
        super().__init__(**kwargs)
        self.size, self.group, self.source_len = lm.size, lm.group, lm.source_len
        self.recompute = False  # the pipeline plan recomputes whole stages (`plans.pipeline`)
        self.first, self.last = first, last
        self.embedding, self.positions, self.drop = (lm.embedding, lm.positions, lm.drop) if first else (None,) * 3
        self.final_norm, self.logits = (lm.final_norm, lm.logits) if last else (None, None)
        self.blocks = [lm.blocks[i] for i in blocks]
        self.activation_shape = lm.activation_shape

    def call(self, batch, incoming=None, training=False):
        return lm_forward(self, batch, incoming, training)


def lm_forward(part, batch, x, training):
    """Run a CausalLM or one stage of it on a (document, summary) batch. The model reads
    [document; summary without its last token] (every stage needs the ids for the mask); `x`
    is the previous stage's output (None on the first stage). Returns activations in float32
    (what pipeline stages send), or on the last stage the float32 logits of the summary
    positions (under a bfloat16 dtype policy the blocks compute in bfloat16, the loss does not)."""
    source, target = batch
    ids = tf.concat([source, target[:, :-1]], axis=1)
    if part.first:
        x = embed(part, ids, training)
    mask = padding_mask(ids, ids, causal=True)
    for block in part.blocks:
        x = recomputed(block, mask, training)(x) if part.recompute and training else block(x, mask, training=training)
    if part.last:
        return tf.cast(part.logits(part.final_norm(x[:, part.source_len:])), tf.float32)
    return tf.cast(x, tf.float32)


def recomputed(block: Block, mask: tf.Tensor, training: bool):
    """`block` on one input, keeping none of its inner activations for the backward pass, which
    runs its forward again (`tf.recompute_grad`): a block's memory is then its input alone. The
    forward draws new dropout masks when it runs again: use it without dropout."""
    return tf.recompute_grad(lambda x: block(x, mask, training=training))


def sequence_loss_sums(logits, labels, group: Group) -> tf.Tensor:
    """Per row, the summed token cross-entropy over the non-padding labels, from logits whose
    vocabulary is split over `group` (held-out perplexity: exp of the total over the count)."""
    losses, _ = vocab_parallel_cross_entropy(logits, labels, group)
    return tf.reduce_sum(losses * tf.cast(labels != 0, losses.dtype), axis=-1)


def sample_next(logits: tf.Tensor, group: Group, noise: np.ndarray, temperature: float, top_k: int) -> tf.Tensor:
    """Sampled ids, one per row, from vocabulary-split logits [rows, local vocabulary]: the
    Gumbel-max trick (argmax of logits / temperature + Gumbel noise is a draw from the
    softmax), among the `top_k` largest logits of the whole vocabulary (0: all). `noise`
    [rows, full vocabulary] is the same on every rank, so every plan draws the same ids."""
    local = logits.shape[-1]
    scaled = logits / temperature + noise[:, group.index * local:(group.index + 1) * local]
    if top_k:
        # Every rank's top-k, gathered: the k-th largest of them is the whole vocabulary's.
        candidates = tf.transpose(group.gather(tf.transpose(tf.math.top_k(logits, min(top_k, local)).values)))
        threshold = tf.math.top_k(candidates, top_k).values[:, -1:]
        scaled = tf.where(logits >= threshold, scaled, tf.constant(-np.inf, scaled.dtype))
    return vocab_parallel_argmax(scaled, group)


def sample_continuations(forward, size: TransformerSize, group: Group, prompts: np.ndarray, length: int, *,
                         temperature: float, top_k: int, seed: int) -> list[list[int]]:
    """`length` ids sampled after each prompt row (`sample_next`), through `forward(batch, head)`
    of the plan (`plans.pipeline.make_forward`) on (empty prefix, tokens) batches of a CausalLM
    of `size` whose source is empty; every rank of a tensor or pipeline group calls it alike.
    The draws depend on `seed` only. Returns each row's sampled ids."""
    rows, prompt_len = prompts.shape
    if prompt_len + length > size.max_len:
        raise ValueError(f"{prompt_len} prompt and {length} sampled ids exceed the model's {size.max_len} positions")
    tokens = np.zeros((rows, size.max_len + 1), np.int32)  # the pipeline's activations have the full length
    tokens[:, :prompt_len] = prompts
    prefix, generator = tf.zeros((rows, 0), tf.int32), np.random.default_rng(seed)
    for t in range(prompt_len - 1, prompt_len - 1 + length):
        noise = tf.constant(generator.gumbel(size=(rows, size.vocab_size)), tf.float32)
        next_ids = forward((prefix, tf.constant(tokens)),
                           lambda logits: sample_next(logits[:, t], group, noise, temperature, top_k))
        tokens[:, t + 1] = next_ids.numpy()
    return [list(row[prompt_len:prompt_len + length]) for row in tokens]
