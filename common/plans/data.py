"""Data parallelism: every replica holds the whole model and a share of the global batch.

Gradients are averaged by *global* weight (examples or non-padding tokens): each replica
differentiates the sum of its per-token losses, and the gradients are divided by the count
summed over the replicas, then summed in one fused all-reduce. Padding never skews the
average, and N replicas compute the update of one process on the same global batch.
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


def split_micro_batches(batch, count: int) -> list:
    """Each tensor of `batch` cut into `count` equal parts: [micro-batch 0, 1, ...]."""
    pieces = [tf.split(t, count) for t in tf.nest.flatten(batch)]
    return [tf.nest.pack_sequence_as(batch, [p[i] for p in pieces]) for i in range(count)]


def clip_by_global_norm(grads, max_norm: float, variables, dist):
    """Scale gradients to a global norm of at most `max_norm`, where the norm is the one-process
    model's: split weights' squares are summed over the tensor group, and every stage's over
    the pipeline group (replicated weights count once)."""
    is_split = [split_axis(v) is not None for v in variables]

    def squares(flags):
        return tf.add_n([tf.reduce_sum(tf.square(g)) for g, f in zip(grads, flags) if f] or [tf.constant(0.0)])
    # Named: pipeline stages trace different graphs, where default names would differ.
    split_sq = dist.tensor.sum([squares(is_split)], name="clip_split_squares")[0]
    total_sq = dist.pipeline.sum([split_sq + squares([not f for f in is_split])], name="clip_all_squares")[0]
    scale = tf.minimum(1.0, max_norm / tf.maximum(tf.sqrt(total_sq), 1e-12))
    return [g * scale for g in grads]


def make_clip(max_norm: float, variables, dist) -> Callable[[list], list]:
    """Gradients -> gradients clipped to global norm `max_norm` (unchanged where it is 0)."""
    return lambda grads: clip_by_global_norm(grads, max_norm, variables, dist) if max_norm else grads


def accumulated_grads(model, loss_sums: LossSums, micro_batches, variables):
    """The gradients of the summed loss over `micro_batches`, and their summed loss, count and metrics."""
    # From zeros: adding densifies embedding gradients (IndexedSlices), which the collectives,
    # codecs and clipping all expect.
    grads = [tf.zeros_like(v) for v in variables]
    totals = None
    for micro_batch in micro_batches:
        with tf.GradientTape() as tape:
            loss_sum, count, metric_sums = loss_sums(model, micro_batch, True)
        grads = [g + s for g, s in zip(grads, tape.gradient(loss_sum, variables))]
        sums = {"loss": loss_sum, "count": count, **metric_sums}
        totals = sums if totals is None else {k: totals[k] + v for k, v in sums.items()}
    return grads, totals


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
    micro-batches, divided by the global count, summed over the replicas through the codec of
    --compression, clipped to --clip_norm; the update runs once, outside the replicas."""
    config, dist = run.config, run.dist
    variables = model.trainable_variables
    build_slots(optimizer, variables, dist)
    codec = make_codec(config.compression)
    codec.build(variables, dist)
    clip = make_clip(config.clip_norm, variables, dist)

    def replica_step(batch):
        grads, local_sums = accumulated_grads(model, loss_sums, split_micro_batches(batch, config.accum_steps),
                                              variables)
        # The counts depend on the batch only, so this reduction overlaps the backward pass.
        scale, metrics = global_means(local_sums, dist.data)
        grads = clip(codec.sum([g * tf.cast(scale, g.dtype) for g in grads], dist.data))
        return grads, metrics

    @tf.function
    def train_step(batch):
        grads, metrics = dist.run_step(replica_step, batch)
        optimizer.apply(grads, variables)
        return metrics

    shapes = [v.shape for v in variables]
    return Step(train_step, codec.wire_bytes(shapes), float32_bytes(shapes), codec.replica_state())
