"""recommend.py on the Horovod data plan and on parameter servers, side by side in one run.

    python bench/recommend.py                                  # the recipe's defaults, both plans
    python bench/recommend.py --steps=1000 -- --optimizer=adagrad --lr=0.1

Runs `horovodrun -np N recipes/recommend.py` (embedding gradients as sparse rows) and
`recipes/recommend.py --plan=ps,workers=N,servers=M` (a local cluster on loopback) with the same
flags, and prints each one's held-out RMSE, recall@10, steady-state examples/s and their ratio,
the data plan's gradient bytes per step and replica as rows against the dense all-reduce they
replace, and the trivial baselines on the same split (the training mean and each movie's mean
rating for RMSE, the most-rated unseen movies for recall@10). Writes them as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.launchers import run_recipe  # noqa: E402  (the same launcher the tests use)

K = 10


def measure(name: str, launcher: str, processes: int, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        result = run_recipe("recommend", args, Path(out_dir), launcher=launcher, processes=processes, timeout=3600)
        if result.returncode:
            raise SystemExit(f"{name} run failed:\n{result.output[-2000:]}")
        summary = result.summary()
    return {"plan": name, "seconds": result.seconds, **{key: summary.get(key) for key in (
        "test_rmse", f"test_recall_at_{K}", f"test_ndcg_at_{K}", "steady_examples_per_sec",
        "gradient_wire_bytes", "gradient_float32_bytes", "final_loss")}}


def baselines(data_dir: str, debug: bool) -> dict:
    """RMSE of the training mean and of each movie's mean rating (shrunk towards the training
    mean by 5 ratings' weight), recall@10 of the most-rated movies each user has not rated."""
    from common.data.movielens import load_ratings
    from common.models.recommender import by_user, ranking_scores, top_unseen
    data = load_ratings(data_dir=data_dir, dataset=None, debug=debug)
    (users, items, ratings), (test_users, test_items, test_ratings) = data.train, data.test
    mean = ratings.mean()
    counts = np.bincount(items, minlength=data.num_items)
    item_means = (np.bincount(items, ratings, minlength=data.num_items) + 5 * mean) / (counts + 5)
    seen, held_out = by_user(data.num_users, users, items), by_user(data.num_users, test_users, test_items)
    popular = [ranking_scores(top_unseen(counts, seen[user][0], K), held_out[user][0], K)[0]
               for user in sorted(set(test_users.tolist()))]
    return {"global_mean_rmse": float(np.sqrt(np.mean((test_ratings - mean) ** 2))),
            "item_mean_rmse": float(np.sqrt(np.mean((test_ratings - item_means[test_items]) ** 2))),
            f"most_rated_recall_at_{K}": float(np.mean(popular))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="Horovod processes, and PS workers")
    parser.add_argument("--servers", type=int, default=2, help="parameter servers")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps; 0 = the recipe's default")
    parser.add_argument("--data_dir", default=str(Path(tempfile.gettempdir()) / "bench-recommend-tfds"))
    parser.add_argument("--debug", action="store_true", help="the recipe's --debug data and model")
    parser.add_argument("--out", default="bench/results/recommend.json")
    parser.add_argument("recipe_args", nargs="*", help="extra recipe flags, after --")
    options = parser.parse_args()
    args = [f"--data_dir={options.data_dir}", "--checkpoint_every=0", *(["--debug"] * options.debug),
            *([f"--steps={options.steps}"] * bool(options.steps)), *options.recipe_args]
    data_plan = measure(f"data (horovodrun -np {options.workers})", "horovodrun", options.workers, args)
    ps_plan = measure(f"ps,workers={options.workers},servers={options.servers}", "python", 1,
                      [*args, f"--plan=ps,workers={options.workers},servers={options.servers}"])
    report = {"runs": [data_plan, ps_plan], "baselines": baselines(options.data_dir, options.debug),
              "ps_over_data_throughput": ps_plan["steady_examples_per_sec"] / data_plan["steady_examples_per_sec"],
              "dense_over_sparse_bytes": data_plan["gradient_float32_bytes"] / data_plan["gradient_wire_bytes"]}
    for run in report["runs"]:
        print(f"{run['plan']:<28} test RMSE {run['test_rmse']:.4f}  recall@{K} {run[f'test_recall_at_{K}']:.4f}  "
              f"{run['steady_examples_per_sec']:,.0f} examples/s  ({run['seconds']:.0f} s in all)")
    print(f"PS / Horovod throughput: {report['ps_over_data_throughput']:.2f}")
    print(f"Horovod gradient bytes per step and replica: {data_plan['gradient_wire_bytes']:,} as sparse rows, "
          f"{data_plan['gradient_float32_bytes']:,} as the dense all-reduce ({report['dense_over_sparse_bytes']:.1f}x)")
    print("baselines: " + ", ".join(f"{key} {value:.4f}" for key, value in report["baselines"].items()))
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
