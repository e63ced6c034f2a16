"""The training loop every recipe shares: step, log, checkpoint, evaluate, export.

Only the chief writes files and shows the progress bar; the metrics it writes are global
(the step reduces them across replicas). Outputs in `out_dir`: `config.json`,
`metrics.jsonl`, `tb/` (TensorBoard), `checkpoints/`, `summary.json` and `model.npz` (the full
weights, whatever the plan: `common.state.load_weights` reloads them).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from common import watchdog
from common.data.pipeline import sharded_batches
from common.dist import run_elastic
from common.errors import RecipeError
from common.mesh import check_batch_splits
from common.state import TrainingState
from common.step import Step


@dataclasses.dataclass
class ChiefLog:
    """metrics.jsonl plus TensorBoard scalars; a no-op on other ranks."""

    out_dir: Path
    enabled: bool

    def __post_init__(self):
        if self.enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    @functools.cached_property
    def _writer(self):
        """Made at the first write (an elastic job's chief may change: `enabled` follows it)."""
        return tf.summary.create_file_writer(str(self.out_dir / "tb"))

    def start_at(self, step: int) -> list[dict[str, Any]]:
        """Drop the records past `step` (all of them on a fresh start), which a resumed run
        writes again; returns those kept (none on other ranks)."""
        path = self.out_dir / "metrics.jsonl"
        if not (self.enabled and path.exists()):
            return []
        kept = [record for record in map(json.loads, path.read_text().splitlines()) if record["step"] <= step]
        path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        return kept

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        with self._writer.as_default(step=record["step"]):
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    tf.summary.scalar(key, value)
        self._writer.flush()

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        if self.enabled:
            (self.out_dir / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclasses.dataclass
class Totals:
    """What the loop carries across its windows (and an elastic job's resets): the last
    metrics line and the steady-state time, steps and count (windows after the first)."""

    metrics: dict[str, Any]
    seconds: float = 0.0
    steps: int = 0
    count: float = 0.0


def train(run, model, optimizer, step: Step, train_data: Sequence[np.ndarray], *,
          evaluate: Callable[[], dict[str, Any]], export: Callable[[Path], None] = lambda out_dir: None
          ) -> dict[str, Any]:
    """Train to --steps on `train_data` (arrays with one row per example, the same on every
    process; each data-parallel process reads its interleaved shard of one shuffled stream);
    returns the summary written to summary.json. `evaluate()` runs on every process at the end
    (and every --eval_every steps) and returns the task's metrics; `export(out_dir)` writes what
    the chief saves beside model.npz (a tokenizer, class names, the SavedModel for serving of
    `common.export`). Under --elastic the steps run in Horovod Elastic (`common.dist.run_elastic`),
    committed every --commit_every steps."""
    config, out_dir = run.config, run.out_dir
    log = ChiefLog(out_dir, run.dist.is_chief)
    log.write_json("config.json", {**config.to_dict(), "world_size": run.dist.num_replicas})
    ckpt_dir = out_dir / "checkpoints"
    state = TrainingState(run.dist, model, optimizer, step.replica_state)
    if config.elastic:
        state.restore_alone(ckpt_dir, config.resume)
    else:
        state.restore_or_start(ckpt_dir, config.resume)
    start = int(optimizer.iterations.numpy())
    # A resume with no steps left reports the log's last loss.
    kept = log.start_at(start)
    totals = Totals(next((record for record in reversed(kept) if "loss" in record), {}))

    def steps_to_end(commit=None):
        _train_steps(run, log, optimizer, step, state, train_data, evaluate, totals, commit)

    if config.elastic:
        run_elastic(steps_to_end, state.variables, lambda dist: _rejoin(run, log, state, dist), run.dist,
                    config.stall_timeout)
    else:
        steps_to_end()
    if start < config.steps:
        state.save(ckpt_dir, config.steps, config.keep)
    report = {"gradient_wire_bytes": step.wire_bytes, "gradient_float32_bytes": step.float32_bytes, **step.report}
    return finish(run, log, state, model, totals, evaluate=evaluate, export=export, report=report)


def finish(run, log: ChiefLog, state: TrainingState, model, totals: Totals, *,
           evaluate: Callable[[], dict[str, Any]], export: Callable[[Path], None], report: dict[str, Any]
           ) -> dict[str, Any]:
    """The end of a run, whatever trained it (this loop, or `common.fit`): evaluate on every
    process, write the final metrics line and summary.json (the run's figures, `report`, the
    evaluation), and on the chief model.npz and the export; returns the summary."""
    config, dist = run.config, run.dist
    results = evaluate()
    throughput = steady_throughput(config.global_batch_size, totals)
    summary = {"steps": config.steps, "world_size": dist.num_replicas, "final_loss": totals.metrics.get("loss"),
               "parameters_on_chief": sum(int(np.prod(v.shape)) for v in model.trainable_variables),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               **report, **throughput, **results}
    log.write({"step": config.steps, **results, **throughput, "kind": "final"})
    log.write_json("summary.json", summary)
    weights = state.model_arrays()
    if dist.is_chief:
        np.savez(run.out_dir / "model.npz", **weights)
        export(run.out_dir)
    dist.barrier()
    return summary


def progress_bar(total: int, initial: int, enabled: bool = True) -> tqdm:
    """The training progress display: redrawn in place on a terminal; under a launcher, where
    the output is a pipe, one whole line every 10 s (a postfix is set with refresh=False, or
    each call redraws)."""
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, disable=not enabled, desc="train", mininterval=0.1)
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", mininterval=10,
                file=_WholeLines(), ascii=True)


class _WholeLines:
    """Standard error as a progress bar's stream of whole lines. tqdm begins each redraw with a
    carriage return and ends none, which in a pipe leaves a line open: an error line written
    later (`errors.exit_with`) would be glued to it."""

    def write(self, text: str) -> None:
        text = text.strip("\r\n")
        if text.strip():
            sys.stderr.write(text + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def _train_steps(run, log: ChiefLog, optimizer, step: Step, state: TrainingState, train_data, evaluate,
                 totals: Totals, commit: Callable[[], None] | None) -> None:
    """From the optimizer's step to --steps: log, checkpoint, evaluate, and commit when elastic."""
    config, dist = run.config, run.dist
    start = int(optimizer.iterations.numpy())
    log.start_at(start)  # an elastic reset goes back to the last commit
    batches = sharded_batches(train_data, batch_size=run.process_batch_size, num_shards=dist.input_shards,
                              shard_index=dist.coords["data"], seed=config.seed, skip_batches=start)
    progress = progress_bar(config.steps, start, enabled=dist.is_chief)
    window_start, window_steps, window_counts = time.perf_counter(), 0, []
    first_window_done = False  # the first window pays for tracing (or a reset) and is left out
    for index in range(start, config.steps):
        out = step(next(batches))
        window_steps += 1
        window_counts.append(out["count"])
        done = index + 1
        watchdog.progress(done)  # what this rank's heartbeats report
        if done % config.log_every == 0 or done == config.steps:
            values = {k: float(v) for k, v in out.items() if k != "count"}
            seconds = time.perf_counter() - window_start
            count = float(tf.add_n(window_counts))
            totals.metrics = {"step": done, **values, "lr": float(optimizer.learning_rate),
                              "examples_per_sec": config.global_batch_size * window_steps / seconds,
                              "tokens_per_sec": count / seconds, "world_size": dist.num_replicas}
            log.write(totals.metrics)
            progress.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)  # drawn at the next update
            if first_window_done:
                totals.seconds, totals.steps, totals.count = (totals.seconds + seconds, totals.steps + window_steps,
                                                              totals.count + count)
            first_window_done = True
            window_start, window_steps, window_counts = time.perf_counter(), 0, []
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done != config.steps:
            state.save(run.out_dir / "checkpoints", done, config.keep)
        if config.eval_every and done % config.eval_every == 0 and done != config.steps:
            log.write({"step": done, **evaluate()})
        if commit and done % config.commit_every == 0 and done != config.steps:
            commit()
        progress.update(1)
    progress.close()


def _rejoin(run, log: ChiefLog, state: TrainingState, dist) -> None:
    """After an elastic reset: the new ring's ranks (rank 0 logs); the global batch stays, split anew."""
    check_batch_splits(run.config.global_batch_size, dist.num_replicas, run.config.accum_steps, 1)
    run.dist = state.dist = dist
    log.enabled = dist.is_chief


# ------------------ evaluation by all ranks: each data-parallel replica scores an interleaved share
# (outputs such as decoded texts: common.inference.gathered_outputs)
def held_out_metrics(dist, model, loss_sums, arrays, batch_size: int = 500) -> dict[str, float]:
    """The mean loss and metrics of `loss_sums` over `arrays` (a held-out set every rank holds
    whole), as "test_loss" and "test_<metric>". Not for pipeline plans (no stage holds the
    whole model)."""
    if not len(arrays[0]):
        raise RecipeError("the held-out set is empty: check --max_test and the data set's test split")
    share = [a[dist.coords["data"]::dist.input_shards] for a in arrays]
    totals: dict[str, float] = {}
    for start in range(0, len(share[0]), batch_size):
        batch = tuple(a[start:start + batch_size] for a in share)
        loss, count, metrics = loss_sums(model, batch, False)
        for key, value in {"loss": loss, "count": count, **metrics}.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    counted = dist.gather_replica_objects(totals)
    summed = {key: sum(sums.get(key, 0.0) for sums in counted) for key in set().union(*counted)}
    return {f"test_{key}": value / summed["count"] for key, value in summed.items() if key != "count"}


def steady_throughput(global_batch_size: int, totals: Totals) -> dict[str, float]:
    """Steady-state throughput over all windows but the first (which includes tracing)."""
    if not totals.steps:
        return {}
    return {"steady_examples_per_sec": global_batch_size * totals.steps / totals.seconds,
            "steady_tokens_per_sec": totals.count / totals.seconds}
