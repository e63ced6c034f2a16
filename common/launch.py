"""What every recipe's main() does first: flags, backend, folders; and the one place a
user-fixable error becomes one line on stderr and a non-zero exit."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Callable

from common import config as config_lib
from common import dist as dist_lib
from common.errors import ConfigError, RecipeError, exit_with
from common.mesh import AXES, Plan, check_divisible, parse_plan
from common.plans.data import per_replica_batch_size


@dataclasses.dataclass(frozen=True)
class Run:
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
        check_divisible(self.plan, self.dist.mesh, global_batch_size=self.config.global_batch_size,
                        layers=layers, heads=heads, ff_dim=ff_dim, vocab_size=vocab_size)

    @property
    def process_batch_size(self) -> int:
        """Examples this process reads per optimizer step (all its replicas, all micro-batches);
        `start` has checked that the global batch splits evenly."""
        return self.config.global_batch_size // self.dist.input_shards


def start(config_cls: type[config_lib.TrainConfig], recipe: str, argv=None,
          axes: tuple[str, ...] = AXES) -> Run:
    """Flags, backend, mesh and folders of a recipe whose model splits along `axes`."""
    config = config_lib.parse_or_exit(config_cls, argv)
    plan = parse_plan(config.plan)  # before init: a bad plan fails without touching MPI
    check_plan_axes(plan, recipe, axes)
    dist = dist_lib.init(config.backend, plan, seed=config.seed, deterministic=config.deterministic,
                         intra_op_threads=config.intra_op_threads, mirrored_devices=config.mirrored_devices,
                         grouped_allreduce=config.allreduce == "grouped")
    run = Run(config, dist, plan, Path(config.out_dir or f"runs/{recipe}"),
              config.data_dir or os.environ.get("TFDS_DATA_DIR") or str(Path.home() / "tensorflow_datasets"))
    per_replica_batch_size(config.global_batch_size, dist.num_replicas, config.accum_steps)  # fails fast
    return run


def check_plan_axes(plan: Plan, recipe: str, axes: tuple[str, ...]) -> None:
    """ConfigError if the plan splits the model along an axis the recipe does not implement."""
    for axis in ("tensor", "pipeline"):
        degree = getattr(plan, axis)
        if degree > 1 and axis not in axes:
            raise ConfigError(f"--plan: {recipe}.py does not implement {axis} parallelism ({axis}={degree}): "
                              f"drop it from --plan (this recipe splits along {', '.join(axes)})")


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
