"""Pipeline parallelism: the model cut into stages, one per rank of a pipeline group.

Each rank's batch is cut into micro-batches; stages pass activations forward and their
gradients backward in MPI point-to-point messages (`Links`). Two schedules, as lists of
("F", i) / ("B", i) operations per stage:
- GPipe: every forward, then every backward: m micro-batches' activations live at once;
- 1F1B: after p - s - 1 warm-up forwards, stage s alternates one forward and one backward,
  so at most p - s micro-batches are in flight (PipeDream-Flush).
Both sum the gradients over the micro-batches, divide by the global token count and sum over
the stage's data group. With `recompute`, a stage keeps only its input, and runs the forward
again under the tape at backward time.

A model that `cut` can cut has `blocks` and builds a stage of consecutive ones (sharing its
layers; the input layers on the first, the output layers on the last) with `stage(blocks,
first, last)`, called as `stage(batch, incoming, training)` (`incoming`: the previous stage's
output, of shape `stage.activation_shape(rows)`; None on the first). The recipe's `loss_sums`
scores the last stage's output; the step factory takes the data plan's arguments.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import tensorflow as tf

from common.compression import float32_bytes, make_codec
from common.errors import ConfigError
from common.mesh import split_layers
from common.optimizers import build_slots
from common.plans.data import make_clip, split_micro_batches
from common.step import Step

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


class Links:
    """Point-to-point messages between stages, over mpi4py. Sends are non-blocking (so the 1F1B
    order cannot deadlock on a send waiting for a receive that waits on it); `wait` ends them."""

    def __init__(self):
        self.pending: list = []

    def send(self, array: np.ndarray, dest: int, tag: int) -> None:
        from mpi4py import MPI
        array = np.ascontiguousarray(array)
        self.pending.append((MPI.COMM_WORLD.Isend(array, dest=dest, tag=tag), array))

    def receive(self, shape, source: int, tag: int) -> tf.Tensor:
        from mpi4py import MPI
        buffer = np.empty(shape, np.float32)
        MPI.COMM_WORLD.Recv(buffer, source=source, tag=tag)
        return tf.constant(buffer)

    def wait(self) -> None:
        from mpi4py import MPI
        MPI.Request.Waitall([request for request, _ in self.pending])
        self.pending.clear()


def cut(model, dist):
    """This rank's stage of `model` (module docstring), its blocks balanced by parameter count;
    the model itself when the plan has one stage. Build the whole model first: every rank then
    draws every initial weight, so every plan starts from the one-process weights."""
    stages = dist.pipeline
    if stages.size == 1:
        return model
    costs = [sum(int(np.prod(v.shape)) for v in block.weights) for block in model.blocks]
    blocks = split_layers(costs, stages.size)[stages.index]
    return model.stage(blocks, first=stages.index == 0, last=stages.index == stages.size - 1)


class PipelineRunner:
    """Runs a schedule for one stage: `run` returns the stage's gradients of the summed loss
    and, on the last stage, the summed loss, count and metrics of all micro-batches."""

    def __init__(self, dist, stage, loss_sums=None, schedule: str = "gpipe", recompute: bool = False):
        self.stage, self.recompute, self.links = stage, recompute, Links()
        self.make_schedule = SCHEDULES[schedule]
        self.index, self.stages = dist.pipeline.index, dist.pipeline.size
        self.previous, self.following = dist.mesh.stage_neighbours(dist.process_rank)
        self.forward = tf.function(lambda batch, incoming, training: stage(batch, incoming, training=training))
        if loss_sums is not None:
            self.loss = tf.function(lambda batch, incoming: loss_sums(
                lambda b, training: stage(b, incoming, training=training), batch, True))

    @property
    def is_last(self) -> bool:
        return self.following is None

    def run(self, micro_batches: list) -> tuple[list[tf.Tensor], dict[str, tf.Tensor]]:
        grads = [tf.zeros_like(v) for v in self.stage.trainable_variables]
        saved: dict[int, tuple] = {}
        totals: dict[str, tf.Tensor] = {}
        for kind, i in self.make_schedule(len(micro_batches), self.stages, self.index):
            if kind == "F":
                saved[i], sums = self._forward(micro_batches[i], i)
                totals = {name: totals.get(name, 0.0) + value for name, value in sums.items()}
            else:
                grads = [g + s for g, s in zip(grads, self._backward(micro_batches[i], i, saved.pop(i)))]
        self.links.wait()
        return grads, totals

    def infer(self, batch):
        """Forward only, through every stage in turn: the last stage's output there, None on the others."""
        output = self.forward(batch, self._receive_input(batch, 0), False)
        if self.is_last:
            return output
        self.links.send(output.numpy(), self.following, 0)
        self.links.wait()
        return None

    def _receive_input(self, batch, tag: int):
        if self.previous is None:
            return None
        rows = tf.nest.flatten(batch)[0].shape[0]
        return self.links.receive(self.stage.activation_shape(rows), self.previous, tag)

    def _recorded_forward(self, inputs, micro_batch):
        """(tape, what to differentiate, sums): the output, or on the last stage the loss sum."""
        with tf.GradientTape() as tape:
            if inputs is not None:
                tape.watch(inputs)
            if not self.is_last:
                return tape, self.forward(micro_batch, inputs, True), {}
            loss_sum, count, metric_sums = self.loss(micro_batch, inputs)
        return tape, loss_sum, {"loss": loss_sum, "count": count, **metric_sums}

    def _forward(self, micro_batch, i: int):
        inputs = self._receive_input(micro_batch, 2 * i)
        if self.recompute and not self.is_last:
            output, tape, sums = self.forward(micro_batch, inputs, True), None, {}
        else:
            tape, output, sums = self._recorded_forward(inputs, micro_batch)
        if not self.is_last:
            self.links.send(output.numpy(), self.following, 2 * i)
        return (inputs, tape, output), sums

    def _backward(self, micro_batch, i: int, saved):
        inputs, tape, output = saved
        if tape is None:  # recompute: run the forward again, this time recording it
            tape, output, _ = self._recorded_forward(inputs, micro_batch)
        upstream = None if self.is_last else self.links.receive(output.shape, self.following, 2 * i + 1)
        variables = self.stage.trainable_variables
        gradients = tape.gradient(output, variables + ([inputs] if inputs is not None else []),
                                  output_gradients=upstream)
        if inputs is not None:
            self.links.send(gradients[-1].numpy(), self.previous, 2 * i + 1)
        return [tf.zeros_like(v) if g is None else g for g, v in zip(gradients, variables)]


def make_train_step(run, stage, optimizer, loss_sums) -> Step:
    """The pipeline plan's step for this rank's `stage` (`cut`). The schedule is Python, with
    point-to-point messages between micro-batches; each stage's forward (and so its gradient)
    is a compiled function, and so is everything after the schedule: the gradients' scaling,
    their sum over the stage's data group through the codec, clipping and the update."""
    config, dist, plan = run.config, run.dist, run.plan
    if config.accum_steps > 1:
        raise ConfigError("pipeline plans accumulate over micro-batches: use --plan=...,microbatches=N "
                          "instead of --accum_steps")
    variables = stage.trainable_variables
    build_slots(optimizer, variables, dist)
    codec = make_codec(config.compression)
    codec.build(variables, dist)
    clip = make_clip(config.clip_norm, variables, dist)
    runner = PipelineRunner(dist, stage, loss_sums, plan.schedule, plan.recompute)
    metric_names: list[str] = []  # only the last stage's loss knows them: learned at the first step

    @tf.function
    def apply_gradients(grads, scale):
        optimizer.apply(clip(codec.sum([g * scale for g in grads], dist.data)), variables)

    def train_step(batch):
        grads, totals = runner.run(split_micro_batches(batch, plan.microbatches))
        if not metric_names:
            metric_names.extend(next(names for names in dist.gather_objects(sorted(totals)) if names))
        metrics = _global_metrics(dist, runner, totals, metric_names)
        apply_gradients(grads, 1.0 / tf.maximum(metrics["count"], 1.0))
        return metrics

    rows = run.process_batch_size // plan.microbatches
    schedule = SCHEDULES[plan.schedule](plan.microbatches, runner.stages, runner.index)
    report = {"pipeline_peak_in_flight": peak_in_flight(schedule),
              "activation_bytes_per_microbatch": 4 * int(np.prod(stage.activation_shape(rows)))}
    shapes = [v.shape for v in variables]
    return Step(train_step, codec.wire_bytes(shapes), float32_bytes(shapes), codec.replica_state(), report)


def _global_metrics(dist, runner: PipelineRunner, totals: dict, names: list[str]) -> dict:
    """Loss and metric means over the global batch, known only on the last stage: summed over
    its data group there, then sent to the other stages."""
    sums = tf.stack(dist.data.sum([totals[k] for k in names])) if runner.is_last else tf.zeros(len(names))
    sums = dict(zip(names, tf.unstack(dist.pipeline.broadcast(sums, root=runner.stages - 1))))
    count = sums.pop("count")
    return {**{k: v / tf.maximum(count, 1.0) for k, v in sums.items()}, "count": count}


def make_forward(run, model) -> Callable[[Any, Callable], tf.Tensor]:
    """`forward(batch, head, dtype=tf.int32)` for inference under any plan: `head` maps the
    model's output (the last stage's, under a pipeline plan) to one value of `dtype` per row,
    such as a next token id or a row's loss, which every rank of the pipeline then gets. All
    ranks of a tensor or pipeline group call it on the same batch together."""
    if run.dist.pipeline.size == 1:
        compiled = tf.function(lambda batch: model(batch))
        return lambda batch, head, dtype=tf.int32: head(compiled(batch))
    runner = PipelineRunner(run.dist, model)

    def forward(batch, head, dtype=tf.int32):
        output = runner.infer(batch)
        rows = tf.nest.flatten(batch)[0].shape[0]
        ids = head(output) if runner.is_last else tf.zeros(rows, dtype)
        return run.dist.pipeline.broadcast(ids, root=runner.stages - 1)

    return forward
