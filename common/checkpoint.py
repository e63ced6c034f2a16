"""Checkpoints: atomic saves on the chief, verified restores.

A checkpoint is one `.npz` of every model and optimizer variable (full, unsharded values keyed
by variable path) plus `latest.json`, which names the newest file and its SHA-256. Each file is
written under a temporary name and renamed into place, so a process killed mid-write never
leaves a torn checkpoint behind; the manifest is renamed last, and older files are deleted only
after it names the new one. A load checks the digest (`common.state` then checks names and
shapes); any mismatch is a `RecipeError` that says what to do, never a silent partial load.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
import numpy as np

from common.errors import RecipeError

MANIFEST = "latest.json"
FIX = "delete {} to start fresh, or drop --resume"


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


def save(directory: str | Path, step: int, arrays: dict[str, np.ndarray], keep: int = 3) -> Path:
    """Write step `step`'s full tensors and keep the newest `keep` checkpoints up to it (files
    of later steps, from a run that resumed before them, are gone too). Chief only."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"ckpt-{step:08d}.npz"
    _atomic_write(path, lambda f: np.savez(f, **arrays))
    manifest = {"step": step, "file": path.name, "sha256": _sha256(path)}
    _atomic_write(directory / MANIFEST, lambda f: f.write(json.dumps(manifest).encode()))
    kept = sorted(p for p in directory.glob("ckpt-*.npz") if p.name <= path.name)[-keep:]
    for old in set(directory.glob("ckpt-*.npz")) - set(kept):
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


def load(directory: str | Path) -> tuple[int, dict[str, np.ndarray]]:
    """The newest checkpoint's step and tensors, after checking its digest."""
    directory = Path(directory)
    manifest = _read_manifest(directory / MANIFEST)
    path = directory / manifest["file"]
    if not path.exists():
        raise RecipeError(f"checkpoint {path} named by {MANIFEST} is missing: {FIX.format(directory)}")
    if _sha256(path) != manifest["sha256"]:
        raise RecipeError(f"checkpoint {path} is corrupt (SHA-256 mismatch): {FIX.format(directory)}")
    try:
        with np.load(path) as stored:
            return manifest["step"], {name: stored[name] for name in stored.files}
    except Exception as error:  # any unreadable archive is the same user-facing problem
        raise RecipeError(f"checkpoint {path} cannot be read ({type(error).__name__}): "
                          f"{FIX.format(directory)}") from None
