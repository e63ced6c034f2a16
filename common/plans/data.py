"""Data parallelism: every replica holds the whole model and a share of the global batch.

Gradients are averaged by *global* weight (examples or non-padding tokens): each replica
differentiates the sum of its per-token losses, and the gradients are divided by the count
summed over the replicas, then summed in one fused all-reduce. Padding never skews the
average, and N replicas compute the update of one process on the same global batch.

Tables marked `mark_sparse` (embeddings of which a step touches a few rows) are summed as
rows on Horovod: every replica's looked-up rows (a tf.IndexedSlices, scaled like the rest)
are all-gathered with their indices, and rows of the same index added, so the optimizer gets
the exact global gradient of the touched rows (Keras 3 optimizers take IndexedSlices). The
rows travel in float32 whatever --compression; the codec compresses the other gradients.
Under MirroredStrategy they are dense like the rest.
"""
from __future__ import annotations

from typing import Any, Callable

import keras
import tensorflow as tf

from common.compression import float32_bytes, make_codec
from common.optimizers import build_slots
from common.plans.tensor import split_axis
from common.step import Step

# loss_sums(model, batch, training) -> (sum of per-item losses, number of items, metric sums)
LossSums = Callable[[Any, Any, bool], tuple[tf.Tensor, tf.Tensor, dict[str, tf.Tensor]]]


def mark_sparse(variable):
    """Record on `variable` that the data plan sums its gradient as rows (see the module docstring)."""
    variable.sparse_rows = True
    return variable


def is_sparse(variable) -> bool:
    return getattr(variable, "sparse_rows", False)


def scaled(grad, factor):
    """`grad` (a tensor or tf.IndexedSlices) times the scalar `factor`."""
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(grad.values * tf.cast(factor, grad.values.dtype), grad.indices, grad.dense_shape)
    return grad * tf.cast(factor, grad.dtype)


def as_rows(grad) -> tf.IndexedSlices:
    """`grad` as tf.IndexedSlices (a dense gradient as all its rows)."""
    if isinstance(grad, tf.IndexedSlices):
        return grad
    return tf.IndexedSlices(grad, tf.range(tf.shape(grad)[0]), tf.shape(grad, out_type=tf.int64))


def merged_rows(rows: tf.IndexedSlices) -> tf.IndexedSlices:
    """`rows` with the rows of each index added into one (in first-seen order): the global
    norm and Adam's squares must see the gradient, not its parts."""
    unique, positions = tf.unique(rows.indices)
    return tf.IndexedSlices(tf.math.unsorted_segment_sum(rows.values, positions, tf.size(unique)), unique,
                            rows.dense_shape)


def rows_bytes(rows: tf.IndexedSlices) -> int:
    """What sending `rows` costs: its values and its indices (static shapes, known when traced)."""
    return sum(t.shape.num_elements() * t.dtype.size for t in (rows.values, rows.indices))


def split_micro_batches(batch, count: int) -> list:
    """Each tensor of `batch` cut into `count` equal parts: [micro-batch 0, 1, ...]."""
    pieces = [tf.split(t, count) for t in tf.nest.flatten(batch)]
    return [tf.nest.pack_sequence_as(batch, [p[i] for p in pieces]) for i in range(count)]


def clip_by_global_norm(grads, max_norm: float, variables, dist):
    """Scale gradients to a global norm of at most `max_norm`, where the norm is the one-process
    model's: split weights' squares are summed over the tensor group, and every stage's over
    the pipeline group (replicated weights count once)."""
    is_split = [split_axis(v) is not None for v in variables]

    def squares(flags):  # rows are merged: each index once
        entries = [g.values if isinstance(g, tf.IndexedSlices) else g for g, f in zip(grads, flags) if f]
        return tf.add_n([tf.reduce_sum(tf.square(e)) for e in entries] or [tf.constant(0.0)])
    # Named: pipeline stages trace different graphs, where default names would differ.
    split_sq = dist.tensor.sum([squares(is_split)], name="clip_split_squares")[0]
    total_sq = dist.pipeline.sum([split_sq + squares([not f for f in is_split])], name="clip_all_squares")[0]
    scale = tf.minimum(1.0, max_norm / tf.maximum(tf.sqrt(total_sq), 1e-12))
    return [scaled(g, scale) for g in grads]


def make_clip(max_norm: float, variables, dist) -> Callable[[list], list]:
    """Gradients -> gradients clipped to global norm `max_norm` (unchanged where it is 0)."""
    return lambda grads: clip_by_global_norm(grads, max_norm, variables, dist) if max_norm else grads


def accumulated_grads(model, loss_sums: LossSums, micro_batches, variables, rows_of=None):
    """The gradients of the summed loss over `micro_batches`, and their summed loss, count and
    metrics. Where `rows_of` (a flag per variable) is true the gradient is tf.IndexedSlices,
    the micro-batches' rows end to end; the others are dense."""
    rows_of = rows_of or [False] * len(variables)
    grads = [None] * len(variables)
    totals = None
    for micro_batch in micro_batches:
        with tf.GradientTape() as tape:
            loss_sum, count, metric_sums = loss_sums(model, micro_batch, True)
        grads = [_added(g, s, v, rows) for g, s, v, rows in zip(grads, tape.gradient(loss_sum, variables),
                                                                   variables, rows_of)]
        sums = {"loss": loss_sum, "count": count, **metric_sums}
        totals = sums if totals is None else {k: totals[k] + v for k, v in sums.items()}
    return grads, totals


def _added(total, grad, variable, rows: bool):
    if rows:
        grad = as_rows(grad)
        if total is None:
            return grad
        return tf.IndexedSlices(tf.concat([total.values, grad.values], 0), tf.concat([total.indices, grad.indices], 0),
                                grad.dense_shape)
    # From zeros: adding densifies embedding gradients (IndexedSlices), which the collectives,
    # codecs and clipping expect.
    return (tf.zeros_like(variable) if total is None else total) + grad


def global_means(local_sums: dict[str, tf.Tensor], group) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """(1 / the global count, the global means of the other sums plus the global "count"): the
    sums over `group` of every member's `local_sums`, in one collective."""
    names = sorted(local_sums)
    totals = dict(zip(names, group.sum([local_sums[k] for k in names])))
    scale = 1.0 / tf.maximum(totals["count"], 1.0)
    return scale, {**{k: v * scale for k, v in totals.items() if k != "count"}, "count": totals["count"]}


def make_train_step(run, model: keras.Model, optimizer: keras.optimizers.Optimizer, loss_sums: LossSums) -> Step:
    """The data-parallel step (with tensor-parallel layers, the data x tensor step): local batch
    in, global metrics out. Per replica: gradients of the summed loss over --accum_steps
    micro-batches, divided by the global count, summed over the replicas (through the codec of
    --compression; `mark_sparse` tables as rows), clipped to --clip_norm; the update runs once,
    outside the replicas. The step's `wire_bytes` counts the rows once it is traced."""
    config, dist = run.config, run.dist
    variables = model.trainable_variables
    build_slots(optimizer, variables, dist)
    rows_of = [is_sparse(v) and dist.backend == "horovod" for v in variables]
    coded = [v for v, rows in zip(variables, rows_of) if not rows]
    codec = make_codec(config.compression)
    codec.build(coded, dist)
    clip = make_clip(config.clip_norm, variables, dist)
    coded_shapes = [v.shape for v in coded]

    def replica_step(batch):
        grads, local_sums = accumulated_grads(model, loss_sums, split_micro_batches(batch, config.accum_steps),
                                              variables, rows_of)
        # The counts depend on the batch only, so this reduction overlaps the backward pass.
        scale, metrics = global_means(local_sums, dist.data)
        grads = [scaled(g, scale) for g in grads]
        sparse = [g for g, rows in zip(grads, rows_of) if rows]
        step.wire_bytes = codec.wire_bytes(coded_shapes) + sum(map(rows_bytes, sparse))
        summed = iter(codec.sum([g for g, rows in zip(grads, rows_of) if not rows], dist.data) if coded else [])
        summed_rows = iter(map(merged_rows, dist.data.gather_rows(sparse)) if sparse else [])
        return clip([next(summed_rows) if rows else next(summed) for rows in rows_of]), metrics

    @tf.function
    def train_step(batch):
        grads, metrics = dist.run_step(replica_step, batch)
        optimizer.apply(grads, variables)
        return metrics

    shapes = [v.shape for v in variables]
    step = Step(train_step, codec.wire_bytes(coded_shapes), float32_bytes(shapes), codec.replica_state())
    return step
