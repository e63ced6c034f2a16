"""The public API: train your own Keras 3 model with this project's plans, as the recipes do
(`examples/keras_model.py`; README.md: Your own model). `start` a run, build the model in
`run.model_scope()`, `make_step` for the plan, `train`. `loss_sums(model, batch, training)`
returns (the sum of the per-example losses, the number of examples or tokens, {metric: sum}):
the plans divide by the *global* count, so N processes train exactly like one. A user-fixable
error anywhere (`RecipeError`) becomes one line on stderr and a non-zero exit (`guarded`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Callable

from common import compressed_updates
from common import config as config_lib
from common import dist as dist_lib
from common.config import TrainConfig, flag, load_saved
from common.errors import ConfigError, RecipeError, exit_with
from common.inference import gathered_outputs
from common.loop import held_out_metrics, train
from common.mesh import Plan, check_batch_splits, check_divisible, parse_plan
from common.optimizers import make_optimizer
from common.plans import data, pipeline
from common.state import load_weights
from common.step import Step

__all__ = ["Run", "Step", "TrainConfig", "flag", "gathered_outputs", "guarded", "held_out_metrics",
           "load_saved", "load_weights", "make_optimizer", "make_step", "start", "train"]


@dataclasses.dataclass
class Run:
    """A started run: its flags, this process's place in the job, the plan and the folders.
    `dist` is replaced when an elastic job's workers change (`train` does it)."""

    config: config_lib.TrainConfig
    dist: dist_lib.Dist
    plan: Plan
    out_dir: Path
    data_dir: str

    @contextlib.contextmanager
    def model_scope(self):
        """Build the model and optimizer here: the seed is set on entry, so whatever ran before
        (data preparation draws random numbers too) cannot change the initial weights, and
        MirroredStrategy places the variables."""
        import keras
        keras.utils.set_random_seed(self.config.seed)
        with self.dist.scope():
            yield

    def check_model_fits(self, *, layers: int, heads: int | None = None, ff_dim: int | None = None,
                         vocab_size: int | None = None) -> None:
        """ConfigError, on every rank and before any collective, if the plan cannot split the model."""
        check_divisible(self.dist.mesh, layers=layers, heads=heads, ff_dim=ff_dim, vocab_size=vocab_size)

    @property
    def process_batch_size(self) -> int:
        """Examples this process reads per optimizer step (all its replicas, all micro-batches);
        `start` has checked that the global batch splits evenly."""
        return self.config.global_batch_size // self.dist.input_shards


def start(config_cls: type[config_lib.TrainConfig], recipe: str, argv=None,
          axes: tuple[str, ...] = ("data",)) -> Run:
    """Flags, backend, mesh and folders of a recipe whose model splits along `axes`."""
    config = config_lib.parse_or_exit(config_cls, argv)
    plan = parse_plan(config.plan)  # before init: a bad plan fails without touching MPI
    check_plan_axes(plan, recipe, axes)
    if plan.pipeline > 1 and config_lib.parse_compression(config.compression)[0] == "topk_updates":
        raise ConfigError("--compression=topk_updates runs on data and tensor plans: use topk:F on pipeline plans")
    check_elastic(config, plan)
    dist = dist_lib.init(config.backend, plan, seed=config.seed, deterministic=config.deterministic,
                         intra_op_threads=config.intra_op_threads, mirrored_devices=config.mirrored_devices,
                         grouped_allreduce=config.allreduce == "grouped", stall_timeout=config.stall_timeout)
    run = Run(config, dist, plan, Path(config.out_dir or f"runs/{recipe}"),
              config.data_dir or os.environ.get("TFDS_DATA_DIR") or str(Path.home() / "tensorflow_datasets"))
    check_batch_splits(config.global_batch_size, dist.num_replicas, config.accum_steps, plan.microbatches)
    return run


def check_plan_axes(plan: Plan, recipe: str, axes: tuple[str, ...]) -> None:
    """ConfigError if the plan splits the model along an axis the recipe does not implement
    (a plain Keras model: data only; tensor needs `plans.tensor`'s layers, pipeline a model
    `plans.pipeline.cut` can cut)."""
    for axis in ("tensor", "pipeline"):
        degree = getattr(plan, axis)
        if degree > 1 and axis not in axes:
            raise ConfigError(f"--plan: {recipe}.py does not implement {axis} parallelism ({axis}={degree}): "
                              f"drop it from --plan (this recipe splits along {', '.join(axes)})")


def check_elastic(config: config_lib.TrainConfig, plan: Plan) -> None:
    """ConfigError unless --elastic and the launcher agree, and an elastic run's plan and
    compression hold nothing that a change of the worker count would break."""
    if config.elastic != dist_lib.launched_elastic():
        raise ConfigError("--elastic runs under horovodrun's elastic mode (--min-np/--max-np or "
                          "--host-discovery-script), and that mode needs --elastic: pass both or neither")
    if not config.elastic:
        return
    if config.backend != "horovod" or (plan.tensor, plan.pipeline) != (1, 1):
        raise ConfigError("--elastic runs data plans on Horovod: drop tensor and pipeline from --plan")
    if config_lib.parse_compression(config.compression)[0] not in ("none", "fp16", "bf16"):
        raise ConfigError("--elastic keeps no per-replica state across a change of workers: use "
                          "--compression=none, fp16 or bf16")


def guarded(main: Callable[[], None]) -> Callable[[], None]:
    """Run main(); a RecipeError ends this rank with its one-line message."""
    @functools.wraps(main)
    def wrapper():
        try:
            main()
        except RecipeError as error:
            exit_with(error)
        sys.stdout.flush()
    return wrapper


def make_step(run: Run, model, optimizer, loss_sums) -> Step:
    """The training step of the run's plan: the pipeline schedule's when the plan has stages
    (`model` is then this rank's stage, `plans.pipeline.cut`), the data (x tensor) plan's
    otherwise, with each replica's optimizer update compressed under --compression=topk_updates."""
    if run.dist.pipeline.size > 1:
        return pipeline.make_train_step(run, model, optimizer, loss_sums)
    if config_lib.parse_compression(run.config.compression)[0] == "topk_updates":
        return compressed_updates.make_train_step(run, model, optimizer, loss_sums)
    return data.make_train_step(run, model, optimizer, loss_sums)
