"""Top-k of each replica's optimizer *update* (`--compression=topk_updates:F`), data and tensor plans.

Error feedback only delays what it holds back if what it compresses adds up linearly into the
weights, and Adam's update does not: a coordinate sent once in T steps as one spike moves about
sqrt(T) times less than the same sum spread over T steps. So every replica's optimizer steps on
its own gradient (scaled up to an estimate of the global mean), and the replicas average the
top-k of the change of the weights, with error feedback. Two pieces (docs/compression.md):
- the look-ahead: each replica takes its gradient at the shared weights plus its own unsent
  updates, so its own steps count at once and only the other replicas' wait;
- the second-moment correction: one replica's gradient has N times the global one's variance,
  which would shrink Adam's steps where noise dominates; each replica feeds Adam's second
  moment g^2 - (N-1)/N d^2 (d: the difference of its batch halves' gradients) instead.
"""
from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from common.compression import TopKCodec, float32_bytes
from common.config import parse_compression
from common.optimizers import build_slots
from common.plans.data import accumulated_grads, global_means, make_clip, split_micro_batches
from common.state import variable_names
from common.step import Step


class UpdateTopK(TopKCodec):
    """Top-k with error feedback, summing updates (mean-sized changes of the weights)."""

    state_kind = "unsent_updates"

    def __init__(self, fraction: float):
        super().__init__(fraction)
        self.spec = f"topk_updates:{fraction:g}"


@contextlib.contextmanager
def weights_moved_by(weights, deltas):
    """The weights plus `deltas` inside the block; after it they are bit for bit what they were
    (copied back, not subtracted)."""
    shared = [tf.identity(w) for w in weights]
    for weight, delta in zip(weights, deltas):
        weight.assign_add(delta)
    try:
        yield
    finally:
        for weight, value in zip(weights, shared):
            weight.assign(value)


def global_square_estimates(estimates, half_differences, replicas: int) -> list[tf.Tensor]:
    """Per entry, the square of the global mean gradient as a one-process step on the whole
    batch B would see it, from one replica's estimate g of that mean (from B/N examples) and
    the difference d of its two halves' estimates, both scaled to mean size. E[g^2] =
    mu^2 + N s^2/B and E[d^2] = N s^2/B, so g^2 - (N-1)/N d^2 has the expectation mu^2 + s^2/B.
    One estimate may be negative; their running average is not (`feed_second_moments`)."""
    keep = (replicas - 1) / replicas
    return [tf.square(g) - keep * tf.square(d) for g, d in zip(estimates, half_differences)]


def feed_second_moments(moments, beta_2: float, grads, squares) -> None:
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


def step_on_compressed_updates(shares, variables, optimizer, codec: UpdateTopK, dist, clip,
                               second_moments=None, half_differences=None) -> None:
    """`shares` are this replica's gradients, whose sum over the replicas is the global mean
    gradient. Its optimizer steps on them scaled up to an estimate of that mean, then the
    replicas average the compressed change of the weights. With `second_moments` (Adam's,
    given with `half_differences`, this replica's first half's gradient minus its second's,
    scaled like `shares`), the second moments are fed `global_square_estimates`."""
    replicas = dist.num_replicas
    before = [tf.identity(v) for v in variables]
    estimates = [g * replicas for g in shares]
    clipped = clip(estimates)
    if second_moments is not None:
        clip_scale = _norm(clipped) / tf.maximum(_norm(estimates), 1e-30)
        differences = [d * (replicas * clip_scale) for d in half_differences]
        feed_second_moments(second_moments, optimizer.beta_2, clipped,
                            global_square_estimates(clipped, differences, replicas))
    optimizer.apply(clipped, variables)
    changes = [(v - b) / replicas for v, b in zip(variables, before)]
    for variable, start, mean_change in zip(variables, before, codec.sum(changes, dist.data)):
        variable.assign(start + mean_change)


def _halves(micro_batches) -> tuple[list, list] | None:
    """The micro-batches' first halves and their second halves; None when they hold one example."""
    size = tf.nest.flatten(micro_batches[0])[0].shape[0]
    if size < 2:
        return None
    cut = [[tf.split(t, [size // 2, size - size // 2]) for t in tf.nest.flatten(m)] for m in micro_batches]
    return tuple([tf.nest.pack_sequence_as(m, [t[half] for t in parts]) for m, parts in zip(micro_batches, cut)]
                 for half in (0, 1))


def make_train_step(run, model: keras.Model, optimizer: keras.optimizers.Optimizer, loss_sums) -> Step:
    """The data plan's step with each replica's update compressed (module docstring)."""
    config, dist = run.config, run.dist
    variables = model.trainable_variables
    slots = build_slots(optimizer, variables, dist)
    codec = UpdateTopK(parse_compression(config.compression)[1])
    codec.build(variables, dist)
    clip = make_clip(config.clip_norm, variables, dist)
    # Per-replica optimizers with a second moment need each replica's gradient noise.
    second_moments = slots.get("velocity") if isinstance(optimizer, keras.optimizers.Adam) \
        and dist.num_replicas > 1 else None

    def replica_gradients(batch):
        micro_batches = split_micro_batches(batch, config.accum_steps)
        halves = _halves(micro_batches) if second_moments else None
        if halves is None:
            grads, local_sums = accumulated_grads(model, loss_sums, micro_batches, variables)
            differences = [tf.zeros_like(g) for g in grads]
        else:
            (first, first_sums), (second, second_sums) = (accumulated_grads(model, loss_sums, part, variables)
                                                          for part in halves)
            grads = [a + b for a, b in zip(first, second)]
            differences = [a - b for a, b in zip(first, second)]
            local_sums = {k: first_sums[k] + second_sums[k] for k in first_sums}
        scale, metrics = global_means(local_sums, dist.data)
        return [g * scale for g in grads], [d * scale for d in differences], metrics

    @tf.function
    def train_step(batch):
        with weights_moved_by(variables, codec.residuals):
            shares, differences, metrics = replica_gradients(batch)
        step_on_compressed_updates(shares, variables, optimizer, codec, dist, clip, second_moments, differences)
        return metrics

    names = variable_names(list(model.variables) + list(optimizer.variables))[len(model.variables):]
    replica_state = {**codec.replica_state(), **dict(zip(names, optimizer.variables))}
    shapes = [v.shape for v in variables]
    return Step(train_step, codec.wire_bytes(shapes), float32_bytes(shapes), replica_state)
