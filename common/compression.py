"""Gradient codecs: how (already normalised) gradients cross the wire, on every plan's gradient path.

`codec.sum(grads, group)` is the sum over the data-parallel group of every replica's (mean-
sized, so narrower floats stay in range) `grads`, through what the codec sends; every replica
gets the same result. `make_codec(spec)` takes `--compression`: none (float32 all-reduce),
fp16, bf16, topk:F and powersgd:R (with error feedback: what a replica did not send, its
residual, is added to what it sends next, so it is delayed, never lost; the residuals are
each replica's own `replica_state`, which checkpoints keep per replica). Compressing each
replica's optimizer *update* instead (`topk_updates:F`) is another step: `common.compressed_updates`.
`wire_bytes(shapes)` is what one replica sends per step, against `float32_bytes(shapes)`.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from common.config import parse_compression
from common.errors import ConfigError
from common.plans.tensor import mark_split, split_axis
from common.state import variable_names

Shape = Sequence[int]


def float32_bytes(shapes: Sequence[Shape]) -> int:
    """Bytes of the gradients as one uncompressed float32 all-reduce."""
    return 4 * sum(_size(shape) for shape in shapes)


def _size(shape: Shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def flatten(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def unflatten(flat: tf.Tensor, like: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    parts = tf.split(flat, [_size(t.shape) for t in like])
    return [tf.reshape(part, t.shape) for part, t in zip(parts, like)]


def gathered_bfloat16(values: tf.Tensor, group) -> tf.Tensor:
    """Every member's bfloat16 `values`, stacked in group order; Horovod 0.28.1's all-gather
    moves them as their int16 bit patterns."""
    return tf.bitcast(group.gather(tf.bitcast(values, tf.int16)[tf.newaxis]), tf.bfloat16)


class Codec:
    """Full-precision sum in one fused all-reduce (`--compression=none`)."""

    spec = "none"
    needs_horovod = False  # gathers or per-replica state: MirroredStrategy replicas share one process

    def build(self, variables: Sequence[tf.Variable], dist) -> None:
        """Check the backend and create any state; call once, outside tf.function."""
        if self.needs_horovod and dist.backend != "horovod":
            raise ConfigError(f"--compression={self.spec} needs --backend=horovod")

    def replica_state(self) -> dict[str, tf.Variable]:
        """{name: variable} of the state each replica holds its own value of."""
        return {}

    def sum(self, grads: Sequence[tf.Tensor], group) -> list[tf.Tensor]:
        return group.sum(grads)

    def wire_bytes(self, shapes: Sequence[Shape]) -> int:
        return float32_bytes(shapes)


class CastCodec(Codec):
    """Send floating-point gradients in a narrower float type, sum, cast back."""

    def __init__(self, wire_dtype: tf.DType):
        self.wire_dtype = wire_dtype
        self.spec = {tf.float16: "fp16", tf.bfloat16: "bf16"}[wire_dtype]

    def sum(self, grads, group):
        wire = [tf.cast(g, self.wire_dtype) for g in grads]
        return [tf.cast(s, g.dtype) for s, g in zip(group.sum(wire), grads)]

    def wire_bytes(self, shapes):
        return float32_bytes(shapes) * self.wire_dtype.size // 4


class Bfloat16Codec(CastCodec):
    """bfloat16 on the wire. Horovod's all-reduce does not take bfloat16, so every replica's
    gradients are all-gathered as their bit patterns and summed in float32 in replica order
    (the same bits on every rank). The gather receives (N-1)/N x 2 bytes per entry more than a
    ring all-reduce as N grows: prefer fp16 for many replicas."""

    needs_horovod = True

    def __init__(self):
        super().__init__(tf.bfloat16)

    def sum(self, grads, group):
        gathered = tf.cast(gathered_bfloat16(tf.cast(flatten(grads), tf.bfloat16), group), tf.float32)
        total = tf.add_n(tf.unstack(gathered, num=group.size))
        return [tf.cast(s, g.dtype) for s, g in zip(unflatten(total, grads), grads)]


class ErrorFeedback(Codec):
    """What a replica did not send of a tensor (its residual) is added to what it sends of that
    tensor next, so nothing is lost, only delayed. `state_kind` names the residuals in checkpoints."""

    needs_horovod = True
    state_kind = "unsent_gradients"
    residuals: list[tf.Variable] | None = None

    def build(self, variables, dist):
        super().build(variables, dist)
        self.residuals = [mark_split(tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name="residual"),
                                     split_axis(v)) for v in variables]
        self.names = [f"{self.state_kind}/{name}" for name in variable_names(variables)]
        self.is_split = [split_axis(v) is not None for v in variables]

    def replica_state(self):
        return dict(zip(self.names, self.residuals)) if self.residuals else {}

    def corrected(self, grads) -> list[tf.Tensor]:
        return [g + r for g, r in zip(grads, self.residuals)]


class TopKCodec(ErrorFeedback):
    """Each replica sends the largest fraction of all its matrices' entries together, as int32
    indices and bfloat16 values (6 bytes an entry; what rounding drops stays in the residual),
    scattered back in replica order, so every rank gets the same bits. One selection lets the
    matrices whose gradients add up fastest send more; the matrices every tensor rank holds
    whole are picked apart from split ones, so identical gradients give identical picks.
    Vectors (few entries each, which a fraction would leave waiting) ride whole."""

    ENTRY_BYTES = 4 + 2  # an int32 index and a bfloat16 value

    def __init__(self, fraction: float):
        self.fraction = fraction
        self.spec = f"topk:{fraction:g}"

    def kept(self, shape: Shape) -> int:
        """How many entries of a `shape` matrix are sent."""
        return min(_size(shape), max(1, math.ceil(self.fraction * _size(shape))))

    def sum(self, grads, group):
        corrected = self.corrected(grads)
        whole = [i for i, g in enumerate(grads) if len(g.shape) < 2]
        results = dict(zip(whole, group.sum([corrected[i] for i in whole]) if whole else []))
        for split in (False, True):
            sparse = [i for i, g in enumerate(grads) if len(g.shape) >= 2 and self.is_split[i] == split]
            if sparse:
                sums = self._sparse_sum([corrected[i] for i in sparse], [self.residuals[i] for i in sparse], group)
                results.update(zip(sparse, sums))
        return [results[i] for i in range(len(grads))]

    def _sparse_sum(self, tensors, residuals, group) -> list[tf.Tensor]:
        flat = flatten(tensors)  # indices run over all the matrices, end to end
        picked = tf.math.top_k(tf.abs(flat), sum(self.kept(t.shape) for t in tensors)).indices
        values = tf.gather(flat, picked)
        wire = tf.cast(values, tf.bfloat16)
        # What rounding to bfloat16 drops stays in the residual, like the entries not picked.
        unsent = tf.tensor_scatter_nd_update(flat, picked[:, tf.newaxis], values - tf.cast(wire, values.dtype))
        for residual, part in zip(residuals, unflatten(unsent, tensors)):
            residual.assign(part)
        all_indices = group.gather(picked[tf.newaxis])
        all_values = tf.cast(tf.reshape(gathered_bfloat16(wire, group), [-1]), values.dtype)
        # Adds in the order gathered (replica by replica): the same bits on every rank.
        total = tf.math.unsorted_segment_sum(all_values, tf.reshape(all_indices, [-1]), flat.shape[0])
        return unflatten(total, tensors)

    def wire_bytes(self, shapes):
        # ENTRY_BYTES per entry sent from a matrix; vectors whole in float32.
        return sum(self.ENTRY_BYTES * self.kept(shape) if len(shape) >= 2 else 4 * _size(shape)
                   for shape in shapes)


class PowerSGDCodec(ErrorFeedback):
    """Rank-R PowerSGD: each matrix M (the gradient plus residual, as 2-D) is sent as
    P = M Q, summed, orthonormalised, then Q = M^T P, summed; the sum of the replicas' M is
    about P Q^T. Q is kept from the previous step (warm start), so one power iteration per
    step tracks the gradient's leading subspace; a resume starts it again from its seeded
    value. Tensors too small to gain (vectors, tiny matrices) ride uncompressed in the first
    all-reduce. Two all-reduces per step."""

    def __init__(self, rank: int):
        self.rank = rank
        self.spec = f"powersgd:{rank}"
        self.queries: list[tf.Variable | None] = []

    def matrix_view(self, shape: Shape) -> tuple[int, int] | None:
        """The squarest 2-D view of `shape` if rank-R factors of it are smaller, else None."""
        if len(shape) < 2:
            return None
        rows, cols = min(((_size(shape[:i]), _size(shape[i:])) for i in range(1, len(shape))), key=sum)
        worth_it = self.rank < min(rows, cols) and (rows + cols) * self.rank < rows * cols
        return (rows, cols) if worth_it else None

    def build(self, variables, dist):
        super().build(variables, dist)
        views = [self.matrix_view(v.shape) for v in variables]
        self.queries = [None if view is None else self._initial_query(index, view[1], v.dtype)
                        for index, (v, view) in enumerate(zip(variables, views))]

    def _initial_query(self, index: int, cols: int, dtype) -> tf.Variable:
        """Random, seeded by the tensor's index: every replica starts from the same Q with no
        collective, and reruns start from the same Q (deterministic runs stay deterministic)."""
        start = np.random.default_rng(index).standard_normal((cols, self.rank))
        return tf.Variable(tf.constant(start, dtype), trainable=False, name="powersgd_q")

    def sum(self, grads, group):
        corrected = self.corrected(grads)
        compressed = [i for i, q in enumerate(self.queries) if q is not None]
        plain = [i for i, q in enumerate(self.queries) if q is None]
        matrices = {i: tf.reshape(corrected[i], [-1, self.queries[i].shape[0]]) for i in compressed}
        summed = group.sum([matrices[i] @ self.queries[i] for i in compressed] + [corrected[i] for i in plain])
        bases = [tf.linalg.qr(p)[0] for p in summed[:len(compressed)]]
        queries = group.sum([tf.transpose(matrices[i]) @ p for i, p in zip(compressed, bases)])
        results = dict(zip(plain, summed[len(compressed):]))
        for i, p, q in zip(compressed, bases, queries):
            approx = p @ tf.transpose(q)
            # This replica's share of what was not sent: the residuals sum to sum(M) - P Q^T.
            self.residuals[i].assign(tf.reshape(matrices[i] - approx / group.size, grads[i].shape))
            self.queries[i].assign(q)
            results[i] = tf.reshape(approx, grads[i].shape)
        return [results[i] for i in range(len(grads))]

    def wire_bytes(self, shapes):
        views = [(shape, self.matrix_view(shape)) for shape in shapes]
        return 4 * sum(_size(shape) if view is None else sum(view) * self.rank for shape, view in views)


def make_codec(spec: str) -> Codec:
    """The gradient codec `--compression=spec` names (see the module docstring)."""
    name, arg = parse_compression(spec)
    if name == "topk_updates":
        raise ConfigError("--compression=topk_updates compresses optimizer updates, not gradients: "
                          "its step is common.compressed_updates.make_train_step")
    return {"none": Codec, "fp16": lambda: CastCodec(tf.float16), "bf16": Bfloat16Codec,
            "topk": lambda: TopKCodec(arg), "powersgd": lambda: PowerSGDCodec(arg)}[name]()
