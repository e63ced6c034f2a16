"""Checkpoints: atomic saves on the chief, verified restores.

A checkpoint is one `.npz` of every model and optimizer variable (full, unsharded values keyed
by variable path) plus `latest.json`, which names the newest file and its SHA-256. Each file is
written under a temporary name and renamed into place, so a crash mid-write never leaves a torn
checkpoint behind; the manifest is renamed last. A restore checks the digest, names and shapes,
and any mismatch is a `RecipeError` that says what to do, never a silent partial load.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from common.errors import RecipeError

MANIFEST = "latest.json"
KEEP = 3


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def variable_names(variables: Sequence) -> list[str]:
    """Unique, stable names: the variable's path, numbered where a path repeats."""
    names, seen = [], {}
    for v in variables:
        base = getattr(v, "path", None) or v.name
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names


def save(directory: str | Path, step: int, variables: Sequence) -> Path:
    """Write step `step`'s variables; keep the newest KEEP files. Chief only."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"ckpt-{step:08d}.npz"
    arrays = {name: np.asarray(v) for name, v in zip(variable_names(variables), variables)}
    _atomic_write(path, lambda f: np.savez(f, **arrays))
    manifest = {"step": step, "file": path.name, "sha256": _sha256(path)}
    _atomic_write(directory / MANIFEST, lambda f: f.write(json.dumps(manifest).encode()))
    for old in sorted(directory.glob("ckpt-*.npz"))[:-KEEP]:
        old.unlink()
    return path


def latest_step(directory: str | Path) -> int | None:
    manifest = Path(directory) / MANIFEST
    if not manifest.exists():
        return None
    return int(_read_manifest(manifest)["step"])


def _read_manifest(manifest: Path) -> dict:
    try:
        data = json.loads(manifest.read_text())
        return {"step": int(data["step"]), "file": str(data["file"]), "sha256": str(data["sha256"])}
    except (ValueError, KeyError, TypeError):
        raise RecipeError(f"checkpoint manifest {manifest} is corrupt: delete it and resume from an "
                          "older ckpt-*.npz by rewriting it, or drop --resume") from None


def restore(directory: str | Path, variables: Sequence) -> int:
    """Load the newest checkpoint into `variables`; returns its step."""
    directory = Path(directory)
    manifest = _read_manifest(directory / MANIFEST)
    path = directory / manifest["file"]
    fix = f"delete {directory} to start fresh, or drop --resume"
    if not path.exists():
        raise RecipeError(f"checkpoint {path} named by {MANIFEST} is missing: {fix}")
    if _sha256(path) != manifest["sha256"]:
        raise RecipeError(f"checkpoint {path} is corrupt (SHA-256 mismatch): {fix}")
    try:
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except Exception as error:  # any unreadable archive is the same user-facing problem
        raise RecipeError(f"checkpoint {path} cannot be read ({type(error).__name__}): {fix}") from None
    names = variable_names(variables)
    if sorted(arrays) != sorted(names):
        missing = sorted(set(names) - set(arrays))[:3]
        raise RecipeError(f"checkpoint {path} does not match this model (missing e.g. {missing}): "
                          f"resume with the flags it was trained with, or {fix}")
    for name, v in zip(names, variables):
        if tuple(arrays[name].shape) != tuple(v.shape):
            raise RecipeError(f"checkpoint {path}: {name} has shape {arrays[name].shape}, the model "
                              f"{tuple(v.shape)}: resume with the flags it was trained with, or {fix}")
        v.assign(arrays[name])
    return manifest["step"]
