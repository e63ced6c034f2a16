"""Rank-grid math: which ranks form each data, tensor and pipeline group.

`--plan` names degrees ("data=2,tensor=2,pipeline=2"); a `Mesh` lays the ranks out on that
grid. As in Megatron-LM, an order string's first axis varies fastest across consecutive ranks:
under the default "tp-pp-dp" a tensor group is neighbouring ranks (one host, the fastest links,
for every layer's all-reduce), data-parallel replicas lie furthest apart (one per step). Pure
Python: every rank computes the same groups, or the same `ConfigError`, before any collective.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

from common.errors import ConfigError

AXES = ("data", "tensor", "pipeline")
KEYS = AXES + ("microbatches", "schedule", "recompute", "order")
SCHEDULES = ("gpipe", "1f1b")
DEFAULT_ORDER = "tp-pp-dp"
_AXIS_OF_SHORT_NAME = {"tp": "tensor", "pp": "pipeline", "dp": "data"}
_EXAMPLE_VALUE = {"data": "2", "tensor": "2", "pipeline": "2", "microbatches": "8",
                  "schedule": "1f1b", "recompute": "true", "order": DEFAULT_ORDER}
_BARE_VALUE = {"data": None, "recompute": True}  # keys that may stand alone, and what that means


def axes_fastest_first(order: str) -> tuple[str, ...]:
    """The axis names of an order string such as "tp-pp-dp", fastest-varying first."""
    short_names = order.split("-")
    if sorted(short_names) != sorted(_AXIS_OF_SHORT_NAME):
        raise ConfigError(f"--plan: order must name tp, pp and dp once each, e.g. "
                          f"order={DEFAULT_ORDER}; got {order!r}")
    return tuple(_AXIS_OF_SHORT_NAME[name] for name in short_names)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Parallel degrees and pipeline options as `--plan` gives them; data=None takes
    whatever the world size leaves over once tensor and pipeline are placed."""

    data: int | None = None
    tensor: int = 1
    pipeline: int = 1
    microbatches: int = 1
    schedule: str = "gpipe"
    recompute: bool = False
    order: str = DEFAULT_ORDER

    def __post_init__(self) -> None:
        for key in ("data", "tensor", "pipeline", "microbatches"):
            value = getattr(self, key)
            if not (value is None and key == "data") and not _is_positive_int(value):
                raise ConfigError(f"--plan: {key} takes a positive integer, e.g. "
                                  f"{key}={_EXAMPLE_VALUE[key]}; got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--plan: schedule must be one of {', '.join(SCHEDULES)}; "
                              f"got {self.schedule!r}")
        axes_fastest_first(self.order)
        if self.pipeline == 1 and (self.microbatches != 1 or self.schedule != "gpipe"):
            raise ConfigError("--plan: microbatches and schedule only apply to pipeline plans: "
                              "add pipeline=2 (or more) or drop them")

    def __str__(self) -> str:
        """The canonical `--plan` text, naming only what differs from the defaults;
        parse_plan(str(plan)) == plan."""
        changed = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return ",".join(f"{key}={str(value).lower()}" for key, value in changed) or "data"


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def parse_plan(text: str) -> Plan:
    """`--plan` text: comma-separated `key=value` items, e.g. "pipeline=2,microbatches=8".

    A bare "data" leaves the data degree to the world size; a bare "recompute" turns it on.
    """
    if not text.strip():
        raise ConfigError("--plan is empty: use e.g. --plan=data or --plan=data=2,tensor=2")
    values: dict[str, object] = {}
    for item in text.split(","):
        key, has_value, value_text = (part.strip() for part in item.partition("="))
        if key not in KEYS:
            raise ConfigError(f"--plan: unknown key {key!r}; keys: {', '.join(KEYS)}")
        if key in values:
            raise ConfigError(f"--plan: {key} is given twice; name each key once")
        values[key] = _plan_value(key, value_text if has_value else None)
    return Plan(**values)


def _plan_value(key: str, text: str | None) -> object:
    """One item's value in its field's type; None when the key stands alone."""
    if text is None:
        if key in _BARE_VALUE:
            return _BARE_VALUE[key]
        raise ConfigError(f"--plan: {key} needs a value, e.g. {key}={_EXAMPLE_VALUE[key]}")
    if key in ("schedule", "order"):
        return text
    if key == "recompute":
        if text.lower() not in ("true", "false"):
            raise ConfigError(f"--plan: recompute takes true or false; got {text!r}")
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--plan: {key} takes a positive integer, e.g. "
                          f"{key}={_EXAMPLE_VALUE[key]}; got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class Mesh:
    """The world's ranks on a data x tensor x pipeline grid, laid out by `order`."""

    data: int
    tensor: int
    pipeline: int
    order: str = DEFAULT_ORDER

    def __post_init__(self) -> None:
        if not all(_is_positive_int(getattr(self, axis)) for axis in AXES):
            raise ValueError(f"mesh degrees must be positive integers: {self}")
        axes_fastest_first(self.order)

    @property
    def world_size(self) -> int:
        return self.data * self.tensor * self.pipeline

    def degree(self, axis: str) -> int:
        if axis not in AXES:
            raise ValueError(f"unknown axis {axis!r}; axes: {', '.join(AXES)}")
        return getattr(self, axis)

    def _strides(self) -> dict[str, int]:
        """How far apart in rank two neighbours along each axis are."""
        strides, stride = {}, 1
        for axis in axes_fastest_first(self.order):
            strides[axis] = stride
            stride *= self.degree(axis)
        return strides

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's position on each axis: {"data": d, "tensor": t, "pipeline": p}."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        strides = self._strides()
        return {axis: rank // strides[axis] % self.degree(axis) for axis in AXES}

    def group(self, axis: str, rank: int) -> tuple[int, ...]:
        """The ranks that differ from `rank` only along `axis` (itself included), by coordinate."""
        degree, stride = self.degree(axis), self._strides()[axis]
        first = rank - self.coords(rank)[axis] * stride
        return tuple(first + index * stride for index in range(degree))

    def groups(self, axis: str) -> list[tuple[int, ...]]:
        """Every group along `axis` once, by lowest rank: the same list on every rank, so all
        ranks can create Horovod process sets in the same order, as Horovod requires."""
        return [self.group(axis, rank) for rank in range(self.world_size)
                if self.coords(rank)[axis] == 0]

    def stage_neighbours(self, rank: int) -> tuple[int | None, int | None]:
        """The ranks of the previous and the next pipeline stage; None past either end."""
        stages, stage = self.group("pipeline", rank), self.coords(rank)["pipeline"]
        previous = stages[stage - 1] if stage > 0 else None
        following = stages[stage + 1] if stage + 1 < self.pipeline else None
        return previous, following


def build_mesh(plan: Plan, world_size: int) -> Mesh:
    """The plan's grid over `world_size` ranks; ConfigError when the degrees do not multiply to it."""
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    model_ranks = plan.tensor * plan.pipeline
    data = world_size // model_ranks if plan.data is None else plan.data
    if data * model_ranks != world_size:
        raise ConfigError(_world_size_mismatch(plan, model_ranks, world_size))
    return Mesh(data, plan.tensor, plan.pipeline, plan.order)


def _world_size_mismatch(plan: Plan, model_ranks: int, world_size: int) -> str:
    if plan.data is None:
        needed = f"a multiple of {model_ranks} processes"
        suggested = max(model_ranks, world_size // model_ranks * model_ranks)
        data = "?"
    else:
        needed = f"{plan.data * model_ranks} processes"
        suggested = plan.data * model_ranks
        data = plan.data
    return (f"--plan={plan} needs {needed} (data x tensor x pipeline = {data} x {plan.tensor} "
            f"x {plan.pipeline}), got {world_size}: launch with -np {suggested} or change the degrees")


def check_divisible(mesh: Mesh, *, layers: int, heads: int | None = None, ff_dim: int | None = None,
                    vocab_size: int | None = None) -> None:
    """ConfigError when the model cannot be split as the plan asks. Run it on every rank before
    any collective, so a bad split ends every rank at once, not mid-step."""
    _check_stages_fit(mesh.pipeline, layers)
    tensor_splits = {"attention heads": heads, "feed-forward width": ff_dim, "vocabulary size": vocab_size}
    for what, size in tensor_splits.items():
        if size is not None and size % mesh.tensor:
            fix = f"use a tensor degree that divides {size}"
            if what == "vocabulary size":
                fix += f", or pad the vocabulary to a multiple of {mesh.tensor}"
            raise ConfigError(f"--plan: tensor={mesh.tensor} does not divide the {what} ({size}): {fix}")


def _check_stages_fit(stages: int, layers: int) -> None:
    if stages > layers:
        raise ConfigError(f"--plan: pipeline={stages} needs at least {stages} layers, the model has "
                          f"{layers}: lower pipeline or deepen the model")


def check_batch_splits(global_batch_size: int, replicas: int, accum_steps: int, microbatches: int) -> None:
    """ConfigError unless the global batch splits evenly over the data-parallel replicas, each
    replica's share over --accum_steps, and over the pipeline's micro-batches."""
    if global_batch_size % (replicas * accum_steps):
        steps = f" x {accum_steps} accumulation steps" if accum_steps > 1 else ""
        raise ConfigError(f"--global_batch_size={global_batch_size} does not divide into {replicas} data-parallel "
                          f"ranks{steps}: use a multiple of {replicas * accum_steps}")
    per_rank = global_batch_size // replicas
    if per_rank % microbatches:
        raise ConfigError(f"--global_batch_size={global_batch_size} gives {per_rank} examples per "
                          f"data-parallel rank, which do not split into microbatches={microbatches}: "
                          f"use a multiple of {replicas * microbatches}")


def split_layers(layer_costs: Sequence[float], stages: int) -> list[range]:
    """Contiguous, non-empty layer ranges, one per stage, that minimise the costliest stage.

    An exact dynamic programme over prefix sums, O(stages x layers^2): instant for the few
    hundred layers a pipeline holds, and free of the float tolerance a binary search on the
    answer would need. Ties keep the earliest cut, so every rank gets the same partition.
    """
    if stages < 1:
        raise ValueError(f"stages must be positive, got {stages}")
    if any(cost < 0 for cost in layer_costs):
        raise ValueError(f"layer costs must be >= 0, got {list(layer_costs)}")
    _check_stages_fit(stages, len(layer_costs))
    prefix = list(itertools.accumulate(layer_costs, initial=0.0))
    # best[end]: the least possible cost of the costliest stage for layers[:end] on the stages
    # placed so far; last_starts[s][end]: where the last of s + 2 stages begins in that optimum.
    best, last_starts = prefix, []
    for placed in range(2, stages + 1):
        next_best, start_at = [math.inf] * len(prefix), [0] * len(prefix)
        for end in range(placed, len(prefix)):
            for start in range(placed - 1, end):
                cost = max(best[start], prefix[end] - prefix[start])
                if cost < next_best[end]:
                    next_best[end], start_at[end] = cost, start
        best = next_best
        last_starts.append(start_at)
    bounds = [len(layer_costs)]
    for start_at in reversed(last_starts):
        bounds.append(start_at[bounds[-1]])
    bounds.append(0)
    bounds.reverse()
    return [range(start, end) for start, end in zip(bounds, bounds[1:])]
