"""Training state (model + optimizer variables) as full, unsharded tensors, whatever the plan.

Checkpoints hold full tensors keyed by variable path, which no plan changes, so a checkpoint
of a tensor- or pipeline-parallel run loads into a run with any other plan: saving gathers
the shards (along each weight's split axis, in tensor-group order) and the stages to the
chief; loading hands every process the full tensors and each keeps its own slice.

State that differs between data-parallel replicas (what a lossy compressor has not yet sent,
and the optimizer's moments when each replica's optimizer steps on its own gradient) is kept
once per replica, under "per_replica/<replica>/". A run with the same replica count takes its
own back; one with another count (or another compressor) keeps the unsent sum whole: replica
0 takes it, or the weights do when this run holds unsent updates no more. Nothing is lost.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common import checkpoint
from common.compression import UNSENT_GRADIENTS, UNSENT_UPDATES, Compressor
from common.dist import Dist
from common.errors import RecipeError
from common.plans.tensor import local_slice, shard_axes

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


class TrainingState:
    """The variables of one process, their names and split axes."""

    def __init__(self, dist: Dist, model, optimizer, compressor: Compressor = Compressor()):
        self.dist = dist
        self.variables = list(model.variables) + list(optimizer.variables)
        self.names = variable_names(self.variables)
        axes = shard_axes(model, optimizer)
        self.axes = {name: axes.get(id(v)) for name, v in zip(self.names, self.variables)}
        self.replica_local = self._replica_local(model, optimizer, compressor)

    def _replica_local(self, model, optimizer, compressor) -> dict:
        """{name: variable} of the state each data-parallel replica holds its own value of."""
        name_of = {id(v): name for name, v in zip(self.names, self.variables)}
        local = {}
        for kind, states in compressor.replica_state().items():
            for weight, state in zip(model.trainable_variables, states):
                name = name_of[id(weight)]
                local[f"{kind}/{name}"] = state
                self.axes[f"{kind}/{name}"] = self.axes[name]
        if compressor.compresses_updates:
            local.update({name_of[id(v)]: v for v in optimizer.variables})
        return local

    @property
    def _model_parallel(self) -> bool:
        mesh = self.dist.mesh
        return bool(mesh) and (mesh.tensor, mesh.pipeline) != (1, 1)

    def full_arrays(self) -> dict[str, np.ndarray] | None:
        """Full tensors on the chief (None elsewhere). A collective: call on every process."""
        local = self._local_arrays()
        if not self._model_parallel and not self.replica_local:
            return local if self.dist.is_chief else None
        parts = self.dist.gather_objects((self.dist.coords, local))
        if not self.dist.is_chief:
            return None
        full: dict[str, list[np.ndarray]] = {}
        for _, arrays in sorted(parts, key=lambda part: (part[0]["tensor"], part[0]["pipeline"])):
            for name, value in arrays.items():
                full.setdefault(name, []).append(value)
        return {name: self._join(name, shards) for name, shards in full.items()}

    def _local_arrays(self) -> dict[str, np.ndarray]:
        """This process's shards: the shared state from the first replica, its own from every one."""
        replica = self.dist.coords["data"]
        arrays = {PER_REPLICA.format(replica) + name: np.asarray(v) for name, v in self.replica_local.items()}
        if replica == 0:
            arrays.update({name: np.asarray(v) for name, v in zip(self.names, self.variables)})
        return arrays

    def _join(self, name: str, shards: list[np.ndarray]) -> np.ndarray:
        axis = self.axes.get(_unprefixed(name))
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
                arrays = self._keep_unsent(arrays, directory)
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
        if self.replica_local:
            if not self._model_parallel:
                arrays = self.dist.broadcast_object(None if arrays is None else
                                                    {k: v for k, v in arrays.items() if k.startswith(PER_REPLICA_ROOT)})
            self._assign_replica_state(arrays or {})

    def _assign_replica_state(self, arrays: dict[str, np.ndarray]) -> None:
        """This replica's own state where the checkpoint has it; otherwise it keeps what it
        has: the first replica's moments, empty residuals."""
        prefix = PER_REPLICA.format(self.dist.coords["data"])
        group = self.dist.group("tensor")
        for name, v in self.replica_local.items():
            if prefix + name in arrays:
                v.assign(local_slice(arrays[prefix + name], self.axes[name], group))

    def _keep_unsent(self, arrays: dict[str, np.ndarray], source: Path) -> dict[str, np.ndarray]:
        """The checkpoint's arrays, with what its replicas had not sent summed into replica 0's
        (or, for updates this run no longer compresses, into the weights) unless every replica
        of this run takes back its own (module docstring)."""
        saved = {key for key in arrays if key.startswith(PER_REPLICA_ROOT)}
        replicas = 1 + max((int(key.split("/")[1]) for key in saved), default=-1)
        arrays = dict(arrays)
        for kind in (UNSENT_UPDATES, UNSENT_GRADIENTS):
            keys = sorted(key for key in saved if _unprefixed(key).startswith(kind + "/"))
            kept_here = any(name.startswith(kind + "/") for name in self.replica_local)
            if not keys or (kept_here and replicas == self.dist.input_shards):
                continue
            if kind == UNSENT_GRADIENTS and not kept_here:
                raise RecipeError(f"checkpoint {source} holds gradients that PowerSGD had not yet sent: resume "
                                  f"with --compression=powersgd:R to keep them, or {checkpoint.FIX.format(source)}")
            for key in keys:
                name, value = _unprefixed(key), arrays.pop(key)
                target = PER_REPLICA.format(0) + name if kept_here else name[len(kind) + 1:]
                arrays[target] = arrays[target] + value if target in arrays else value
        return arrays


def _unprefixed(name: str) -> str:
    """The state's own name: "per_replica/1/unsent_updates/dense/kernel" -> "unsent_updates/dense/kernel"."""
    return name.split("/", 2)[2] if name.startswith(PER_REPLICA_ROOT) else name
