"""The training loop every recipe shares: step, log, checkpoint, evaluate, export.

Only the chief writes files and shows the progress bar; the metrics it writes are global
(the step reduces them across replicas). Outputs in `out_dir`: `config.json`,
`metrics.jsonl`, `tb/` (TensorBoard), `checkpoints/`, `summary.json` and the exported model.
"""
from __future__ import annotations

import dataclasses
import json
import resource
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from common.compression import Compressor, float32_bytes
from common.errors import RecipeError
from common.dist import Dist
from common.state import TrainingState


@dataclasses.dataclass
class ChiefLog:
    """metrics.jsonl plus TensorBoard scalars; a no-op on other ranks."""

    out_dir: Path
    enabled: bool

    def __post_init__(self):
        if self.enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._writer = tf.summary.create_file_writer(str(self.out_dir / "tb"))

    def start_at(self, step: int) -> None:
        """Drop lines past `step` (all of them on a fresh start): a resumed run rewrites them."""
        path = self.out_dir / "metrics.jsonl"
        if self.enabled and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))

    def last(self, key: str) -> Any:
        """The latest value of `key` in metrics.jsonl (None if none, or on other ranks)."""
        path = self.out_dir / "metrics.jsonl"
        if not (self.enabled and path.exists()):
            return None
        values = [record[key] for record in map(json.loads, path.read_text().splitlines()) if key in record]
        return values[-1] if values else None

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


def train(config, dist: Dist, *, model: keras.Model, optimizer, train_step: Callable,
          make_batches: Callable[[int], Iterator], evaluate: Callable[[], dict[str, Any]],
          export: Callable[[Path, dict], None], out_dir: Path) -> dict[str, Any]:
    """Train to `config.steps`; returns the summary written to summary.json. `train_step` is
    a plan's step (`make_train_step`, `make_pipeline_train_step`): the compressor it carries
    has its per-replica state checkpointed, flushed at the end and its bytes counted."""
    compressor = train_step.compressor
    log = ChiefLog(out_dir, dist.is_chief)
    log.write_json("config.json", {**config.to_dict(), "world_size": dist.num_replicas})
    ckpt_dir = out_dir / "checkpoints"
    with dist.scope():
        optimizer.build(model.trainable_variables)
    state = TrainingState(dist, model, optimizer, compressor)
    state.restore_or_start(ckpt_dir, config.resume)
    start = int(optimizer.iterations.numpy())
    log.start_at(start)
    batches = make_batches(start)
    progress = tqdm(total=config.steps, initial=start, disable=not dist.is_chief, desc="train")
    window_start, window_steps, window_counts = time.perf_counter(), 0, []
    first_window_done, steady = False, {"seconds": 0.0, "steps": 0, "count": 0.0}
    metrics: dict[str, Any] = {}
    for step in range(start, config.steps):
        out = train_step(next(batches))
        window_steps += 1
        window_counts.append(out["count"])
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            values = {k: float(v) for k, v in out.items() if k != "count"}
            seconds = time.perf_counter() - window_start
            count = float(tf.add_n(window_counts))
            metrics = {"step": done, **values, "lr": float(optimizer.learning_rate),
                       "examples_per_sec": config.global_batch_size * window_steps / seconds,
                       "tokens_per_sec": count / seconds, "world_size": dist.num_replicas}
            log.write(metrics)
            progress.set_postfix(loss=f"{values['loss']:.4f}")
            if first_window_done:  # the first window pays for tracing and is left out
                steady = {"seconds": steady["seconds"] + seconds, "steps": steady["steps"] + window_steps,
                          "count": steady["count"] + count}
            first_window_done = True
            window_start, window_steps, window_counts = time.perf_counter(), 0, []
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done != config.steps:
            state.save(ckpt_dir, done)
        if config.eval_every and done % config.eval_every == 0 and done != config.steps:
            with compressor.evaluation_point(dist):  # what a flush would leave: every step taken
                log.write({"step": done, **evaluate()})
        progress.update(1)
    progress.close()
    if start < config.steps:
        compressor.flush(dist)  # the model evaluated, saved and exported holds every update
        state.save(ckpt_dir, config.steps)
    results = evaluate()
    throughput = _throughput(config.global_batch_size, steady)
    # A resume with no steps left trained nothing: the log's last loss.
    final_loss = metrics["loss"] if "loss" in metrics else log.last("loss")
    summary = {"steps": config.steps, "world_size": dist.num_replicas, "final_loss": final_loss,
               "parameters_on_chief": sum(int(np.prod(v.shape)) for v in model.trainable_variables),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               **_gradient_bytes(compressor, model, config.steps), **throughput, **results}
    log.write({"step": config.steps, **results, **throughput, "kind": "final"})
    log.write_json("summary.json", summary)
    arrays = state.full_arrays()
    if dist.is_chief:
        export(out_dir, {name: arrays[name] for name in state.names[:len(model.variables)]})
    dist.barrier()
    return summary


def held_out_metrics(dist: Dist, model: keras.Model, loss_sums, arrays, batch_size: int = 500) -> dict[str, float]:
    """The mean loss and metrics of `loss_sums` over `arrays`, a held-out set that every rank
    holds whole, as "test_loss" and "test_<metric>". Each data-parallel rank scores an
    interleaved share; the ranks of a tensor group score the same share together, so their
    sums are counted once. Not for pipeline plans (no stage holds the whole model)."""
    if not len(arrays[0]):
        raise RecipeError("the held-out set is empty: check --max_test and the data set's test split")
    share = [a[dist.coords["data"]::dist.input_shards] for a in arrays]
    totals: dict[str, float] = {}
    for start in range(0, len(share[0]), batch_size):
        loss, count, metrics = loss_sums(model, tuple(a[start:start + batch_size] for a in share), False)
        for key, value in {"loss": loss, "count": count, **metrics}.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    counted = [sums for coords, sums in dist.gather_objects((dist.coords, totals)) if coords["tensor"] == 0]
    summed = {key: sum(sums.get(key, 0.0) for sums in counted) for key in set().union(*counted)}
    return {f"test_{key}": value / summed["count"] for key, value in summed.items() if key != "count"}


def _gradient_bytes(compressor: Compressor, model: keras.Model, steps: int) -> dict[str, float]:
    """Gradient bytes this replica puts on the wire per step (the mean over the run), compressed
    and as float32."""
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    return {"gradient_wire_bytes": compressor.mean_wire_bytes(shapes, steps),
            "gradient_float32_bytes": float32_bytes(shapes)}


def _throughput(global_batch_size: int, steady: dict[str, float]) -> dict[str, float]:
    """Steady-state throughput over all windows but the first (which includes tracing)."""
    if not steady["steps"]:
        return {}
    return {"steady_examples_per_sec": global_batch_size * steady["steps"] / steady["seconds"],
            "steady_tokens_per_sec": steady["count"] / steady["seconds"]}
