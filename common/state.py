"""Training state (model + optimizer variables) as full, unsharded tensors, whatever the plan.

Checkpoints hold full tensors keyed by variable path, so one written under any plan loads
under any other: saving gathers the shards (along each weight's split axis) and the stages to
the chief; loading hands every process the full tensors, and each keeps its own slice. A step's
`replica_state` is kept once per replica, under "per_replica/<replica>/"; only a run with the
same replicas and kinds of state takes it back, any other resume is one clear error.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common import checkpoint
from common.errors import RecipeError
from common.plans.tensor import local_slice, split_axis

PER_REPLICA_ROOT = "per_replica/"
PER_REPLICA = PER_REPLICA_ROOT + "{}/"


def variable_names(variables) -> list[str]:
    """Unique, stable names: the variable's path, numbered where a path repeats."""
    names, seen = [], {}
    for v in variables:
        base = getattr(v, "path", None) or v.name
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names


def load_weights(model, path: str | Path, group=None) -> None:
    """Assign the full weights a run exported (model.npz) to `model`, built on one process, or
    split over the tensor group `group` (each rank then keeps its slice)."""
    with np.load(path) as weights:
        for name, v in zip(variable_names(model.variables), model.variables):
            v.assign(weights[name] if group is None else local_slice(weights[name], split_axis(v), group))


class TrainingState:
    """The variables of one process, their names and split axes."""

    def __init__(self, dist, model, optimizer, replica_state: dict | None = None):
        self.dist = dist
        self.variables = list(model.variables) + list(optimizer.variables)
        self.names = variable_names(self.variables)
        self.model_names = self.names[:len(model.variables)]
        self.replica_state = dict(replica_state or {})
        named = [*zip(self.names, self.variables), *self.replica_state.items()]
        self.axes = {name: split_axis(v) for name, v in named}

    @property
    def _model_parallel(self) -> bool:
        mesh = self.dist.mesh
        return (mesh.tensor, mesh.pipeline) != (1, 1)

    def full_arrays(self) -> dict[str, np.ndarray] | None:
        """Every full tensor on the chief (None elsewhere). A collective: call on every process."""
        return self._gathered(self._local_arrays(), bool(self.replica_state))

    def model_arrays(self) -> dict[str, np.ndarray] | None:
        """The full weights of the model (every stage's) on the chief. A collective."""
        local = self._local_arrays() if self.dist.coords["data"] == 0 else {}
        return self._gathered({name: local[name] for name in self.model_names if name in local}, False)

    def _gathered(self, local: dict[str, np.ndarray], per_replica: bool) -> dict[str, np.ndarray] | None:
        """Every process's `local` shards joined into full tensors on the chief."""
        if not self._model_parallel and not per_replica:
            return local if self.dist.is_chief else None
        # Each process names its weights' split axes: the chief's stage lacks the other stages' weights.
        parts = self.dist.gather_objects((self.dist.coords, local, self.axes))
        if not self.dist.is_chief:
            return None
        shards: dict[str, list[np.ndarray]] = {}
        axes = {}
        for _, arrays, their_axes in sorted(parts, key=lambda part: (part[0]["tensor"], part[0]["pipeline"])):
            axes.update(their_axes)
            for name, value in arrays.items():
                shards.setdefault(name, []).append(value)
        return {name: _joined(pieces, axes.get(_unprefixed(name))) for name, pieces in shards.items()}

    def _local_arrays(self) -> dict[str, np.ndarray]:
        """This process's shards: the shared state from the first replica, its own from every one."""
        replica = self.dist.coords["data"]
        arrays = {PER_REPLICA.format(replica) + name: np.asarray(v) for name, v in self.replica_state.items()}
        if replica == 0:
            arrays.update({name: np.asarray(v) for name, v in zip(self.names, self.variables)})
        return arrays

    def assign(self, arrays: dict[str, np.ndarray], source: Path) -> None:
        """Take this process's slice of each full tensor; refuse a checkpoint of another model."""
        missing = [name for name in self.names if name not in arrays]
        if missing:
            raise RecipeError(f"checkpoint {source} does not match this model (missing e.g. {missing[:3]}): "
                              f"resume with the flags it was trained with, or {checkpoint.FIX.format(source)}")
        for name, v in zip(self.names, self.variables):
            value = local_slice(arrays[name], self.axes[name], self.dist.tensor)
            if tuple(np.shape(value)) != tuple(v.shape):
                raise RecipeError(f"checkpoint {source}: {name} has shape {arrays[name].shape}, this model "
                                  f"{tuple(v.shape)}: resume with the flags it was trained with, or "
                                  f"{checkpoint.FIX.format(source)}")
            v.assign(value)

    def save(self, directory: Path, step: int, keep: int = 3) -> None:
        """A collective: every process calls it, the chief writes (and keeps the newest `keep`)."""
        arrays = self.full_arrays()
        if self.dist.is_chief:
            checkpoint.save(directory, step, arrays, keep)

    def restore_alone(self, directory: Path, resume: bool) -> None:
        """Resume from the newest checkpoint if asked and one exists, read by this process
        alone: an elastic job's worker that joins late must not wait in a collective the
        others never enter (they give it their variables as it joins). Data plans only."""
        if resume and checkpoint.latest_step(directory) is not None:
            self.assign(checkpoint.load(directory)[1], directory)

    def restore_or_start(self, directory: Path, resume: bool) -> None:
        """Resume from the newest checkpoint if asked and one exists, else keep the fresh
        weights; either way every data-parallel replica ends with the same shared state."""
        error, arrays = None, None
        # Every stage's names: the chief's pipeline stage holds only some of them.
        replica_names = set().union(*self.dist.gather_objects(set(self.replica_state)))
        if self.dist.is_chief and resume and checkpoint.latest_step(directory) is not None:
            try:
                _, arrays = checkpoint.load(directory)
                _check_replica_state(arrays, replica_names, self.dist.num_replicas, directory)
                self.assign(arrays, directory)
            except RecipeError as failure:  # reported on every process below
                error, arrays = str(failure), None
        self.dist.raise_any(error)
        if self._model_parallel:
            # Every process needs the full tensors to cut its own slices from.
            arrays = self.dist.broadcast_object(arrays)
            error = None
            try:
                if arrays is not None:
                    self.assign(arrays, directory)
            except RecipeError as failure:  # another stage's or tensor rank's weights may not match
                error = str(failure)
            self.dist.raise_any(error)
        self.dist.data.broadcast_variables(self.variables)
        if self.replica_state:
            if not self._model_parallel:
                arrays = self.dist.broadcast_object(None if arrays is None else
                                                    {k: v for k, v in arrays.items() if k.startswith(PER_REPLICA_ROOT)})
            prefix = PER_REPLICA.format(self.dist.coords["data"])
            for name, v in self.replica_state.items():
                if arrays and prefix + name in arrays:
                    v.assign(local_slice(arrays[prefix + name], self.axes[name], self.dist.tensor))


def _check_replica_state(arrays: dict[str, np.ndarray], names: set[str], replicas: int, source: Path) -> None:
    """RecipeError unless a run whose replicas hold state `names` takes back every replica's
    state the checkpoint holds."""
    saved = [key for key in arrays if key.startswith(PER_REPLICA_ROOT)]
    if not saved:
        return
    saved_replicas = 1 + max(int(key.split("/")[1]) for key in saved)
    kinds = sorted({_unprefixed(key).split("/")[0] for key in saved})
    if {_unprefixed(key) for key in saved} != names or saved_replicas != replicas:
        raise RecipeError(f"checkpoint {source} holds state of each of its {saved_replicas} data-parallel replicas "
                          f"({', '.join(kinds)}) that this run cannot take: resume with {saved_replicas} replicas and "
                          f"the --compression its config.json names (unsent_updates: topk_updates:F, which runs before "
                          f"2026-12 named topk:F), or {checkpoint.FIX.format(source)}")


def _joined(shards: list[np.ndarray], axis: int | None) -> np.ndarray:
    return shards[0] if axis is None else np.concatenate(shards, axis=axis)


def _unprefixed(name: str) -> str:
    """The state's own name: "per_replica/1/unsent_gradients/dense/kernel" -> "unsent_gradients/dense/kernel"."""
    return name.split("/", 2)[2] if name.startswith(PER_REPLICA_ROOT) else name
