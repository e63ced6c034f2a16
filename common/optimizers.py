"""Optimizers as the recipes use them: the learning rate (a function of the global batch only,
so the process count changes nothing), and `build_slots`, which learns which slot belongs to
which weight through Keras's public `add_variable_from_reference`, not its private attributes.
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf

from common.plans.tensor import mark_split, split_axis


def scaled_lr(lr: float, global_batch_size: int, reference_batch: int, rule: str) -> float:
    """The linear (Goyal et al.) or square-root scaling rule, relative to a reference batch."""
    ratio = global_batch_size / reference_batch
    return {"none": lr, "linear": lr * ratio, "sqrt": lr * math.sqrt(ratio)}[rule]


@keras.saving.register_keras_serializable(package="common")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, then cosine decay to `peak * final_fraction` at `total_steps`.
    Serialisable, so an optimizer on it can be rebuilt from its config (`hvd.DistributedOptimizer`)."""

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
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "final_fraction": self.final_fraction}


def make_optimizer(config, name: str = "adam") -> keras.optimizers.Optimizer:
    """Adam, Adagrad (the update `common.plans.ps` applies on parameter servers), or SGD with
    Nesterov momentum 0.9 ("momentum"), on the warm-up + cosine schedule of `config` (--lr
    scaled by --lr_scaling, --warmup_steps, --steps)."""
    peak = scaled_lr(config.lr, config.global_batch_size, config.lr_reference_batch, config.lr_scaling)
    schedule = WarmupCosine(peak, config.warmup_steps, config.steps)
    if name == "adam":
        return keras.optimizers.Adam(schedule)
    if name == "adagrad":
        return keras.optimizers.Adagrad(schedule)
    return keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True)


def build_slots(optimizer: keras.optimizers.Optimizer, variables, dist) -> dict[str, list]:
    """Create `optimizer`'s state for `variables` (in the backend's scope); returns its slots by
    kind ("momentum", "velocity", ...), each list in the order of `variables`."""
    if optimizer.built:
        raise ValueError("pass the step an optimizer that has not been built yet")
    slots: dict[str, list] = {}
    add_slot = optimizer.add_variable_from_reference

    def add_tracked_slot(reference_variable, name=None, initializer="zeros"):
        slot = add_slot(reference_variable, name=name, initializer=initializer)
        slots.setdefault(name, []).append(mark_split(slot, split_axis(reference_variable)))
        return slot

    optimizer.add_variable_from_reference = add_tracked_slot
    try:
        with dist.scope():
            optimizer.build(variables)
    finally:
        del optimizer.add_variable_from_reference
    return slots
