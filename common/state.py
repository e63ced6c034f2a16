"""Training state (model + optimizer variables) as full, unsharded tensors, whatever the plan.

Checkpoints hold full tensors keyed by variable path, which no plan changes, so a checkpoint
of a tensor- or pipeline-parallel run loads into a run with any other plan: saving gathers
the shards (along each weight's split axis, in tensor-group order) and the stages to the
chief; loading hands every process the full tensors and each keeps its own slice.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common import checkpoint
from common.dist import Dist
from common.errors import RecipeError
from common.plans.tensor import local_slice, shard_axes


def variable_names(variables) -> list[str]:
    """Unique, stable names: the variable's path, numbered where a path repeats."""
    names, seen = [], {}
    for v in variables:
        base = getattr(v, "path", None) or v.name
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names


class TrainingState:
    """The variables of one process, their names and split axes."""

    def __init__(self, dist: Dist, model, optimizer):
        self.dist = dist
        self.variables = list(model.variables) + list(optimizer.variables)
        self.names = variable_names(self.variables)
        axes = shard_axes(model, optimizer)
        self.axes = {name: axes.get(id(v)) for name, v in zip(self.names, self.variables)}

    @property
    def _model_parallel(self) -> bool:
        mesh = self.dist.mesh
        return bool(mesh) and (mesh.tensor, mesh.pipeline) != (1, 1)

    def full_arrays(self) -> dict[str, np.ndarray] | None:
        """Full tensors on the chief (None elsewhere). A collective: call on every process."""
        local = {name: np.asarray(v) for name, v in zip(self.names, self.variables)}
        if not self._model_parallel:
            return local if self.dist.is_chief else None
        parts = self.dist.gather_objects((self.dist.coords, local))
        if not self.dist.is_chief:
            return None
        first_replica = sorted((c["tensor"], c["pipeline"], arrays) for c, arrays in parts if c["data"] == 0)
        full: dict[str, list[np.ndarray]] = {}
        for _, _, arrays in first_replica:
            for name, value in arrays.items():
                full.setdefault(name, []).append(value)
        return {name: self._join(name, shards) for name, shards in full.items()}

    def _join(self, name: str, shards: list[np.ndarray]) -> np.ndarray:
        axis = self.axes.get(name)
        return shards[0] if axis is None else np.concatenate(shards, axis=axis)

    def assign(self, arrays: dict[str, np.ndarray], source: Path) -> None:
        """Take this process's slice of each full tensor; refuse a checkpoint of another model."""
        missing = [name for name in self.names if name not in arrays]
        if missing:
            raise RecipeError(f"checkpoint {source} does not match this model (missing e.g. {missing[:3]}): "
                              f"resume with the flags it was trained with, or {checkpoint.FIX.format(source)}")
        group = self.dist.group("tensor")
        for name, v in zip(self.names, self.variables):
            value = local_slice(arrays[name], self.axes[name], group)
            if tuple(np.shape(value)) != tuple(v.shape):
                raise RecipeError(f"checkpoint {source}: {name} has shape {arrays[name].shape}, this model "
                                  f"{tuple(v.shape)}: resume with the flags it was trained with, or "
                                  f"{checkpoint.FIX.format(source)}")
            v.assign(value)

    def save(self, directory: Path, step: int) -> None:
        """A collective: every process calls it, the chief writes."""
        arrays = self.full_arrays()
        if self.dist.is_chief:
            checkpoint.save(directory, step, arrays)

    def restore_or_start(self, directory: Path, resume: bool) -> None:
        """Resume from the newest checkpoint if asked and one exists, else keep the fresh
        weights; either way every data-parallel replica ends with the same state."""
        error, arrays = None, None
        if self.dist.is_chief and resume and checkpoint.latest_step(directory) is not None:
            try:
                _, arrays = checkpoint.load(directory)
                self.assign(arrays, directory)
            except RecipeError as failure:  # reported on every process below
                error, arrays = str(failure), None
        self.dist.broadcast_error(error)
        if self._model_parallel:
            # Every process needs the full tensors to cut its own slices from.
            arrays = self.dist.broadcast_object(arrays)
            if arrays is not None:
                self.assign(arrays, directory)
        self.dist.group("data").broadcast_from_first(self.variables)
