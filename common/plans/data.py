"""Data parallelism: every replica holds the whole model and a share of the global batch.

Gradients are averaged by *global* weight (examples or non-padding tokens): each replica
differentiates the sum of its per-token losses, the counts are summed across replicas, and
the gradients are divided by the global count and summed in one fused all-reduce. Padding
therefore never skews the average, and a run on N replicas computes the same update as one
process on the same global batch. Gradient accumulation keeps sums over micro-batches and
divides once.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import keras
import tensorflow as tf

from common.compression import NoCompression
from common.dist import Dist
from common.errors import ConfigError

# loss_sums(model, batch, training) -> (sum of per-item losses, number of items, metric sums)
LossSums = Callable[[keras.Model, Any, bool], tuple[tf.Tensor, tf.Tensor, dict[str, tf.Tensor]]]


def per_replica_batch_size(global_batch_size: int, num_replicas: int, accum_steps: int) -> int:
    """Examples each replica feeds per micro-batch; the split must be exact."""
    parts = num_replicas * accum_steps
    if global_batch_size % parts:
        raise ConfigError(
            f"--global_batch_size={global_batch_size} does not divide into {num_replicas} "
            f"data-parallel ranks x {accum_steps} accumulation steps: use a multiple of {parts}")
    return global_batch_size // parts


def scaled_lr(lr: float, global_batch_size: int, reference_batch: int, rule: str) -> float:
    """The linear (Goyal et al.) or square-root scaling rule, relative to a reference batch;
    it depends on the global batch only, so changing the process count changes nothing."""
    ratio = global_batch_size / reference_batch
    return {"none": lr, "linear": lr * ratio, "sqrt": lr * math.sqrt(ratio)}[rule]


@keras.saving.register_keras_serializable(package="recipes")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, then cosine decay to `peak * final_fraction` at `total_steps`."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, final_fraction: float = 0.1):
        self.peak, self.warmup_steps, self.total_steps = peak, warmup_steps, total_steps
        self.final_fraction = final_fraction

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.peak * (step + 1.0) / max(1, self.warmup_steps)
        progress = tf.minimum(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        final = self.peak * self.final_fraction
        decayed = final + (self.peak - final) * 0.5 * (1.0 + tf.cos(math.pi * progress))
        return tf.where(step < self.warmup_steps, warm, decayed)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "final_fraction": self.final_fraction}


def broadcast_initial_state(dist: Dist, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
    """Horovod: start every rank from rank 0's weights and optimizer state (built already)."""
    dist.broadcast_variables(list(model.variables) + list(optimizer.variables))


def _accumulated_grads(model, loss_sums: LossSums, micro_batches, variables):
    grads = [tf.zeros_like(v) for v in variables]
    totals = None
    for micro_batch in micro_batches:
        with tf.GradientTape() as tape:
            loss_sum, count, metric_sums = loss_sums(model, micro_batch, True)
        step_grads = tape.gradient(loss_sum, variables)
        grads = [g + s for g, s in zip(grads, step_grads)]
        sums = {"loss": loss_sum, "count": count, **metric_sums}
        totals = sums if totals is None else {k: totals[k] + v for k, v in sums.items()}
    return grads, totals


def make_train_step(dist: Dist, model: keras.Model, optimizer: keras.optimizers.Optimizer,
                    loss_sums: LossSums, accum_steps: int = 1,
                    compressor: NoCompression = NoCompression()) -> Callable[[Any], dict[str, tf.Tensor]]:
    """A compiled step: local batch in, global metrics out ({"loss", "count", ...} averaged
    over the global count, except "count" itself)."""
    variables = model.trainable_variables

    def replica_step(batch):
        micro_batches = [tf.nest.map_structure(lambda t: tf.split(t, accum_steps)[i], batch)
                         for i in range(accum_steps)]
        grads, local_sums = _accumulated_grads(model, loss_sums, micro_batches, variables)
        names = sorted(local_sums)
        # The counts depend on the batch only, so this reduction overlaps the backward pass.
        global_sums = dict(zip(names, dist.sum_across_replicas([local_sums[k] for k in names])))
        scale = 1.0 / tf.maximum(global_sums["count"], 1.0)
        wire = compressor.compress([g * tf.cast(scale, g.dtype) for g in grads])
        grads = compressor.decompress(dist.sum_across_replicas(wire), grads)
        metrics = {k: v * scale for k, v in global_sums.items() if k != "count"}
        return grads, {**metrics, "count": global_sums["count"]}

    @tf.function
    def train_step(batch):
        grads, metrics = dist.run_step(replica_step, batch)
        # Applied once, outside the replicas: the gradients are already global.
        optimizer.apply(grads, variables)
        return metrics

    return train_step


def make_eval_step(dist: Dist, model: keras.Model, loss_sums: LossSums) -> Callable[[Any], dict[str, tf.Tensor]]:
    """Global metric sums for one local batch (forward only)."""
    def replica_step(batch):
        loss_sum, count, metric_sums = loss_sums(model, batch, False)
        sums = {"loss": loss_sum, "count": count, **metric_sums}
        names = sorted(sums)
        return dict(zip(names, dist.sum_across_replicas([sums[k] for k in names])))

    return tf.function(lambda batch: dist.run_step(replica_step, batch))
