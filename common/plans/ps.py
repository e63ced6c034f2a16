"""Parameter-server training on TensorFlow's engine: `--plan=ps,workers=N,servers=M`.

`tf.distribute.ParameterServerStrategy` holds the variables on M parameter-server tasks,
tables split into row shards by a partitioner (every variable of at least `servers` rows is cut
into `servers` shards, so each server holds 1/M of each embedding table); the chief is the
`ClusterCoordinator`, which schedules training steps on N workers, each step one worker's batch
of --global_batch_size examples read from its own per-worker dataset, asynchronously: a worker
reads the rows it needs, computes the gradient of its batch and sends it to the servers, which
apply it. The cluster's processes: `common.plans.ps_cluster` (a local one on loopback, or
TF_CONFIG's).

Keras 3 and this strategy (measured, TF 2.21 / Keras 3.15): a Keras layer built in the
strategy's scope holds its weight as a `keras.Variable` around a `ShardedVariable`, and the
model's forward pass runs in a coordinator-scheduled step; but `tape.gradient` of a
`keras.Variable` fails (a ShardedVariable has no handle), and a Keras 3 optimizer's
`apply_gradients` fails inside `strategy.run` ("ShardedVariable doesn't support being used as a
reference"). So the step differentiates with respect to the shards themselves (each
embedding shard's gradient arrives as tf.IndexedSlices of the rows the batch touched), and
`ShardedAdagrad` updates them: Keras's Adagrad, same math and defaults, applied row by row on
the server that holds each shard. Adagrad because its sparse update is exact (an untouched
row does not move, as in the dense update), so a one-process run with `keras.optimizers.Adagrad`
on `common.optimizers.make_optimizer(config, "adagrad")` trains the same model.
"""
from __future__ import annotations

import dataclasses
import gc
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common.errors import ConfigError, RecipeError
from common.plans.ps_variables import ShardedAdagrad, assign_full, full_value, parameters_per_task, placement, \
    shards_of

PLAN_HELP = "--plan=ps or ps,workers=N,servers=M (N, M >= 1)"


@dataclasses.dataclass(frozen=True)
class PSPlan:
    """The local cluster's size; under TF_CONFIG only the counts in `named` must match its own."""

    workers: int = 2
    servers: int = 2
    named: tuple[str, ...] = dataclasses.field(default=(), compare=False)


def is_ps_plan(plan_text: str) -> bool:
    return plan_text.split(",")[0].strip() == "ps"


def parse_ps_plan(plan_text: str) -> PSPlan:
    """`ps[,workers=N][,servers=M]` as a PSPlan; ConfigError on anything else."""
    head, *parts = [part.strip() for part in plan_text.split(",")]
    if head != "ps":
        raise ConfigError(f"not a parameter-server plan: {plan_text!r}; use {PLAN_HELP}")
    counts = {}
    for part in parts:
        key, _, value = part.partition("=")
        if key not in ("workers", "servers") or key in counts:
            raise ConfigError(f"--plan={plan_text}: unknown or repeated {key!r}; use {PLAN_HELP}")
        try:
            counts[key] = int(value)
        except ValueError:
            raise ConfigError(f"--plan={plan_text}: {key} takes a whole number, got {value!r}; "
                              f"use {PLAN_HELP}") from None
        if counts[key] < 1:
            raise ConfigError(f"--plan={plan_text}: {key} must be at least 1, got {counts[key]}; use {PLAN_HELP}")
    return PSPlan(**counts, named=tuple(counts))


# Flags of the data plans this engine does not implement: (flag, the one value it takes, why).
_DATA_PLAN_FLAGS = (
    ("optimizer", "adagrad", "the parameter servers apply Adagrad"),
    ("accum_steps", 1, "each scheduled step is one update"),
    ("compression", "none", "gradients travel to the servers uncompressed"),
    ("elastic", False, "the cluster restarts a worker that dies"),
    ("backend", "horovod", "the cluster is TensorFlow's own"),
    ("allreduce", "grouped", "there is no all-reduce"),
    ("mirrored_devices", 0, "there is no mirrored backend"),
    ("deterministic", False, "workers apply their steps asynchronously, in no fixed order"),
    ("eval_every", 0, "the chief evaluates once, at the end"),
)


def check_ps_config(config) -> PSPlan:
    """The plan of a `--plan=ps...` config; ConfigError on a bad plan or on a flag this engine
    would otherwise ignore. Pure Python: recipes call it from their config's validate()."""
    plan = parse_ps_plan(config.plan)
    for name, supported, why in _DATA_PLAN_FLAGS:
        value = getattr(config, name, supported)
        if value != supported:
            shown = str(value).lower() if isinstance(value, bool) else value
            raise ConfigError(f"--{name}={shown} does not work with --plan=ps ({why}): drop the flag, or train "
                              "with a data plan")
    return plan


# ------------------------------------------------------------------ training
def train(config, out_dir: Path, *, build_model: Callable, loss_sums: Callable, train_data, evaluate: Callable,
          export: Callable[[Path], None] = lambda out_dir: None) -> dict[str, Any]:
    """Train `build_model()` to --steps on a parameter-server cluster (module docstring), then
    `evaluate(model)` on the chief; writes the outputs `common.loop.train` writes and returns
    the summary."""
    plan = check_ps_config(config)  # before TensorFlow loads: a bad plan or flag fails at once
    import os
    from common.dist import configure_threads
    from common.plans import ps_cluster
    configure_threads(config.intra_op_threads)
    threads = config.intra_op_threads or max(1, (os.cpu_count() or 1) // (plan.workers + plan.servers))
    with ps_cluster.open_cluster(plan, Path(out_dir) / "servers", threads) as cluster:
        summary = _train_on(cluster, config, Path(out_dir), build_model, loss_sums, train_data, evaluate, export)
        gc.collect()  # the step's functions are removed from the servers while they still listen
    return summary


def _strategy(cluster, servers: int):
    import tensorflow as tf
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster.spec), task_type="chief", task_id=0, rpc_layer="grpc")
    partitioner = tf.distribute.experimental.partitioners.FixedShardsPartitioner(num_shards=servers)
    strategy = tf.distribute.ParameterServerStrategy(resolver, variable_partitioner=partitioner)
    return strategy, tf.distribute.coordinator.ClusterCoordinator(strategy)


def _train_on(cluster, config, out_dir: Path, build_model, loss_sums, train_data, evaluate, export):
    import keras
    from common import checkpoint
    from common.loop import ChiefLog
    from common.optimizers import WarmupCosine, scaled_lr
    from common.state import variable_names
    workers, servers = len(cluster.spec["worker"]), len(cluster.spec["ps"])
    strategy, coordinator = _strategy(cluster, servers)
    with strategy.scope():
        keras.utils.set_random_seed(config.seed)
        model = build_model()
        if not model.variables:  # a model that builds at its first call
            loss_sums(model, tuple(a[:1] for a in train_data), False)
    peak = scaled_lr(config.lr, config.global_batch_size, config.lr_reference_batch, config.lr_scaling)
    optimizer = ShardedAdagrad(strategy, model.trainable_variables,
                               WarmupCosine(peak, config.warmup_steps, config.steps), config.clip_norm)
    names = variable_names(model.variables)
    state = _CheckpointState(model, names, optimizer)
    log = ChiefLog(out_dir, True)
    log.write_json("config.json", {**config.to_dict(), "world_size": workers})
    ckpt_dir = out_dir / "checkpoints"
    start = 0
    if config.resume and checkpoint.latest_step(ckpt_dir) is not None:
        # The checkpoint's step, not the optimizer's count, which a step run twice (at least
        # once: a killed worker's) has moved past the steps scheduled.
        start, arrays = checkpoint.load(ckpt_dir)
        state.assign(start, arrays, ckpt_dir)
    kept = log.start_at(start)
    step = _worker_step(strategy, model, loss_sums, optimizer, config.log_every)
    iterator = iter(coordinator.create_per_worker_dataset(_dataset_fn(train_data, config.global_batch_size)))
    totals = _run_steps(coordinator, cluster, step, iterator, start, config, log, state, ckpt_dir)
    totals.metrics = totals.metrics or next((r for r in reversed(kept) if "loss" in r), {})
    results = evaluate(model)
    summary = {"steps": config.steps, "plan": "ps", "workers": workers, "servers": servers, "world_size": workers,
               "final_loss": totals.metrics.get("loss"), "steps_without_metrics": totals.lost,
               "examples_per_sec": totals.metrics.get("examples_per_sec"),
               "parameters": sum(int(np.prod(v.shape)) for v in model.variables),
               "parameters_per_server": parameters_per_task(model.variables),
               "rows_per_server": placement(model.variables, names), "worker_restarts": cluster.worker_restarts,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               **totals.steady(config.global_batch_size), **results}
    log.write({"step": config.steps, **results, **totals.steady(config.global_batch_size), "kind": "final"})
    log.write_json("summary.json", summary)
    np.savez(out_dir / "model.npz", **state.arrays(model_only=True))
    export(out_dir)
    return summary


class _CheckpointState:
    """The model's and the optimizer's variables as full tensors under stable names: the
    model's under `common.state.variable_names`, so model.npz loads into a one-process model."""

    def __init__(self, model, names: list[str], optimizer: ShardedAdagrad):
        self.model_shards = {name: shards_of(v) for name, v in zip(names, model.variables)}
        shard_names = [name for name, v in zip(names, model.variables) if v.trainable for _ in shards_of(v)]
        self.optimizer_shards = {"ps_adagrad/iterations": [optimizer.iterations]}
        for name, accumulator in zip(shard_names, optimizer.accumulators):
            self.optimizer_shards.setdefault(f"ps_adagrad/{name}/accumulator", []).append(accumulator)

    def arrays(self, model_only: bool = False) -> dict[str, np.ndarray]:
        groups = self.model_shards if model_only else {**self.model_shards, **self.optimizer_shards}
        return {name: full_value(shards) for name, shards in groups.items()}

    def assign(self, step: int, arrays: dict[str, np.ndarray], source: Path) -> None:
        from common import checkpoint
        for name, shards in {**self.model_shards, **self.optimizer_shards}.items():
            expected = full_value(shards).shape
            if name not in arrays or arrays[name].shape != expected:
                raise RecipeError(f"checkpoint {source} (step {step}) has no {name} of shape {expected}: resume "
                                  f"with the flags and plan it was trained with, or {checkpoint.FIX.format(source)}")
            assign_full(shards, arrays[name])


def _dataset_fn(train_data, batch_size: int) -> Callable:
    """Each worker's endless stream of batches: epoch after epoch of the rows, each epoch in an
    order of the worker's own. The seed is drawn on the worker, from its clock: a seed set on
    the chief (`keras.utils.set_random_seed`) would give every worker the same batches."""
    import tensorflow as tf
    arrays = tuple(tf.constant(np.asarray(a)) for a in train_data)
    rows = len(train_data[0])

    def dataset_fn():
        worker_seed = tf.cast(tf.timestamp() * 1e6, tf.int64) % (2 ** 31)

        def row_of(position):  # the epoch's permutation, stateless, at this position
            seed = tf.stack([worker_seed, position // rows])
            return tf.random.experimental.index_shuffle(position % rows, seed, rows - 1)
        return (tf.data.Dataset.counter().map(row_of).batch(batch_size, drop_remainder=True)
                .map(lambda index: tuple(tf.gather(a, index) for a in arrays)).prefetch(2))
    return dataset_fn


def _worker_step(strategy, model, loss_sums, optimizer: ShardedAdagrad, log_every: int):
    """The scheduled step: a batch, its gradient with respect to the shards, the update. Every
    --log_every steps the worker prints the step it ran to its own log."""
    import tensorflow as tf

    def replica_step(batch, step_number):
        with tf.GradientTape() as tape:
            loss_sum, count, metrics = loss_sums(model, batch, True)
            loss = loss_sum / tf.cast(count, loss_sum.dtype)
        optimizer.apply(tape.gradient(loss, optimizer.shards))
        if step_number % log_every == 0:
            tf.print("ps: this worker ran step", step_number, output_stream=sys.stderr)
        return {"loss_sum": loss_sum, "count": tf.cast(count, tf.float32),
                **{key: tf.cast(value, tf.float32) for key, value in metrics.items()}}

    @tf.function
    def step(iterator, step_number):
        return strategy.run(replica_step, args=(next(iterator), step_number))
    return step


@dataclasses.dataclass
class _Totals:
    """The last metrics line, and the steady-state seconds and steps (windows after the first)."""

    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    steps: int = 0
    lost: int = 0  # steps whose outputs died with their worker after it had applied them

    def steady(self, global_batch_size: int) -> dict[str, float]:
        return {"steady_examples_per_sec": global_batch_size * self.steps / self.seconds} if self.steps else {}


def _run_steps(coordinator, cluster, step, iterator, start: int, config, log, state, ckpt_dir) -> _Totals:
    """`_schedule_steps`, the wait for every step and the checkpoint of the last: a TensorFlow
    error there is the cluster's failure (`Cluster.failure`); evaluate()'s and export()'s are
    their own."""
    import tensorflow as tf
    from common import checkpoint
    try:
        totals = _schedule_steps(coordinator, cluster, step, iterator, start, config, log, state, ckpt_dir)
        coordinator.join()
        if start < config.steps:
            checkpoint.save(ckpt_dir, config.steps, state.arrays(), config.keep)
    except tf.errors.OpError as error:
        raise cluster.failure(error) from None
    return totals


def _schedule_steps(coordinator, cluster, step, iterator, start: int, config, log, state, ckpt_dir) -> _Totals:
    """Schedule steps start+1 .. --steps; each --log_every steps, wait for the window's steps
    and log their mean loss and metrics (a window's steps ran on any workers, in any order)."""
    import tensorflow as tf
    from common import checkpoint
    from common.loop import progress_bar
    totals, window, first_window_done = _Totals(), [], False
    window_start = time.perf_counter()
    progress = progress_bar(config.steps, start)
    for done in range(start + 1, config.steps + 1):
        cluster.check_servers()
        window.append(coordinator.schedule(step, args=(iterator, tf.constant(done, tf.int64))))
        if done % config.log_every and done != config.steps:
            continue
        sums, lost = _window_sums(window, coordinator, cluster)
        seconds = time.perf_counter() - window_start
        totals.lost += lost
        if sums:
            totals.metrics = {"step": done, "loss": sums.pop("loss_sum") / sums["count"],
                              **{key: value / sums["count"] for key, value in sums.items() if key != "count"},
                              "examples_per_sec": config.global_batch_size * len(window) / seconds,
                              "world_size": len(cluster.spec["worker"])}
            log.write(totals.metrics)
            progress.set_postfix(loss=f"{totals.metrics['loss']:.4f}", refresh=False)
        progress.update(len(window))
        if first_window_done:
            totals.seconds, totals.steps = totals.seconds + seconds, totals.steps + len(window)
        first_window_done, window, window_start = True, [], time.perf_counter()
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done != config.steps:
            coordinator.join()
            checkpoint.save(ckpt_dir, done, state.arrays(), config.keep)
    progress.close()
    return totals


def _window_sums(window, coordinator, cluster) -> tuple[dict[str, float], int]:
    """The summed outputs of a window's steps, the steps scheduled (waits for them, checking the
    local cluster's servers and workers meanwhile), and how many were lost: a
    worker killed after its step ran takes the step's outputs with it (the coordinator does not
    run a finished step again), which is no reason to stop while every server is there."""
    import tensorflow as tf
    while not coordinator.done():  # with no worker left the coordinator would wait for ever
        cluster.check_servers()
        time.sleep(0.01)
    sums: dict[str, float] = {}
    lost = 0
    for remote in window:
        try:
            outputs = remote.fetch()
        except tf.errors.UnavailableError:
            gone = cluster.servers_gone()
            if gone:
                raise gone from None
            lost += 1
            continue
        for key, value in outputs.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    return sums, lost


if __name__ == "__main__":
    from common.errors import exit_with
    from common.plans import ps_cluster
    if sys.argv[1:2] != ["serve"]:
        exit_with(ConfigError("usage: python -m common.plans.ps serve [--intra_op_threads=N] (reads TF_CONFIG)"))
    try:
        ps_cluster.serve(sys.argv[2:])
    except RecipeError as error:
        exit_with(error)
