"""The project's Horovod data plan against tf.distribute's strategies, and its own overhead.

    python bench/peers.py                                   # ~3 minutes on 2 cores
    python bench/peers.py --repeats 3 -- --image-size=128   # flags after -- go to synthetic.py

Trains the same model on the same batch per replica with bench/synthetic.py (MobileNetV2 by
default, random images, one TensorFlow thread per replica: the 2-replica set-ups share one global
batch) in seven set-ups (`--setups` picks some), one after another:
- the project's Horovod data plan, `horovodrun -np 2` (the reference of the ratios), and the
  same with `--allreduce=per_tensor` (all-reduces overlapping the backward pass),
- `tf.distribute.MirroredStrategy` over 2 logical CPU devices of one process,
- `tf.distribute.MultiWorkerMirroredStrategy`, 2 processes on localhost ports from portpicker
  (TF_CONFIG; a custom loop on `distribute_datasets_from_function`, not `fit`),
- the Horovod plan in 1 process, against plain Keras 3 in 1 process (the plan's overhead:
  target within 3%),
- two independent 1-process runs at once: no communication, so their sum over one run alone
  is what this host allows 2 processes (its ceiling; shared vCPUs give well under 2).
`--repeats` runs the set-ups in turn that many times and keeps each one's median, so a
busy machine hits them alike. Prints images/s (all processes together) and the ratios; writes
JSON and a PNG bar chart to bench/results/.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.launchers import REPO, command, launch_env, run_script  # noqa: E402

SYNTHETIC = Path(__file__).resolve().with_name("synthetic.py")
SYNTHETIC_DEFAULTS = ["--model=MobileNetV2", "--batch-size=8", "--image-size=96", "--num-warmup-batches=5",
                      "--num-batches-per-iter=10", "--num-iters=5"]


@dataclasses.dataclass(frozen=True)
class Setup:
    label: str
    mode: str          # synthetic.py --mode
    launcher: str      # a scripts/launchers.py launcher, "tf_config" (one process per worker) or "independent"
    processes: int
    args: tuple[str, ...] = ()  # more synthetic.py flags
    env: tuple[tuple[str, str], ...] = ()  # more environment variables (horovodrun passes them on)


SETUPS = {
    "horovod2": Setup("horovod plan, 2 processes", "horovod", "horovodrun", 2),
    "horovod2_per_tensor": Setup("horovod plan, per-tensor all-reduce", "horovod", "horovodrun", 2,
                                 ("--allreduce=per_tensor",)),
    "mirrored": Setup("MirroredStrategy, 2 CPU devices", "mirrored", "python", 1),
    "multiworker": Setup("MultiWorkerMirrored, 2 processes", "multiworker", "tf_config", 2),
    "horovod1": Setup("horovod plan, 1 process", "horovod", "python", 1),
    "keras": Setup("plain Keras 3, 1 process", "keras", "python", 1),
    "independent": Setup("2 independent 1-process runs", "horovod", "independent", 2),
}
REFERENCE = "horovod2"
OVERHEAD_TARGET = 0.97  # horovod1 / keras


def run_together(setup: Setup, args: list[str], log_dir: str, timeout: float) -> tuple[int, str]:
    """`setup.processes` synthetic.py processes started at once, each writing its own result
    file: MultiWorkerMirroredStrategy workers (a cluster on free localhost ports, in TF_CONFIG)
    or independent 1-process runs. The worst exit code and everything they printed."""
    logs = [Path(log_dir) / f"process{index}.log" for index in range(setup.processes)]
    envs = [launch_env(**dict(setup.env))] * setup.processes
    if setup.launcher == "tf_config":
        import portpicker
        cluster = {"worker": [f"localhost:{portpicker.pick_unused_port()}" for _ in range(setup.processes)]}
        envs = [launch_env(**dict(setup.env), TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
                for index in range(setup.processes)]
    processes = []
    for index, (log, env) in enumerate(zip(logs, envs)):
        with log.open("w") as stream:
            processes.append(subprocess.Popen(
                command("python", 1) + [str(SYNTHETIC), *args, f"--result={log_dir}/process{index}.json"],
                cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    try:
        codes = [process.wait(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return max(codes), "".join(log.read_text() for log in logs)


def throughput(setup: Setup, synthetic_args: list[str], timeout: float) -> float:
    """Images/s of one set-up: the sum of its processes' mean rates."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [f"--mode={setup.mode}", *setup.args, *synthetic_args]
        if setup.launcher in ("tf_config", "independent"):
            code, output = run_together(setup, args, tmp, timeout)
        else:
            done = run_script(SYNTHETIC, [*args, f"--result={tmp}/rank{{rank}}.json"], launcher=setup.launcher,
                              processes=setup.processes, timeout=timeout, env=launch_env(**dict(setup.env)))
            code, output = done.returncode, done.stdout + done.stderr
        results = sorted((json.loads(path.read_text()) for path in Path(tmp).glob("*.json")),
                         key=lambda result: result["rank"])
    if code or len(results) != setup.processes:
        raise SystemExit(f"{setup.label} failed (exit {code}):\n{output[-3000:]}")
    rates = [result["mean_img_sec"] for result in results]
    print(f"  {setup.label}: {' + '.join(f'{rate:.1f}' for rate in rates)} img/s", flush=True)
    return sum(rates)


def in_turn(setups: dict[str, Setup], synthetic_args: list[str], repeats: int,
            timeout: float) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Every set-up's images/s, the set-ups run in turn `repeats` times (so a busy machine
    slows them alike); all runs and each set-up's median."""
    runs = {key: [] for key in setups}
    for _ in range(repeats):
        for key, setup in setups.items():
            runs[key].append(throughput(setup, synthetic_args, timeout))
    return runs, {key: statistics.median(values) for key, values in runs.items()}


def plot(medians: dict[str, float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(8, 3.5))
    keys = list(medians)[::-1]
    axes.barh([SETUPS[key].label for key in keys], [medians[key] for key in keys])
    axes.set(xlabel="images/s (all processes)", title="Synthetic training, same model and batch per replica")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(runs: dict[str, list[float]], medians: dict[str, float]) -> dict:
    """Print the table and the overhead check; the ratios, for the JSON."""
    ratios = {key: value / medians[REFERENCE] for key, value in medians.items()} if REFERENCE in medians else {}
    for key, value in medians.items():
        ratio = f"{ratios[key]:5.2f} x {SETUPS[REFERENCE].label}" if ratios else ""
        print(f"{SETUPS[key].label:<38} {value:8.1f} img/s  {ratio}")
    if {"horovod1", "independent"} <= medians.keys():
        ceiling = medians["independent"] / medians["horovod1"]
        ratios["host_ceiling"] = ceiling
        if REFERENCE in medians:
            ratios["horovod2_of_ceiling"] = medians[REFERENCE] / medians["independent"]
            print(f"host ceiling for 2 processes: {ceiling:.2f}x one; the 2-process plan reaches "
                  f"{ratios['horovod2_of_ceiling']:.2f} of it")
    if {"horovod1", "keras"} <= medians.keys():
        # Each round runs the two back to back: the median of the rounds' ratios cancels the
        # machine's drift between rounds, which the ratio of medians does not.
        overhead = statistics.median(h / k for h, k in zip(runs["horovod1"], runs["keras"]))
        ratios["horovod1_over_keras"] = overhead
        print(f"overhead: {SETUPS['horovod1'].label} / {SETUPS['keras'].label} = {overhead:.3f} "
              f"({'within' if overhead >= OVERHEAD_TARGET else 'OUTSIDE'} the 3% target)")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the set-ups (median kept)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per set-up run")
    parser.add_argument("--out", default="bench/results/peers.json")
    parser.add_argument("synthetic_args", nargs="*", help="bench/synthetic.py flags, after --")
    options = parser.parse_args()
    synthetic_args = SYNTHETIC_DEFAULTS + options.synthetic_args
    print(f"peers: bench/synthetic.py {' '.join(synthetic_args)}")
    runs, medians = in_turn({key: SETUPS[key] for key in options.setups}, synthetic_args, options.repeats,
                            options.timeout)
    ratios = report(runs, medians)
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"synthetic_args": synthetic_args, "labels": {k: SETUPS[k].label for k in runs},
                               "runs_img_sec": runs, "median_img_sec": medians, "ratios": ratios,
                               "overhead_target": OVERHEAD_TARGET}, indent=2) + "\n")
    plot(medians, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
