"""Data-parallel scaling of a recipe: 1 process vs N processes, measured in one run.

    python bench/scaling.py --recipe=translate --processes=2 --steps=120

Both runs use the same global batch and one intra-op thread per process, so on a host with
N free cores the ideal ratio is N. Prints throughput (steady state: the first logging window,
which includes tracing, is left out) and the efficiency N-process / (N x 1-process), and
writes them as JSON.

What the host itself allows is measured too: N independent 1-process runs at once, with no
communication at all. Their summed throughput over one run alone is the host's ceiling (on
shared or hyper-threaded vCPUs it is well under N), and the N-process run over that sum is the
efficiency the plan can be blamed for.

    python bench/scaling.py --recipe=translate --baseline=../before --rounds=3

With `--baseline`, a checkout of another commit (e.g. `git worktree add ../before <commit>`),
the N-process run of this checkout and of the baseline alternate for `--rounds` rounds, and the
median ratio of their throughputs is printed: a change's effect on speed, measured side by side.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.launchers import REPO, run_recipe  # noqa: E402  (the same launcher the tests use)


def measure(recipe: str, launcher: str, processes: int, args: list[str], root: Path = REPO) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        result = run_recipe(recipe, args, Path(out_dir), launcher=launcher, processes=processes, root=root)
        if result.returncode:
            raise SystemExit(f"{launcher} run failed:\n{result.output[-2000:]}")
        summary = result.summary()
    return {"launcher": launcher, "processes": processes,
            "examples_per_sec": summary["steady_examples_per_sec"],
            "tokens_per_sec": summary["steady_tokens_per_sec"]}


def measure_independent(recipe: str, processes: int, args: list[str]) -> dict:
    """`processes` 1-process runs started together; their summed throughput."""
    with ThreadPoolExecutor(processes) as pool:
        runs = list(pool.map(lambda _: measure(recipe, "python", 1, args), range(processes)))
    return {"launcher": "python", "processes": processes, "runs": runs,
            **{key: sum(run[key] for run in runs) for key in ("examples_per_sec", "tokens_per_sec")}}


def against_baseline(recipe: str, processes: int, args: list[str], baseline: Path, rounds: int) -> dict:
    """This checkout's N-process throughput over the baseline's, `rounds` times, which of the
    two runs first alternating from round to round (a busy host's drift then hits both alike)."""
    runs = []
    for index in range(rounds):
        roots = [REPO, baseline] if index % 2 == 0 else [baseline, REPO]
        measured = {root: measure(recipe, "horovodrun", processes, args, root=root) for root in roots}
        runs.append((measured[REPO], measured[baseline]))
    ratios = [this["examples_per_sec"] / before["examples_per_sec"] for this, before in runs]
    return {"baseline": str(baseline), "runs": runs, "ratios": ratios, "median_ratio": statistics.median(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="translate")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--log_every", type=int, default=20)
    parser.add_argument("--out", default="bench/results/scaling.json")
    parser.add_argument("--baseline", default="", help="another checkout to compare this one with (see above)")
    parser.add_argument("--rounds", type=int, default=3, help="with --baseline: alternating rounds")
    parser.add_argument("recipe_args", nargs="*", help="extra recipe flags, after --")
    options = parser.parse_args()
    args = [f"--steps={options.steps}", f"--log_every={options.log_every}", "--checkpoint_every=0",
            "--max_test=64", *options.recipe_args]
    if options.baseline:
        report = against_baseline(options.recipe, options.processes, args, Path(options.baseline).resolve(),
                                  options.rounds)
        print(f"{options.recipe}, {options.processes} processes: this checkout over {options.baseline}: "
              + ", ".join(f"{ratio:.3f}" for ratio in report["ratios"]) + f" (median {report['median_ratio']:.3f})")
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps(report, indent=2) + "\n")
        return
    single = measure(options.recipe, "python", 1, args)
    multi = measure(options.recipe, "horovodrun", options.processes, args)
    independent = measure_independent(options.recipe, options.processes, args)
    ratio = multi["examples_per_sec"] / single["examples_per_sec"]
    ceiling = independent["examples_per_sec"] / single["examples_per_sec"]
    report = {"recipe": options.recipe, "single": single, "multi": multi, "independent": independent,
              "throughput_ratio": ratio, "scaling_efficiency": ratio / options.processes,
              "host_ceiling_ratio": ceiling, "efficiency_of_ceiling": ratio / ceiling}
    print(f"{options.recipe}: 1 process {single['examples_per_sec']:.1f} ex/s, "
          f"{options.processes} processes {multi['examples_per_sec']:.1f} ex/s, "
          f"ratio {ratio:.2f}, efficiency {ratio / options.processes:.2f}; "
          f"{options.processes} independent processes {independent['examples_per_sec']:.1f} ex/s "
          f"(host ceiling {ceiling:.2f}), so {ratio / ceiling:.2f} of what the host allows")
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
