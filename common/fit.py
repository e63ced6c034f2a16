"""Training through Keras `model.fit` and the Horovod drop-in (`common.hvd`), under the recipe
contract: the same config.json, metrics.jsonl, checkpoints, summary.json and model.npz as
`common.loop.train`, and the same input stream (each data-parallel process reads its
interleaved shard of one shuffled stream), so a `fit` run on N processes with global batch B
trains like one process with batch B.

`fit` runs in windows of --log_every steps, each a Keras epoch: the metrics Keras reports at an
epoch's end are the window's means, averaged over the processes by `MetricAverageCallback`,
and that is where a metrics line is written and checkpoints are saved. Gradients are averaged
by `hvd.DistributedOptimizer`, with --clip_norm applied to the averaged gradients (the
optimizer's `global_clipnorm`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from common import hvd
from common.data.pipeline import sharded_batches
from common.loop import ChiefLog, Totals, finish
from common.state import TrainingState


class ContractLog(keras.callbacks.Callback):
    """At the end of each window (a Keras epoch): the metrics line, the steady-state totals,
    and the checkpoints and evaluations that --checkpoint_every and --eval_every ask for.
    Place it after `MetricAverageCallback`, so that it reads the averaged metrics."""

    def __init__(self, run, log: ChiefLog, state: TrainingState, totals: Totals,
                 evaluate: Callable[[], dict[str, Any]]):
        super().__init__()
        self.run, self.log, self.state, self.totals, self.evaluate = run, log, state, totals, evaluate
        self.window_start = 0.0
        self.first_window = True  # pays for tracing: left out of the steady-state figures

    def on_epoch_begin(self, epoch, logs=None):
        self.window_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        config = self.run.config
        seconds, done = time.perf_counter() - self.window_start, (epoch + 1) * config.log_every
        values = {key: float(value) for key, value in (logs or {}).items()}
        self.totals.metrics = {"step": done, **values, "lr": float(self.model.optimizer.learning_rate),
                               "examples_per_sec": config.global_batch_size * config.log_every / seconds,
                               "world_size": self.run.dist.num_replicas}
        self.log.write(self.totals.metrics)
        if not self.first_window:  # the count is of examples (images), as the recipes' loss_sums count them
            self.totals.seconds += seconds
            self.totals.steps += config.log_every
            self.totals.count += config.global_batch_size * config.log_every
        self.first_window = False
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done != config.steps:
            self.state.save(self.run.out_dir / "checkpoints", done, config.keep)
        if config.eval_every and done % config.eval_every == 0 and done != config.steps:
            self.log.write({"step": done, **self.evaluate()})


def train(run, model: keras.Model, optimizer: keras.optimizers.Optimizer, train_data: Sequence[np.ndarray], *,
          loss, metrics: Sequence[Any], evaluate: Callable[[], dict[str, Any]],
          export: Callable[[Path], None] = lambda out_dir: None) -> dict[str, Any]:
    """Compile `model` with `loss` and `metrics` around `hvd.DistributedOptimizer(optimizer)`
    and fit it to --steps on `train_data`, as `common.loop.train` does; returns the summary
    written to summary.json. The recipe rejects, before TensorFlow loads, the flags `fit` does
    not implement (--backend=mirrored, --elastic, --accum_steps, --compression other than fp16)
    and a --steps, --checkpoint_every or --eval_every that is no multiple of --log_every."""
    config = run.config
    hvd.init_from(run.dist)
    log = ChiefLog(run.out_dir, run.dist.is_chief)
    log.write_json("config.json", {**config.to_dict(), "world_size": run.dist.num_replicas})
    optimizer.global_clipnorm = config.clip_norm or None
    compression = hvd.Compression.fp16 if config.compression == "fp16" else hvd.Compression.none
    distributed = hvd.DistributedOptimizer(optimizer, compression=compression)
    model.compile(optimizer=distributed, loss=loss, metrics=list(metrics), jit_compile=False)
    distributed.build(model.trainable_variables)
    state = TrainingState(run.dist, model, distributed)
    ckpt_dir = run.out_dir / "checkpoints"
    state.restore_or_start(ckpt_dir, config.resume)
    start = int(distributed.iterations.numpy())
    kept = log.start_at(start)
    totals = Totals(next((record for record in reversed(kept) if "loss" in record), {}))
    callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0), hvd.callbacks.MetricAverageCallback(),
                 ContractLog(run, log, state, totals, evaluate)]
    model.fit(_input(run, train_data, start), steps_per_epoch=config.log_every,
              epochs=config.steps // config.log_every, initial_epoch=start // config.log_every,
              callbacks=callbacks, verbose=0)
    if start < config.steps:
        state.save(ckpt_dir, config.steps, config.keep)
    return finish(run, log, state, model, totals, evaluate=evaluate, export=export, report={"trainer": "fit"})


def _input(run, train_data: Sequence[np.ndarray], start: int) -> tf.data.Dataset:
    """This process's batches from step `start` on, as `common.loop.train` reads them."""
    batches = sharded_batches(train_data, batch_size=run.process_batch_size, num_shards=run.dist.input_shards,
                              shard_index=run.dist.coords["data"], seed=run.config.seed, skip_batches=start)
    signature = tuple(tf.TensorSpec((run.process_batch_size, *a.shape[1:]), a.dtype) for a in train_data)
    return tf.data.Dataset.from_generator(lambda: batches, output_signature=signature)

