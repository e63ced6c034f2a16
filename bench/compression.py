"""Gradient compression side by side: bytes on the wire and the held-out metric, same steps.

    python bench/compression.py                              # both recipes at their defaults: ~65 min on 2 cores
    python bench/compression.py --recipes classify --steps=200 --no_seed_spread
    python bench/compression.py --specs none fp16 topk:0.001 --recipes translate -- --d_model=256

Trains each recipe under `horovodrun -np 2` once per --compression value, from the same seed
and for the same steps, and prints for each: the gradient bytes one replica sends per step
(from the run's summary.json) and the ratio to the float32 all-reduce; the held-out metric and
its relative change from uncompressed training, which passes within --tolerance. A second
uncompressed run with another seed (unless --no_seed_spread) shows how much the metric moves
from the seed alone: the yardstick for any difference above. The JSON is rewritten after every
run, so an interrupted study keeps what it finished.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.launchers import run_recipe  # noqa: E402

DEFAULT_SPECS = ["none", "fp16", "topk:0.01", "topk:0.01,warmup=250", "powersgd:4"]
# recipe: (the metric judged, more figures shown). translate's BLEU is shown, but it is too
# coarse at this model size (about 1-2 points) to resolve a 2% change, so the teacher-forced
# held-out token accuracy is judged.
METRICS = {"translate": ("test_token_accuracy", ["bleu", "test_loss"]), "classify": ("test_accuracy", ["test_loss"])}


def train(recipe: str, spec: str, args: list[str], seed: int) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        result = run_recipe(recipe, [*args, f"--compression={spec}", f"--seed={seed}"], Path(out_dir),
                            launcher="horovodrun", timeout=3 * 3600)
        if result.returncode:
            raise SystemExit(f"{recipe} --compression={spec} failed:\n{result.output[-2000:]}")
        return {**result.summary(), "wall_seconds": result.seconds}


def row(name: str, summary: dict, baseline: dict, judged: str, shown: list[str], tolerance: float) -> dict:
    change = summary[judged] / baseline[judged] - 1.0
    return {"compression": name, "wire_bytes": summary["gradient_wire_bytes"],
            "ratio": summary["gradient_float32_bytes"] / summary["gradient_wire_bytes"],
            judged: summary[judged], "relative_change": change, "within_tolerance": abs(change) <= tolerance,
            **{key: summary[key] for key in shown}, "wall_seconds": summary["wall_seconds"]}


def compare(recipe: str, runs: list[tuple[str, str, int]], args: list[str], tolerance: float,
            save: Callable[[dict], None]) -> dict:
    """Train each (row name, --compression, seed) of `runs`, the baseline first; `save` gets
    the report so far after every run."""
    judged, shown = METRICS[recipe]
    report = {"recipe": recipe, "metric": judged, "tolerance": tolerance, "args": args, "rows": []}
    baseline = None
    for name, spec, seed in runs:
        summary = train(recipe, spec, args, seed)
        baseline = baseline or summary
        report["rows"].append(row(name, summary, baseline, judged, shown, tolerance))
        save(report)
    return report


def print_table(report: dict) -> None:
    judged, shown = METRICS[report["recipe"]]
    print(f"{report['recipe']} ({' '.join(report['args']) or 'defaults'}):")
    print(f"  {'compression':<22} {'bytes/step':>12} {'smaller':>8} {judged:>15} {'change':>8}  "
          + " ".join(f"{key:>10}" for key in shown))
    for row in report["rows"]:
        verdict = "ok" if row["within_tolerance"] else "OUT"
        print(f"  {row['compression']:<22} {row['wire_bytes']:>12,.0f} {row['ratio']:>7.1f}x {row[judged]:>15.4f} "
              f"{row['relative_change']:>+7.2%} {verdict:<3}" + " ".join(f"{row[key]:>10.4f}" for key in shown))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", choices=sorted(METRICS), default=["classify", "translate"])
    parser.add_argument("--specs", nargs="+", default=DEFAULT_SPECS, help="--compression values; none first")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps; 0 = each recipe's default")
    parser.add_argument("--tolerance", type=float, default=0.02, help="largest relative change of the metric")
    parser.add_argument("--no_seed_spread", action="store_true", help="skip the uncompressed run with seed 1")
    parser.add_argument("--out", default="bench/results/compression.json")
    parser.add_argument("recipe_args", nargs="*", help="extra recipe flags, after --")
    options = parser.parse_args()
    if options.specs[0] != "none":
        parser.error("--specs must start with none, the baseline")
    args = ["--checkpoint_every=0", *options.recipe_args]  # run_recipe adds --intra_op_threads=1
    args += [f"--steps={options.steps}"] if options.steps else []
    runs = [(spec, spec, 0) for spec in options.specs] + ([] if options.no_seed_spread else [("none, seed 1", "none", 1)])
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    finished = []

    def save(report):
        out.write_text(json.dumps(finished + [report], indent=2) + "\n")

    for recipe in options.recipes:
        finished.append(compare(recipe, runs, args, options.tolerance, save))
        print_table(finished[-1])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
