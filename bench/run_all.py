"""Every benchmark in sequence, then one summary: about 20 minutes on 2 cores.

    python bench/run_all.py                        # all of them
    python bench/run_all.py --only collectives peers

Runs scaling.py for each recipe, pipeline.py, collectives.py, peers.py and fusion.py with settings cut
to fit the time (each script alone takes its own defaults), shows their output as it comes,
and ends with one line or a few per benchmark, read back from the JSON they write to
bench/results/. The wall time of each is printed too, to resize the settings below.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collectives import human  # noqa: E402
from scripts.launchers import REPO, launch_env  # noqa: E402

RESULTS = REPO / "bench" / "results"
RECIPES = ("translate", "summarize", "classify")
# name: the script's arguments (each writes RESULTS / f"{name}.json")
BENCHMARKS = {
    **{f"scaling-{recipe}": ["bench/scaling.py", f"--recipe={recipe}", "--steps=60", "--log_every=20"]
       for recipe in RECIPES},
    "pipeline": ["bench/pipeline.py", "--microbatches", "1", "4", "--steps=20"],
    "collectives": ["bench/collectives.py", "--rounds=3"],
    "peers": ["bench/peers.py"],
    "fusion": ["bench/fusion.py", "--repeats=1"],
}


def summarize_scaling(report: dict) -> list[str]:
    single, multi = report["single"], report["multi"]
    return [(f"{report['recipe']}: 1 process {single['examples_per_sec']:.1f} ex/s, {multi['processes']} "
             f"processes {multi['examples_per_sec']:.1f} ex/s, efficiency {report['scaling_efficiency']:.2f}; "
             f"host ceiling {report['host_ceiling_ratio']:.2f}, {report['efficiency_of_ceiling']:.2f} of it")]


def summarize_pipeline(report: dict) -> list[str]:
    return [f"m={row['microbatches']} {row['schedule']}: efficiency {row['efficiency']:.2f} of bound "
            f"{row['gpipe_bound']:.2f}, peak RSS {row['peak_rss_mb']:.0f} MB" for row in report["rows"]]


def summarize_collectives(report: dict) -> list[str]:
    bandwidth = report["bandwidth"]
    ratios = ", ".join(f"{human(row['bytes'])} {row['ratio']:.3g}" for row in bandwidth[::2])
    seconds = report["fusion"]["seconds"]
    at_once, loop = (seconds[key] / seconds["grouped"] for key in ("at_once", "loop"))
    lines = [f"horovod / mpi4py bus bandwidth: {ratios}",
             (f"{report['fusion']['tensors']} small tensors, time vs one grouped all-reduce: per-tensor "
              f"in one graph {at_once:.2f}x, in an eager loop {loop:.2f}x")]
    best = report["fastest_knobs"]
    if best:
        lines.append(f"fastest knobs: HOROVOD_FUSION_THRESHOLD={best['threshold_mb']:g} MiB, "
                     f"HOROVOD_CYCLE_TIME={best['cycle_ms']:g} ms")
    return lines


def summarize_peers(report: dict) -> list[str]:
    labels, ratios = report["labels"], report["ratios"]
    lines = [f"{labels[key]}: {value:.1f} img/s" + (f" ({ratios[key]:.2f}x)" if key in ratios else "")
             for key, value in report["median_img_sec"].items()]
    if "horovod2_of_ceiling" in ratios:
        lines.append(f"host ceiling {ratios['host_ceiling']:.2f}x one process; the 2-process plan reaches "
                     f"{ratios['horovod2_of_ceiling']:.2f} of it")
    if "horovod1_over_keras" in ratios:
        lines.append(f"horovod plan / plain Keras, 1 process: {ratios['horovod1_over_keras']:.3f} "
                     f"(target >= {report['overhead_target']})")
    return lines


def summarize_fusion(report: dict) -> list[str]:
    medians = report["median_img_sec"]
    reference = medians[report["default"]]
    return [f"{name}: {value:.1f} img/s ({value / reference:.3f}x)" for name, value in medians.items()]


def summarize(name: str) -> list[str]:
    report = json.loads((RESULTS / f"{name}.json").read_text())
    kind = name.split("-")[0]
    return {"scaling": summarize_scaling, "pipeline": summarize_pipeline,
            "collectives": summarize_collectives, "peers": summarize_peers, "fusion": summarize_fusion}[kind](report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    options = parser.parse_args()
    outcomes = {}
    for name in options.only:
        print(f"=== {name}", flush=True)
        start = time.perf_counter()
        script, *args = BENCHMARKS[name]
        done = subprocess.run([sys.executable, script, *args, f"--out={RESULTS / name}.json"], cwd=REPO,
                              env=launch_env(), stdin=subprocess.DEVNULL)
        outcomes[name] = (done.returncode, time.perf_counter() - start)
    print("=== summary")
    for name, (code, seconds) in outcomes.items():
        print(f"{name} ({seconds:.0f} s)" + (f": FAILED, exit {code}" if code else ""))
        for line in [] if code else summarize(name):
            print(f"  {line}")
    sys.exit(max(code for code, _ in outcomes.values()))


if __name__ == "__main__":
    main()
