"""Pipeline parallelism: the model cut into stages, one per rank of a pipeline group.

A global step splits each rank's batch into micro-batches. Stages pass activations forward
and activation gradients backward with MPI point-to-point messages (sends are non-blocking,
so the 1F1B order cannot deadlock on a send waiting for a receive that waits on it).
Two schedules, as lists of ("F", i) / ("B", i) operations per stage:
- GPipe: every forward, then every backward: m micro-batches' activations live at once;
- 1F1B: after p - s - 1 warm-up forwards, stage s alternates one forward and one backward,
  so at most p - s micro-batches are in flight (PipeDream-Flush).
Both compute the same gradients: the sum over micro-batches, each divided by the global
token count, then summed over the stage's data-parallel group. With `recompute`, a stage
keeps only its input and runs the forward again under the tape at backward time.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from common.dist import Dist
from common.plans.data import make_clip, split_micro_batches, step_on_compressed_updates

Op = tuple[str, int]


def gpipe_schedule(microbatches: int, stages: int, stage: int) -> list[Op]:
    return [("F", i) for i in range(microbatches)] + [("B", i) for i in range(microbatches)]


def one_f_one_b_schedule(microbatches: int, stages: int, stage: int) -> list[Op]:
    warmup = min(stages - stage - 1, microbatches)
    ops: list[Op] = [("F", i) for i in range(warmup)]
    for i in range(microbatches - warmup):
        ops += [("F", warmup + i), ("B", i)]
    return ops + [("B", i) for i in range(microbatches - warmup, microbatches)]


SCHEDULES = {"gpipe": gpipe_schedule, "1f1b": one_f_one_b_schedule}


def peak_in_flight(schedule: list[Op]) -> int:
    """Most micro-batches whose forward ran and whose backward has not (activations held)."""
    live = peak = 0
    for kind, _ in schedule:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


@dataclasses.dataclass
class Stage:
    """One rank's share of the model. `forward(inputs, micro_batch, training)` maps the previous
    stage's activations (None on the first stage) to this stage's output (logits on the last);
    on the last stage `loss(output, micro_batch)` gives `(loss_sum, count, metric_sums)`."""

    forward: Callable[[Any, Any, bool], tf.Tensor]
    loss: Callable[[tf.Tensor, Any], tuple]
    variables: list[tf.Variable]
    activation_shape: Callable[[Any], tuple]  # micro-batch -> shape of this stage's input
    metric_names: tuple[str, ...] = ("loss",)  # the last stage's sums, besides "count"


class PipelineRunner:
    """Runs a schedule for one stage; `run` returns the stage's summed weight gradients and,
    on the last stage, the summed loss/metric values of all micro-batches."""

    def __init__(self, dist: Dist, stage: Stage, schedule: str, recompute: bool):
        self.dist, self.stage, self.recompute = dist, stage, recompute
        self.make_schedule = SCHEDULES[schedule]
        self.group = dist.group("pipeline")
        self.index, self.stages = self.group.index, self.group.size
        self.previous = self.group.ranks[self.index - 1] if self.index > 0 else None
        self.following = self.group.ranks[self.index + 1] if self.index + 1 < self.stages else None
        self.peak_in_flight = 0

    @property
    def is_last(self) -> bool:
        return self.following is None

    def run(self, micro_batches: list, scale: tf.Tensor) -> tuple[list[tf.Tensor], dict[str, tf.Tensor]]:
        schedule = self.make_schedule(len(micro_batches), self.stages, self.index)
        self.peak_in_flight = peak_in_flight(schedule)
        grads = [tf.zeros_like(v) for v in self.stage.variables]
        saved: dict[int, tuple] = {}
        totals: dict[str, tf.Tensor] = {}
        for kind, i in schedule:
            if kind == "F":
                saved[i], sums = self._forward(micro_batches[i], i)
                for name, value in sums.items():
                    totals[name] = totals.get(name, 0.0) + value
            else:
                step_grads = self._backward(micro_batches[i], i, saved.pop(i), scale)
                grads = [g + s for g, s in zip(grads, step_grads)]
        self.dist.wait_sends()
        return grads, totals

    def infer(self, micro_batch):
        """Forward only, through every stage in turn (distributed inference): the last stage's
        output there, None on the other stages."""
        output = self.stage.forward(self._receive_input(micro_batch, 0), micro_batch, False)
        if self.is_last:
            return output
        self.dist.send(output.numpy(), self.following, 0)
        self.dist.wait_sends()
        return None

    def _receive_input(self, micro_batch, tag: int):
        if self.previous is None:
            return None
        shape = self.stage.activation_shape(micro_batch)
        return tf.constant(self.dist.receive(shape, self.previous, tag))

    def _recorded_forward(self, inputs, micro_batch):
        """(tape, what to differentiate, metric sums): the output, or on the last stage the loss."""
        with tf.GradientTape() as tape:
            if inputs is not None:
                tape.watch(inputs)
            output = self.stage.forward(inputs, micro_batch, True)
            sums = {}
            if self.is_last:
                loss_sum, count, metric_sums = self.stage.loss(output, micro_batch)
                output, sums = loss_sum, {"loss": loss_sum, "count": count, **metric_sums}
        return tape, output, sums

    def _forward(self, micro_batch, i: int):
        inputs = self._receive_input(micro_batch, 2 * i)
        if self.recompute and not self.is_last:
            output, tape, sums = self.stage.forward(inputs, micro_batch, True), None, {}
        else:
            tape, output, sums = self._recorded_forward(inputs, micro_batch)
        if not self.is_last:
            self.dist.send(output.numpy(), self.following, 2 * i)
        return (inputs, tape, output), sums

    def _backward(self, micro_batch, i: int, saved, scale):
        inputs, tape, output = saved
        if tape is None:  # recompute: run the forward again, this time recording it
            tape, output, _ = self._recorded_forward(inputs, micro_batch)
        if self.is_last:
            upstream = scale  # d(loss_sum / global count) / d(loss_sum)
        else:
            upstream = tf.constant(self.dist.receive(output.shape, self.following, 2 * i + 1))
        sources = self.stage.variables + ([inputs] if inputs is not None else [])
        gradients = tape.gradient(output, sources, output_gradients=upstream)
        if inputs is not None:
            self.dist.send(gradients[-1].numpy(), self.previous, 2 * i + 1)
        return [tf.zeros_like(v) if g is None else g for g, v in zip(gradients, self.stage.variables)]


def make_pipeline_train_step(dist: Dist, runner: PipelineRunner, optimizer, microbatches: int,
                             count_fn: Callable[[Any], tf.Tensor], compressor, max_grad_norm: float,
                             is_split: list[bool]):
    """A step for pipeline plans. The schedule is Python, with point-to-point messages between
    micro-batches; each stage's forward (and so its gradient) is a compiled function, and so is
    everything after the schedule: reduction, clipping and the update, which run eagerly one
    op per variable otherwise. Returns global metrics like the data-parallel step."""

    compressor.build(runner.stage.variables, dist, optimizer.iterations)  # its state exists before the first step

    clip = make_clip(max_grad_norm, is_split, dist)

    @tf.function
    def apply_gradients(grads):
        if compressor.compresses_updates:
            step_on_compressed_updates(grads, runner.stage.variables, optimizer, compressor, dist, clip)
        else:
            optimizer.apply(clip(compressor.reduce(grads, dist)), runner.stage.variables)

    def train_step(batch):
        micro = split_micro_batches(batch, microbatches)
        # Every stage reads the same batch, so every stage knows the global token count.
        global_count = dist.sum_across_replicas([tf.add_n([count_fn(m) for m in micro])])[0]
        scale = 1.0 / tf.maximum(global_count, 1.0)
        with compressor.gradient_point():
            grads, totals = runner.run(micro, scale)
        apply_gradients(grads)
        return _global_metrics(dist, runner, totals, global_count)

    train_step.compressor = compressor  # for train(): it checkpoints the state and counts the bytes
    return train_step


def _global_metrics(dist: Dist, runner: PipelineRunner, totals: dict, global_count: tf.Tensor) -> dict:
    """Loss and metric means over the global batch, known only on the last stage: summed over
    the data group there, then shared with the other stages (which contribute zeros)."""
    names = runner.stage.metric_names
    local = [totals[k] if runner.is_last else tf.constant(0.0) for k in names]
    sums = runner.group.sum(dist.sum_across_replicas(local))
    return {**{k: v / global_count for k, v in zip(names, sums)}, "count": global_count}


def activation_bytes(shape: tuple, dtype=np.float32) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize
