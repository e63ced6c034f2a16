"""Run a recipe as real processes, the way users launch it, and read what it wrote (for the
tests and the benchmarks)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclass
class Result:
    returncode: int
    output: str
    seconds: float
    out_dir: Path

    def metrics(self) -> list[dict]:
        lines = (self.out_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def losses(self) -> list[float]:
        return [m["loss"] for m in self.metrics() if "loss" in m and m.get("kind") != "final"]

    def summary(self) -> dict:
        return json.loads((self.out_dir / "summary.json").read_text())

    def error_lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if "error: " in line]


def command(launcher: str, processes: int) -> list[str]:
    python = [sys.executable]
    if launcher == "python":
        return python
    if launcher == "horovodrun":
        return [str(BIN / "horovodrun"), "-np", str(processes)] + python
    if launcher == "horovodrun-gloo":
        return [str(BIN / "horovodrun"), "--gloo", "-np", str(processes)] + python
    if launcher == "mpirun":
        return ["mpirun", "-np", str(processes), "--oversubscribe", "--bind-to", "none",
                "-x", "PATH", "-x", "PYTHONPATH", "-x", "TF_CPP_MIN_LOG_LEVEL"] + python
    raise ValueError(launcher)


def launch_env(root: Path = REPO, **extra: str) -> dict[str, str]:
    """The environment of every launch (plus `extra`): quiet TensorFlow, the repository
    importable, Open MPI allowed to run as root, this environment's scripts first on PATH."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(root),
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **extra}


def run_script(script: Path, args: list[str], *, launcher: str = "python", processes: int = 2,
               timeout: float = 600, env: dict[str, str] | None = None,
               root: Path = REPO) -> subprocess.CompletedProcess:
    """Run a Python script under `launcher`, from the checkout at `root`, its output captured."""
    return subprocess.run(command(launcher, processes) + [str(script), *args], cwd=root,
                          env=env or launch_env(root), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def run_recipe(recipe: str, args: list[str], out_dir: Path, *, launcher: str = "python",
               processes: int = 2, timeout: float = 600, root: Path = REPO) -> Result:
    """Run recipes/<recipe>.py, or the script at `recipe` when it names a path ("examples/x.py"),
    from the checkout at `root` (this one by default)."""
    start = time.perf_counter()
    done = run_script(root / recipe if recipe.endswith(".py") else root / "recipes" / f"{recipe}.py",
                      [f"--out_dir={out_dir}", "--intra_op_threads=1", *args],
                      launcher=launcher, processes=processes, timeout=timeout, root=root)
    return Result(done.returncode, done.stdout + done.stderr, time.perf_counter() - start, out_dir)


def one_process_run(recipe: str, args: list[str], out_dir: Path) -> Result:
    """The one-process run that every plan must reproduce."""
    result = run_recipe(recipe, args, out_dir, launcher="python")
    assert result.returncode == 0, result.output[-3000:]
    return result


def final_weights(result):
    with np.load(sorted((result.out_dir / "checkpoints").glob("ckpt-*.npz"))[-1]) as stored:
        return {name: stored[name] for name in stored.files}


def assert_same_training(result, reference):
    assert result.returncode == 0, result.output[-3000:]
    losses, expected = np.array(result.losses()), np.array(reference.losses())
    assert len(losses) == len(expected) == 20
    np.testing.assert_allclose(losses, expected, rtol=1e-4)
    weights, expected_weights = final_weights(result), final_weights(reference)
    assert sorted(weights) == sorted(expected_weights)
    # atol: Adam moves a weight whose gradient is near rounding level (a rare token's
    # embedding row) by about lr x sign(m): there, the plans' different summation orders
    # show as up to a hundredth of one step (translate, tensor=2: 1.1e-5 at lr 2e-3).
    for name, value in weights.items():
        np.testing.assert_allclose(value, expected_weights[name], rtol=1e-4, atol=2e-5, err_msg=name)


def rewind_to(ckpt_dir, step):
    """Leave only the checkpoint of `step`, as if the run had died right after saving it."""
    for path in ckpt_dir.glob("ckpt-*.npz"):
        if path.name != f"ckpt-{step:08d}.npz":
            path.unlink()
    kept = ckpt_dir / f"ckpt-{step:08d}.npz"
    digest = hashlib.sha256(kept.read_bytes()).hexdigest()
    (ckpt_dir / "latest.json").write_text(json.dumps({"step": step, "file": kept.name, "sha256": digest}))
