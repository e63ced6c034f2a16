"""All-reduce bandwidth of the project's gradient path against plain MPI, and tensor fusion.

    python bench/collectives.py                                 # the whole study, ~3 minutes
    python bench/collectives.py --sizes 4096 1048576 --rounds 2 --thresholds-mb 0 --cycle-times-ms 1

Starts itself as `mpirun -np 2 ... --worker` (one thread per process) and prints, per buffer
size (float32), the bus bandwidth 2(n-1)/n x bytes / time of
- `dist.data.sum` (one `hvd.grouped_allreduce`, in a `tf.function`: the path every
  gradient takes), and
- mpi4py `COMM_WORLD.Allreduce` on the same buffer (in place of Horovod's, NumPy arrays),
with their ratio. Then many small tensors (default 100 x 64 KiB): one grouped all-reduce against
one `hvd.allreduce` per tensor issued together in one graph (as gradients become ready, Horovod
fuses what arrives within a cycle) and against a Python loop of eager calls. The per-tensor case
is repeated under a few HOROVOD_FUSION_THRESHOLD / HOROVOD_CYCLE_TIME values, each knob moved
alone from Horovod's documented defaults, one launch each (Horovod reads them at init), and
the fastest setting is named. Methods alternate inside each round and every round starts at a
barrier, so a busy machine slows all alike; a time is the slowest rank's, the median of the
rounds. Horovod's background thread polls in every process, also while MPI runs: a cost of
Horovod that the MPI numbers share here. Writes JSON and a PNG plot to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.launchers import launch_env, run_script  # noqa: E402  (the same launcher the tests use)

KIB, MIB = 1024, 1024 * 1024
DEFAULT_SIZES = [4 * KIB * 4 ** i for i in range(9)]     # 4 KiB .. 256 MiB
HOROVOD_DEFAULTS = (128.0, 1.0)                           # fusion threshold MiB, cycle time ms
KNOB_VARIABLES = ("HOROVOD_FUSION_THRESHOLD", "HOROVOD_CYCLE_TIME")
REPEAT_BYTES = 16 * MIB                                   # back-to-back calls per timing: this much data


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=DEFAULT_SIZES, help="buffer bytes")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per measurement (median)")
    parser.add_argument("--tensors", type=int, default=100, help="small tensors in the fusion test")
    parser.add_argument("--tensor-bytes", type=int, default=64 * KIB)
    parser.add_argument("--thresholds-mb", type=float, nargs="*", default=[0, 2, 128],
                        help="HOROVOD_FUSION_THRESHOLD values (MiB), at the default cycle time")
    parser.add_argument("--cycle-times-ms", type=float, nargs="*", default=[0.2, 1, 5],
                        help="HOROVOD_CYCLE_TIME values (ms), at the default threshold")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", default="bench/results/collectives.json")
    parser.add_argument("--worker", action="store_true", help="internal: run under mpirun")
    parser.add_argument("--result", default="", help="internal: where the worker writes JSON")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- worker (under mpirun)
def timed(ops: dict[str, Callable[[], object]], comm, rounds: int, repeat: int) -> dict[str, float]:
    """Seconds per call of each op: `repeat` back-to-back calls after a barrier, the slowest
    rank's time, the median over `rounds` rounds in which the ops take turns."""
    import numpy as np
    from mpi4py import MPI
    for op in ops.values():
        op()  # warm-up: traces graphs, allocates buffers
    times = {name: [] for name in ops}
    for _ in range(rounds):
        for name, op in ops.items():
            comm.Barrier()
            start = time.perf_counter()
            for _ in range(repeat):
                op()
            times[name].append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX) / repeat)
    return {name: float(np.median(values)) for name, values in times.items()}


def measure_size(dist, comm, size: int, rounds: int) -> dict:
    """One buffer of `size` bytes: the project's all-reduce against MPI's."""
    import numpy as np
    import tensorflow as tf
    from mpi4py import MPI
    tensor = tf.random.uniform([size // 4])
    send, receive = tensor.numpy(), np.empty(size // 4, np.float32)
    project_sum = tf.function(lambda t: dist.data.sum([t])[0])
    ops = {"horovod": lambda: project_sum(tensor),
           "mpi4py": lambda: comm.Allreduce(send, receive, op=MPI.SUM)}
    return {"bytes": size, "seconds": timed(ops, comm, rounds, max(1, min(50, REPEAT_BYTES // size)))}


def measure_fusion(dist, comm, count: int, size: int, rounds: int) -> dict:
    """`count` tensors of `size` bytes: one grouped all-reduce, one all-reduce per tensor all
    issued in one graph, and one per tensor in an eager loop (each waits for the last)."""
    import horovod.tensorflow as hvd
    import tensorflow as tf
    tensors = [tf.random.uniform([size // 4]) for _ in range(count)]
    grouped = tf.function(lambda ts: dist.data.sum(ts))
    # Not the project's path: the per-tensor alternatives it is compared with.
    at_once = tf.function(lambda ts: [hvd.allreduce(t, op=hvd.Sum) for t in ts])
    single = tf.function(lambda t: hvd.allreduce(t, op=hvd.Sum))
    ops = {"grouped": lambda: grouped(tensors), "at_once": lambda: at_once(tensors),
           "loop": lambda: [single(t) for t in tensors]}
    return {"tensors": count, "tensor_bytes": size, "seconds": timed(ops, comm, rounds, 1)}


def worker(options) -> None:
    from mpi4py import MPI  # first: MPI starts with full thread support, Horovod joins it
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    from common import dist as dist_lib
    from common.mesh import parse_plan
    dist = dist_lib.init("horovod", parse_plan("data"), seed=0, deterministic=False)
    comm = MPI.COMM_WORLD
    report = {"processes": dist.num_processes,  # and the knobs as this process saw them:
              "environment": {key: os.environ.get(key) for key in KNOB_VARIABLES},
              "sizes": [measure_size(dist, comm, size, options.rounds) for size in options.sizes],
              "fusion": measure_fusion(dist, comm, options.tensors, options.tensor_bytes, options.rounds)}
    if dist.is_chief:
        Path(options.result).write_text(json.dumps(report) + "\n")


# ---------------------------------------------------------------- driver
def knob_env(knobs: tuple[float, float] | None) -> dict[str, str]:
    """The launch environment with Horovod's knobs (threshold MiB, cycle ms) set, or with
    them unset when `knobs` is None (Horovod's built-in defaults)."""
    env = {key: value for key, value in launch_env().items() if key not in KNOB_VARIABLES}
    if knobs:
        env.update(zip(KNOB_VARIABLES, (str(int(knobs[0] * MIB)), str(knobs[1]))))
    return env


def launch(options, sizes: list[int], knobs: tuple[float, float] | None) -> dict:
    """One `mpirun` of the worker under `knob_env(knobs)`; its report."""
    env = knob_env(knobs)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        args = ["--worker", f"--result={result}", f"--rounds={options.rounds}", "--sizes", *map(str, sizes),
                f"--tensors={options.tensors}", f"--tensor-bytes={options.tensor_bytes}"]
        done = run_script(Path(__file__), args, launcher="mpirun", processes=options.processes, env=env)
        if done.returncode or not result.exists():
            raise SystemExit(f"collectives worker failed (knobs {knobs or 'unset'}):\n"
                             f"{(done.stdout + done.stderr)[-3000:]}")
        report = json.loads(result.read_text())
    if report["environment"] != {key: env.get(key) for key in KNOB_VARIABLES}:
        raise SystemExit(f"the workers saw {report['environment']}, not the knobs {knobs}: check mpirun's -x")
    return report


def bus_gbps(processes: int, size: int, seconds: float) -> float:
    return 2 * (processes - 1) / processes * size / seconds / 1e9


def human(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def bandwidth_rows(main: dict) -> list[dict]:
    rows = []
    for entry in main["sizes"]:
        seconds, size = entry["seconds"], entry["bytes"]
        horovod, mpi = (bus_gbps(main["processes"], size, seconds[k]) for k in ("horovod", "mpi4py"))
        rows.append({"bytes": size, "horovod_gbps": horovod, "mpi4py_gbps": mpi, "ratio": horovod / mpi})
    return rows


def print_bandwidth(rows: list[dict], processes: int) -> None:
    print(f"all-reduce bus bandwidth, {processes} processes, float32 (GB/s):")
    print(f"  {'size':>8} {'horovod (project)':>18} {'mpi4py':>10} {'ratio':>6}")
    for row in rows:
        print(f"  {human(row['bytes']):>8} {row['horovod_gbps']:18.4g} {row['mpi4py_gbps']:10.4g} "
              f"{row['ratio']:6.3g}")


def print_fusion(fusion: dict, processes: int) -> None:
    total = fusion["tensors"] * fusion["tensor_bytes"]
    seconds = fusion["seconds"]
    print(f"{fusion['tensors']} tensors x {human(fusion['tensor_bytes'])} (time vs one grouped all-reduce):")
    labels = {"grouped": "one grouped_allreduce (project)", "at_once": "one allreduce each, one graph",
              "loop": "one allreduce each, eager loop"}
    for key, label in labels.items():
        print(f"  {label:<32} {seconds[key] * 1e3:8.2f} ms {bus_gbps(processes, total, seconds[key]):7.4g} GB/s "
              f"{seconds[key] / seconds['grouped']:6.2f}x")


def knob_settings(options) -> list[tuple[float, float]]:
    """Each knob moved alone from Horovod's defaults (the defaults themselves included once)."""
    threshold, cycle = HOROVOD_DEFAULTS
    settings = [(t, cycle) for t in options.thresholds_mb] + [(threshold, c) for c in options.cycle_times_ms]
    return list(dict.fromkeys(settings))


def sweep_knobs(options) -> list[dict]:
    rows = []
    for threshold, cycle in knob_settings(options):
        fusion = launch(options, [], (threshold, cycle))["fusion"]["seconds"]
        rows.append({"threshold_mb": threshold, "cycle_ms": cycle, **fusion})
    return rows


def print_knobs(rows: list[dict]) -> dict:
    """The table, and the setting with the fastest per-tensor (one graph) all-reduce."""
    best = min(rows, key=lambda row: row["at_once"])
    default = next((row for row in rows if (row["threshold_mb"], row["cycle_ms"]) == HOROVOD_DEFAULTS), None)
    print("per-tensor all-reduce in one graph, by HOROVOD_FUSION_THRESHOLD / HOROVOD_CYCLE_TIME:")
    for row in rows:
        mark = " (Horovod's default)" if row is default else ""
        print(f"  threshold {row['threshold_mb']:6g} MiB, cycle {row['cycle_ms']:4g} ms: "
              f"{row['at_once'] * 1e3:8.2f} ms (loop {row['loop'] * 1e3:8.2f} ms){mark}")
    print(f"fastest: threshold {best['threshold_mb']:g} MiB, cycle {best['cycle_ms']:g} ms" +
          (f"; the default takes {default['at_once'] / best['at_once']:.2f}x its time" if default else ""))
    return best


def plot(rows: list[dict], knobs: list[dict], processes: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    sizes = [row["bytes"] for row in rows]
    for key, label in (("horovod_gbps", "Horovod grouped_allreduce (project)"), ("mpi4py_gbps", "mpi4py Allreduce")):
        left.plot(sizes, [row[key] for row in rows], marker="o", label=label)
    left.set(xscale="log", yscale="log", xlabel="buffer bytes (float32)", ylabel="bus bandwidth (GB/s)",
             title=f"All-reduce, {processes} processes")
    left.legend()
    labels = [f"{row['threshold_mb']:g} MiB\n{row['cycle_ms']:g} ms" for row in knobs]
    right.bar(labels, [row["at_once"] * 1e3 for row in knobs])
    right.set(ylabel="ms per batch of tensors", title="Per-tensor all-reduce: fusion threshold / cycle time")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def driver(options) -> None:
    main = launch(options, options.sizes, None)
    rows = bandwidth_rows(main)
    print_bandwidth(rows, main["processes"])
    print_fusion(main["fusion"], main["processes"])
    knobs = sweep_knobs(options)
    best = print_knobs(knobs) if knobs else None
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"processes": main["processes"], "bandwidth": rows, "fusion": main["fusion"],
                               "knobs": knobs, "fastest_knobs": best}, indent=2) + "\n")
    plot(rows, knobs, main["processes"], out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def main() -> None:
    options = parse_args()
    if options.worker:
        worker(options)
    else:
        driver(options)


if __name__ == "__main__":
    main()
