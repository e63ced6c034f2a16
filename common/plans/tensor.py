"""Tensor (model) parallelism, Megatron-style, over one Horovod process set.

Two conjugate operators carry every split layer (Megatron-LM's f and g):
- `copy_to_group`: identity forward, sum over the group backward: where a replicated
  activation enters a column-split layer, each rank's gradient holds only its columns' share;
- `sum_over_group`: sum forward, identity backward: where a row-split layer's partial
  products leave it.
Both are written with `tf.custom_gradient`, so Horovod's own registered gradient for its
all-reduce (another all-reduce) is never used in their place.

A group of one makes these plain layers. Every rank draws the *full* initial weight with the
seeded initializer and keeps its slice: a split model starts from the one-process weights.
A weight records the axis it is split along (`SHARD_AXES`) when created, and so do its
optimizer slots and residuals (`split_axis`): checkpoints and clipping read it.
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf

from common.dist import Group


def summed(x: tf.Tensor, group: Group) -> tf.Tensor:
    """`x` summed over `group`; bfloat16 (mixed precision) is summed in float32, as Horovod's
    collectives take no bfloat16."""
    if x.dtype == tf.bfloat16:
        return tf.cast(group.sum([tf.cast(x, tf.float32)])[0], tf.bfloat16)
    return group.sum([x])[0]


def copy_to_group(x: tf.Tensor, group: Group) -> tf.Tensor:
    if group.size == 1:
        return x

    @tf.custom_gradient
    def forward(x):
        return tf.identity(x), lambda dy: summed(dy, group)

    return forward(x)


def sum_over_group(x: tf.Tensor, group: Group) -> tf.Tensor:
    if group.size == 1:
        return x

    @tf.custom_gradient
    def forward(x):
        return summed(x, group), tf.identity

    return forward(x)


def mark_split(variable, axis: int | None):
    """Record on `variable` the axis along which the tensor group splits it (None: not split)."""
    if axis is not None:
        variable.split_axis = axis
    return variable


def split_axis(variable) -> int | None:
    """The axis `mark_split` recorded on `variable`; None for a weight every rank holds whole."""
    return getattr(variable, "split_axis", None)


def local_slice(full: tf.Tensor, axis: int | None, group: Group) -> tf.Tensor:
    """This rank's contiguous share of `full` along `axis` (all of it when axis is None)."""
    if axis is None or group.size == 1:
        return full
    if full.shape[axis] % group.size:
        raise ValueError(f"dimension {full.shape[axis]} does not split into {group.size} parts")
    return tf.split(full, group.size, axis=axis)[group.index]


class ShardedLayer(keras.layers.Layer):
    """A layer whose weights may be split over a tensor-parallel group."""

    SHARD_AXES: dict[str, int | None] = {}

    def __init__(self, group: Group, **kwargs):
        super().__init__(**kwargs)
        self.group = group

    def add_sharded_weight(self, name: str, full_shape, initializer):
        with tf.init_scope():  # eagerly, even when Keras builds the layer inside a trace
            full = keras.initializers.get(initializer)(full_shape)  # the one-process draw
            value = local_slice(tf.convert_to_tensor(full), self.SHARD_AXES.get(name), self.group).numpy()
        weight = self.add_weight(name=name, shape=value.shape, initializer=lambda shape, dtype=None: value)
        return mark_split(weight, self.SHARD_AXES.get(name) if self.group.size > 1 else None)


class ColumnParallelDense(ShardedLayer):
    """y[:, cols of this rank] = x @ W[:, cols]; the input is replicated, the output split."""

    SHARD_AXES = {"kernel": 1, "bias": 0}

    def __init__(self, units: int, group: Group, activation=None, **kwargs):
        super().__init__(group, **kwargs)
        self.units, self.activation = units, keras.activations.get(activation)

    def build(self, input_shape):
        self.kernel = self.add_sharded_weight("kernel", (input_shape[-1], self.units), "glorot_uniform")
        self.bias = self.add_sharded_weight("bias", (self.units,), "zeros")

    def call(self, x):
        return self.activation(tf.matmul(copy_to_group(x, self.group), self.kernel) + self.bias)


class RowParallelDense(ShardedLayer):
    """y = sum over ranks of x[:, rows of this rank] @ W[rows, :] + b; input split, output replicated."""

    SHARD_AXES = {"kernel": 0, "bias": None}

    def __init__(self, units: int, group: Group, **kwargs):
        super().__init__(group, **kwargs)
        self.units = units

    def build(self, input_shape):
        full_rows = input_shape[-1] * self.group.size
        self.kernel = self.add_sharded_weight("kernel", (full_rows, self.units), "glorot_uniform")
        self.bias = self.add_sharded_weight("bias", (self.units,), "zeros")

    def call(self, x):
        return sum_over_group(tf.matmul(x, self.kernel), self.group) + self.bias


class VocabParallelEmbedding(ShardedLayer):
    """Each rank holds a contiguous range of the vocabulary's rows; a token's vector comes from
    the rank that holds it (the others contribute zeros to one sum)."""

    SHARD_AXES = {"embeddings": 0}

    def __init__(self, vocab_size: int, width: int, group: Group, **kwargs):
        super().__init__(group, **kwargs)
        self.vocab_size, self.width = vocab_size, width
        self.rows = vocab_size // group.size

    def build(self, input_shape):
        self.embeddings = self.add_sharded_weight("embeddings", (self.vocab_size, self.width),
                                                  keras.initializers.RandomUniform(-0.05, 0.05))

    def call(self, ids):
        local = ids - self.group.index * self.rows
        mine = (local >= 0) & (local < self.rows)
        vectors = tf.gather(self.embeddings, tf.where(mine, local, 0))
        return sum_over_group(vectors * tf.cast(mine, vectors.dtype)[..., None], self.group)


def vocab_parallel_cross_entropy(local_logits: tf.Tensor, labels: tf.Tensor, group: Group):
    """Per-token softmax cross-entropy and correctness over a vocabulary split across the group
    (contiguous ranges, as VocabParallelEmbedding), without any rank holding all logits: only
    the max, the sum of exponentials and the label's logit are summed over the group."""
    rows = local_logits.shape[-1]
    local_labels = labels - group.index * rows
    mine = (local_labels >= 0) & (local_labels < rows)
    one_hot = tf.one_hot(tf.where(mine, local_labels, 0), rows, dtype=local_logits.dtype) \
        * tf.cast(mine, local_logits.dtype)[..., None]
    logits_max = group.max(tf.stop_gradient(tf.reduce_max(local_logits, axis=-1)))

    @tf.custom_gradient
    def cross_entropy(local_logits):
        shifted = local_logits - logits_max[..., None]
        exp = tf.exp(shifted)
        sum_exp, label_logit = group.sum([tf.reduce_sum(exp, -1), tf.reduce_sum(shifted * one_hot, -1)])
        loss = tf.math.log(sum_exp) - label_logit

        def grad(dloss):
            return dloss[..., None] * (exp / sum_exp[..., None] - one_hot)

        return loss, grad

    loss = cross_entropy(local_logits)
    label_logit = group.sum([tf.reduce_sum(tf.stop_gradient(local_logits) * one_hot, -1)])[0]
    correct = tf.cast(label_logit >= logits_max, tf.float32)
    return loss, correct


def vocab_parallel_argmax(local_logits: tf.Tensor, group: Group) -> tf.Tensor:
    """Global argmax ids of vocabulary-split logits (for greedy decoding)."""
    rows = local_logits.shape[-1]
    local_best = tf.reduce_max(local_logits, axis=-1)
    local_ids = tf.argmax(local_logits, axis=-1, output_type=tf.int32) + group.index * rows
    best = group.max(local_best)
    # Lowest id among the ranks that hold the maximum, as a one-process argmax would pick.
    candidates = tf.where(local_best >= best, local_ids, tf.int32.max)
    return -group.max(-candidates)


class ParallelAttention(keras.layers.Layer):
    """Multi-head attention split by heads: Q, K, V column-parallel, output row-parallel."""

    def __init__(self, width: int, heads: int, group: Group, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if heads % group.size or width % heads:
            raise ValueError(f"{heads} heads of width {width} do not split over {group.size} ranks")
        self.local_heads = heads // group.size
        self.head_width = width // heads
        self.query, self.key, self.value = (ColumnParallelDense(width, group, name=n) for n in ("query", "key", "value"))
        self.output_dense = RowParallelDense(width, group, name="output")
        self.dropout = keras.layers.Dropout(dropout)

    def _heads(self, x):
        return tf.reshape(x, tf.concat([tf.shape(x)[:2], [self.local_heads, self.head_width]], 0))

    def call(self, x, memory, mask, training=False):
        q, k, v = self._heads(self.query(x)), self._heads(self.key(memory)), self._heads(self.value(memory))
        scores = tf.einsum("bthd,bshd->bhts", q, k) / math.sqrt(self.head_width)
        scores = tf.where(mask[:, None], scores, tf.constant(-1e9, scores.dtype))
        probs = self.dropout(tf.nn.softmax(scores, axis=-1), training=training)
        out = tf.einsum("bhts,bshd->bthd", probs, v)
        return self.output_dense(tf.reshape(out, tf.concat([tf.shape(out)[:2], [-1]], 0)))


class ParallelMLP(keras.layers.Layer):
    """Feed-forward block: column-parallel expansion, row-parallel projection."""

    def __init__(self, width: int, ff_dim: int, group: Group, **kwargs):
        super().__init__(**kwargs)
        self.expand = ColumnParallelDense(ff_dim, group, activation="gelu", name="expand")
        self.project = RowParallelDense(width, group, name="project")

    def call(self, x):
        return self.project(self.expand(x))
