"""Pipeline efficiency against the GPipe bound, and 1F1B's activation memory against GPipe's.

    python bench/pipeline.py --microbatches 1 2 4 8

For p=2 stages and each micro-batch count m, runs summarize.py on one process (the whole
model) and on 2 pipeline stages with the same global batch, one intra-op thread per process,
and reports efficiency = throughput_p / (p x throughput_1) next to the bound m / (m + p - 1).
Then, at the largest m, GPipe against 1F1B: micro-batches in flight, activation bytes held at
the stage boundary, and the chief's peak resident memory. Writes JSON next to the printout.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.launchers import run_recipe  # noqa: E402  (the same launcher the tests use)


def summary(args: list[str], launcher: str, processes: int) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        result = run_recipe("summarize", args, Path(out_dir), launcher=launcher, processes=processes)
        if result.returncode:
            raise SystemExit(f"run failed ({' '.join(args)}):\n{result.output[-2000:]}")
        return result.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--global_batch_size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", default="bench/results/pipeline.json")
    options = parser.parse_args()
    stages = 2
    common = [f"--steps={options.steps}", "--log_every=10", "--checkpoint_every=0", "--max_test=8",
              f"--global_batch_size={options.global_batch_size}", f"--layers={options.layers}"]
    single = summary(common, "python", 1)["steady_examples_per_sec"]
    rows = []
    for m in options.microbatches:
        for schedule in ("gpipe", "1f1b"):
            result = summary(common + [f"--plan=pipeline={stages},microbatches={m},schedule={schedule}"],
                             "horovodrun", stages)
            efficiency = result["steady_examples_per_sec"] / (stages * single)
            rows.append({"microbatches": m, "schedule": schedule, "efficiency": efficiency,
                         "gpipe_bound": m / (m + stages - 1), "in_flight": result["pipeline_peak_in_flight"],
                         "activation_bytes_held": result["pipeline_peak_in_flight"] * result["activation_bytes_per_microbatch"],
                         "peak_rss_mb": result["peak_rss_mb"]})
            row = rows[-1]
            print(f"p={stages} m={m:2d} {schedule:5s}: efficiency {row['efficiency']:.2f} "
                  f"(bound {row['gpipe_bound']:.2f}, ratio {row['efficiency'] / row['gpipe_bound']:.2f}); "
                  f"stage-0 micro-batches in flight {row['in_flight']}, activation bytes held "
                  f"{row['activation_bytes_held']}, peak RSS {row['peak_rss_mb']:.0f} MB")
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out).write_text(json.dumps({"single_examples_per_sec": single, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
