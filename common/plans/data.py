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

from common.compression import Compressor
from common.dist import Dist
from common.errors import ConfigError
from common.plans.tensor import shard_axes

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


def split_micro_batches(batch, count: int) -> list:
    """Each tensor of `batch` cut into `count` equal parts: [micro-batch 0, 1, ...]."""
    return _split(batch, count)


def split_halves(batch) -> list:
    """`batch` cut into its first half and the rest; [batch] when it holds one example."""
    size = tf.nest.flatten(batch)[0].shape[0]
    return _split(batch, [size // 2, size - size // 2]) if size > 1 else [batch]


def _split(batch, parts) -> list:
    pieces = [tf.split(t, parts) for t in tf.nest.flatten(batch)]
    return [tf.nest.pack_sequence_as(batch, [p[i] for p in pieces]) for i in range(len(pieces[0]))]


def clip_by_global_norm(grads, max_norm: float, is_split: list[bool], dist: Dist):
    """Scale gradients to a global norm of at most `max_norm`, where the norm is the one-process
    model's: split weights' squares are summed over the tensor group, and every stage's over
    the pipeline group (replicated weights count once)."""
    def squares(flags):
        return tf.add_n([tf.reduce_sum(tf.square(g)) for g, f in zip(grads, flags) if f] or [tf.constant(0.0)])
    # Named: pipeline stages trace different graphs, where default names would differ.
    split_sq = dist.group("tensor").sum([squares(is_split)], name="clip_split_squares")[0]
    total_sq = dist.group("pipeline").sum([split_sq + squares([not f for f in is_split])], name="clip_all_squares")[0]
    scale = tf.minimum(1.0, max_norm / tf.maximum(tf.sqrt(total_sq), 1e-12))
    return [g * scale for g in grads]


def make_clip(max_norm: float, is_split: list[bool], dist: Dist) -> Callable[[list], list]:
    """Gradients -> gradients clipped to global norm `max_norm` (unchanged where it is 0)."""
    return lambda grads: clip_by_global_norm(grads, max_norm, is_split, dist) if max_norm else grads


def step_on_compressed_updates(shares, variables, optimizer, compressor: Compressor, dist: Dist, clip,
                               half_differences=None) -> None:
    """The update under an error-feedback compressor (why: `common.compression`). `shares` are
    this replica's gradients, whose sum over the replicas is the global mean gradient. Each
    replica's optimizer steps on its own share scaled up to an estimate of that mean (clipped
    per replica), then the replicas average the compressed change of the weights. Every replica
    ends with the same weights, while each optimizer's moments are its own replica's. With one
    replica and nothing dropped this is the optimizer's own step.

    Adam's second moment would see the noise of 1/N of the batch: N times the variance of the
    global gradient, so a smaller step wherever noise dominates (measured on translate, sending
    every update: -4.3% held-out token accuracy). Given `half_differences` (this replica's
    gradient over the first half of its batch minus that over the second, scaled like `shares`),
    Adam's second moment is fed an estimate of the global gradient's square instead
    (`global_square_estimates`); the same run then came out at -0.1%."""
    replicas = dist.num_replicas
    before = [tf.identity(v) for v in variables]
    estimates = [g * replicas for g in shares]
    clipped = clip(estimates)
    if half_differences is not None:  # given for Adam with more than one replica
        clip_scale = _norm(clipped) / tf.maximum(_norm(estimates), 1e-30)
        differences = [d * (replicas * clip_scale) for d in half_differences]
        _feed_second_moments(second_moments(optimizer), optimizer.beta_2, clipped,
                             global_square_estimates(clipped, differences, replicas))
    optimizer.apply(clipped, variables)
    changes = [(v - b) / replicas for v, b in zip(variables, before)]
    for variable, start, mean_change in zip(variables, before, compressor.reduce(changes, dist)):
        variable.assign(start + mean_change)


def second_moments(optimizer) -> list | None:
    """Adam's (and AdamW's) running means of squared gradients, one per variable, once built;
    None for optimizers without them (momentum SGD's update is linear in the gradient)."""
    return optimizer._velocities if isinstance(optimizer, keras.optimizers.Adam) else None


def global_square_estimates(estimates, half_differences, replicas: int) -> list[tf.Tensor]:
    """Per entry, the square of the global mean gradient as a one-process step on the whole
    batch B would see it, from one replica's estimate g of that mean (from B/N examples) and
    the difference d of its two halves' estimates, both scaled to mean size. E[g^2] =
    mu^2 + N s^2/B and E[d^2] = N s^2/B, so g^2 - (N-1)/N d^2 has the expectation mu^2 + s^2/B.
    One estimate may be negative; their running average is not (`_feed_second_moments`)."""
    keep = (replicas - 1) / replicas
    return [tf.square(g) - keep * tf.square(d) for g, d in zip(estimates, half_differences)]


def _feed_second_moments(moments, beta_2: float, grads, squares) -> None:
    """Make Adam's next step average `squares` into its second moments in place of the squares
    of `grads`. Its update is v += (1 - beta_2) (g^2 - v), so v is shifted by the difference
    first. A square below -v + g^2/1000 is raised to it: one step then lowers v by at most a
    fraction 2 (1 - beta_2), and a v of 0 grows. Adam's step divides by the root of v, which
    rounding just below 0 would turn into NaN."""
    for v, g, square in zip(moments, grads, squares):
        lowest = 1e-3 * tf.square(g) - v
        v.assign_add((1.0 - beta_2) / beta_2 * (tf.maximum(square, lowest) - tf.square(g)))


def _norm(tensors) -> tf.Tensor:
    return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(t)) for t in tensors]))


def _accumulated_grads(model, loss_sums: LossSums, micro_batches, variables, halves: bool = False):
    """The gradient sums over `micro_batches`, their metric sums, and with `halves` the sum over
    each micro-batch's first half minus that over its second (None without)."""
    # From zeros: adding densifies embedding gradients (IndexedSlices), which the collectives,
    # compressors and clipping all expect.
    grads = [tf.zeros_like(v) for v in variables]
    differences = [tf.zeros_like(v) for v in variables] if halves else None
    totals = None
    for micro_batch in micro_batches:
        part_grads = []
        for part in split_halves(micro_batch) if halves else [micro_batch]:
            with tf.GradientTape() as tape:
                loss_sum, count, metric_sums = loss_sums(model, part, True)
            part_grads.append(tape.gradient(loss_sum, variables))
            sums = {"loss": loss_sum, "count": count, **metric_sums}
            totals = sums if totals is None else {k: totals[k] + v for k, v in sums.items()}
        for each in part_grads:
            grads = [g + s for g, s in zip(grads, each)]
        if len(part_grads) == 2:  # a one-example micro-batch has no halves to compare
            differences = [d + first - second for d, first, second in zip(differences, *part_grads)]
    return grads, differences, totals


def make_train_step(dist: Dist, model: keras.Model, optimizer: keras.optimizers.Optimizer,
                    loss_sums: LossSums, accum_steps: int = 1, compressor: Compressor = Compressor(),
                    max_grad_norm: float = 0.0) -> Callable[[Any], dict[str, tf.Tensor]]:
    """A compiled step: local batch in, global metrics out ({"loss", "count", ...} averaged
    over the global count, except "count" itself). `max_grad_norm` > 0 clips the global norm."""
    variables = model.trainable_variables
    compressor.build(variables, dist, optimizer.iterations)  # its state exists before tracing
    split = shard_axes(model)
    is_split = [id(v) in split for v in variables]
    clip = make_clip(max_grad_norm, is_split, dist)

    # Per-replica optimizers with a second moment need each replica's gradient noise.
    halves = compressor.compresses_updates and isinstance(optimizer, keras.optimizers.Adam) and dist.num_replicas > 1

    def replica_step(batch):
        grads, differences, local_sums = _accumulated_grads(
            model, loss_sums, split_micro_batches(batch, accum_steps), variables, halves)
        names = sorted(local_sums)
        # The counts depend on the batch only, so this reduction overlaps the backward pass.
        global_sums = dict(zip(names, dist.sum_across_replicas([local_sums[k] for k in names])))
        scale = 1.0 / tf.maximum(global_sums["count"], 1.0)
        grads = [g * tf.cast(scale, g.dtype) for g in grads]
        if halves:
            differences = [d * tf.cast(scale, d.dtype) for d in differences]
        if not compressor.compresses_updates:
            grads = clip(compressor.reduce(grads, dist))
        metrics = {k: v * scale for k, v in global_sums.items() if k != "count"}
        return grads, differences or [], {**metrics, "count": global_sums["count"]}

    @tf.function
    def train_step(batch):
        with compressor.gradient_point():
            grads, differences, metrics = dist.run_step(replica_step, batch)
        if compressor.compresses_updates:
            step_on_compressed_updates(grads, variables, optimizer, compressor, dist, clip,
                                       differences if halves else None)
        else:  # applied once, outside the replicas: the gradients are already global
            optimizer.apply(grads, variables)
        return metrics

    train_step.compressor = compressor  # for train(): it checkpoints the state and counts the bytes
    return train_step
