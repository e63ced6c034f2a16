"""Keras 3 training speed of the project against upstream Horovod on legacy tf_keras, side by side.

    python bench/keras_speed.py            # MobileNetV2 and ResNet50, 3 rounds
    python bench/keras_speed.py --quick    # MobileNetV2, one round of a few batches

The yardstick is the environment a user who pins tf_keras gets: scripts/upstream_env.sh builds it
once (TensorFlow, upstream Horovod built against it, tf_keras; cached outside the repository);
where it cannot be built, this prints its one "skipped: ..." line and exits 0. Then, at 224 px,
batch 8 per process and one TensorFlow thread per process, on 1 process and on 2
(`horovodrun -np 2`), three configurations train the same `keras.applications` model on random
images:
- `upstream`: bench/upstream.py, upstream's synthetic benchmark step (`DistributedGradientTape`)
  on tf_keras, in that environment;
- `step`: bench/synthetic.py --mode=horovod --fused-bn, the project's own step on Keras 3 with
  batch normalisation in TensorFlow's fused kernel;
- `fit`: bench/synthetic.py --mode=fit --fused-bn, `model.fit` through common.hvd.
`--configs` can add `step_keras_bn` (the project's step with Keras's own batch normalisation)
and `upstream_yield` (upstream with `OMPI_MCA_mpi_yield_when_idle=1`, which common.dist sets for
the project's runs: without it a rank waiting in a collective busy-polls a core).
Each round runs every model, configuration and process count once, in an order rotated from
round to round so that the machine's load hits all alike. Each run gives images per wall second
and images per second of its processes' CPU time (summed over processes); the second holds still
when other jobs share the cores, but does not count time a process sleeps waiting for its peer
(a busy-polling wait does count), so for 2 processes it is an upper bound of the wall rate a
host with a free core per process would show. A ratio is taken within each round, on each
clock, and the median over rounds is printed against its target: step / upstream >= 1.0 on
1 process and >= 1.2 on 2, fit / step >= 0.95. Writes every rate and ratio to `--out` (JSON) after each run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.launchers import REPO, launch_env  # noqa: E402

BENCH = Path(__file__).resolve().parent
UPSTREAM_ENV = REPO / "scripts" / "upstream_env.sh"
SKIPPED = 3  # upstream_env.sh's exit code when the environment cannot be built


@dataclasses.dataclass(frozen=True)
class Config:
    label: str
    script: str        # in bench/
    args: tuple[str, ...] = ()
    upstream: bool = False  # runs in the upstream environment
    env: tuple[tuple[str, str], ...] = ()  # more environment variables (horovodrun passes them on)
    multi_only: bool = False  # differs from another config only when processes communicate


CONFIGS = {
    "upstream": Config("upstream Horovod, tf_keras", "upstream.py", upstream=True),
    "step": Config("project step, fused BN", "synthetic.py", ("--mode=horovod", "--fused-bn")),
    "fit": Config("model.fit via common.hvd, fused BN", "synthetic.py", ("--mode=fit", "--fused-bn")),
    "step_keras_bn": Config("project step, Keras BN", "synthetic.py", ("--mode=horovod",)),
    # What common.dist sets before MPI starts (bench/README.md): upstream with the same setting.
    "upstream_yield": Config("upstream, MPI yield_when_idle=1", "upstream.py", upstream=True,
                             env=(("OMPI_MCA_mpi_yield_when_idle", "1"),), multi_only=True),
}
# (name, numerator, denominator, processes, target)
RATIOS = [("step/upstream", "step", "upstream", 1, 1.0), ("step/upstream", "step", "upstream", 2, 1.2),
          ("fit/step", "fit", "step", 1, 0.95), ("fit/step", "fit", "step", 2, 0.95),
          ("fused/keras_bn", "step", "step_keras_bn", 1, None), ("fused/keras_bn", "step", "step_keras_bn", 2, None),
          ("step/upstream_yield", "step", "upstream_yield", 2, None)]
FULL = {"models": ["MobileNetV2", "ResNet50"], "rounds": 3, "timing": [5, 5, 4]}
QUICK = {"models": ["MobileNetV2"], "rounds": 1, "timing": [2, 3, 2]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MobileNetV2, one round, a few batches")
    parser.add_argument("--models", nargs="+", help="keras.applications models (default: by --quick)")
    parser.add_argument("--rounds", type=int, help="rounds over every run (default: by --quick)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=["upstream", "step", "fit"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8, help="images per process per step")
    parser.add_argument("--timing", nargs=3, type=int, metavar=("WARMUP", "BATCHES_PER_ITER", "ITERS"),
                        help="steps before timing, steps per timed iteration, timed iterations")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    parser.add_argument("--out", default="", help="JSON results (default bench/results/keras_speed[_quick].json)")
    options = parser.parse_args(argv)
    preset = QUICK if options.quick else FULL
    options.models = options.models or preset["models"]
    options.rounds = options.rounds or preset["rounds"]
    options.timing = options.timing or preset["timing"]
    options.out = options.out or str(BENCH / "results" / f"keras_speed{'_quick' if options.quick else ''}.json")
    return options


def upstream_python() -> Path | None:
    """The upstream environment's python, built on first use; None (the reason printed) where
    it cannot be built."""
    done = subprocess.run(["bash", str(UPSTREAM_ENV)], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode == SKIPPED:
        print(done.stdout.strip().splitlines()[-1], flush=True)
        return None
    if done.returncode:
        raise SystemExit(f"error: {UPSTREAM_ENV.name} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def launch(config: Config, processes: int, python: Path) -> list[str]:
    """The command line: the environment's python, under its own horovodrun for 2+ processes."""
    command = [str(python)]
    if processes > 1:
        command = [str(python.parent / "horovodrun"), "-np", str(processes), *command]
    return [*command, str(BENCH / config.script)]


CLOCKS = {"wall": "mean_img_sec", "cpu": "mean_cpu_img_sec"}  # result field per clock


def images_per_sec(config: Config, model: str, processes: int, python: Path, options) -> dict[str, float]:
    """One run's images per wall second and per CPU second, all processes together (the sum
    of each one's mean rates)."""
    warmup, batches, iters = options.timing
    env = launch_env(PATH=f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}", **dict(config.env))
    if config.upstream:
        env["TF_USE_LEGACY_KERAS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        args = [*config.args, f"--model={model}", f"--image-size={options.image_size}",
                f"--batch-size={options.batch_size}", "--intra-op-threads=1", f"--num-warmup-batches={warmup}",
                f"--num-batches-per-iter={batches}", f"--num-iters={iters}", f"--result={tmp}/rank{{rank}}.json"]
        try:
            done = subprocess.run(launch(config, processes, python) + args, cwd=REPO, env=env, capture_output=True,
                                  text=True, timeout=options.timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"error: {config.label}, {model}, {processes} process(es) did not finish in "
                             f"{options.timeout:.0f} s (--timeout); the rates so far are in {options.out}") from None
        results = [json.loads(path.read_text()) for path in Path(tmp).glob("rank*.json")]
    if done.returncode or len(results) != processes:
        raise SystemExit(f"error: {config.label}, {model}, {processes} process(es) failed "
                         f"(exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return {clock: sum(result[field] for result in results) for clock, field in CLOCKS.items()}


Rates = dict[str, dict[str, list[float]]]  # clock -> "model/config/processes" -> images/s per round


def rounds(options, pythons: dict[str, Path], save: Callable[[Rates], None]) -> Rates:
    """Every run's images/s per round, saved after each run; each round starts one run further
    into the list, so no run always follows the same one."""
    runs = [(model, key, processes) for model in options.models for processes in options.processes
            for key in options.configs if processes > 1 or not CONFIGS[key].multi_only]
    rates = {clock: {"/".join(map(str, run)): [] for run in runs} for clock in CLOCKS}
    for round_index in range(options.rounds):
        shift = round_index % len(runs)
        for model, key, processes in runs[shift:] + runs[:shift]:
            config = CONFIGS[key]
            measured = images_per_sec(config, model, processes, pythons[key], options)
            for clock, rate in measured.items():
                rates[clock][f"{model}/{key}/{processes}"].append(rate)
            print(f"round {round_index + 1}: {model:<12} {config.label:<36} {processes} process(es) "
                  f"{measured['wall']:7.1f} img/s, {measured['cpu']:7.1f} per CPU second", flush=True)
            save(rates)
    return rates


def ratios(rates: dict[str, list[float]], options) -> list[dict]:
    """Each ratio of RATIOS whose runs were made (on one clock): its value per round and their median."""
    rows = []
    for model in options.models:
        for name, numerator, denominator, processes, target in RATIOS:
            top, bottom = (rates.get(f"{model}/{key}/{processes}") for key in (numerator, denominator))
            if top and bottom:
                per_round = [a / b for a, b in zip(top, bottom)]
                rows.append({"model": model, "ratio": name, "processes": processes, "per_round": per_round,
                             "median": statistics.median(per_round), "target": target})
    return rows


def report(rates: Rates, rows: dict[str, list[dict]]) -> None:
    print("\nimages/s (all processes), median over rounds: per wall second, per CPU second")
    for key, values in rates["wall"].items():
        model, config, processes = key.split("/")
        if values:
            print(f"  {model:<12} {CONFIGS[config].label:<36} {processes} process(es) "
                  f"{statistics.median(values):7.1f} {statistics.median(rates['cpu'][key]):7.1f}")
    for clock, clock_rows in rows.items():
        print(f"ratios of images per {clock} second (median of per-round ratios):")
        for row in clock_rows:
            verdict = "" if row["target"] is None else (
                f"  target >= {row['target']}: {'met' if row['median'] >= row['target'] else 'MISSED'}")
            rounds_text = ", ".join(f"{value:.2f}" for value in row["per_round"])
            print(f"  {row['model']:<12} {row['ratio']:<19} {row['processes']} process(es) {row['median']:.3f} "
                  f"({rounds_text}){verdict}")


def save(path: Path, options, rates: Rates, load_before: tuple[float, ...]) -> dict[str, list[dict]]:
    """Write the rates so far and their ratios (a run cut short keeps what it measured)."""
    rows = {clock: ratios(clock_rates, options) for clock, clock_rates in rates.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": {"models": options.models, "rounds": options.rounds,
                                             "image_size": options.image_size, "batch_size": options.batch_size,
                                             "warmup_batches_per_iter_iters": options.timing,
                                             "intra_op_threads": 1},
                                "labels": {key: CONFIGS[key].label for key in options.configs},
                                "img_sec_per_round": rates, "ratios": rows,
                                "load_average_before_now": [load_before, os.getloadavg()]}, indent=2) + "\n")
    return rows


def main(argv=None) -> None:
    options = parse_args(argv)
    pythons = {key: Path(sys.executable) for key in options.configs}
    upstream_keys = [key for key in options.configs if CONFIGS[key].upstream]
    if upstream_keys:
        upstream = upstream_python()
        if upstream is None:
            return
        pythons.update(dict.fromkeys(upstream_keys, upstream))
    out, load_before = Path(options.out), os.getloadavg()
    rates = rounds(options, pythons, lambda rates: save(out, options, rates, load_before))
    report(rates, save(out, options, rates, load_before))
    print(f"load average (1, 5, 15 min) before {load_before}, after {os.getloadavg()}; wrote {out}")


if __name__ == "__main__":
    main()
