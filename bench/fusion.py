"""Gradient all-reduce settings measured in training: grouped vs per-tensor, fusion threshold, cycle time.

    python bench/fusion.py                     # ~8 minutes on 2 cores
    python bench/fusion.py --repeats 3 -- --model=ResNet50 --image-size=64

Trains bench/synthetic.py's model (MobileNetV2 by default: 158 gradient tensors) under
`horovodrun -np 2` with the project's data plan, once per setting, the settings in turn
`--repeats` times (median kept, so a busy machine hits them alike):
- `--allreduce=grouped` (the default: one grouped all-reduce once the backward pass is done)
  against `--allreduce=per_tensor` (one all-reduce per gradient as it becomes ready, which can
  overlap the rest of the backward pass; Horovod fuses those that arrive within one cycle);
- each with Horovod's HOROVOD_FUSION_THRESHOLD and HOROVOD_CYCLE_TIME moved alone from their
  defaults (128 MiB, 1 ms; `horovodrun --fusion-threshold-mb/--cycle-time-ms`
  set the same variables).
Prints images/s and the ratio to the default setting; writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import SYNTHETIC_DEFAULTS, Setup, in_turn  # noqa: E402

MIB = 1024 * 1024
# name: (--allreduce, fusion threshold MiB or None for the default, cycle time ms or None)
SETTINGS = {
    "grouped": ("grouped", None, None),
    "per_tensor": ("per_tensor", None, None),
    "grouped, cycle 0.2 ms": ("grouped", None, 0.2),
    "per_tensor, cycle 0.2 ms": ("per_tensor", None, 0.2),
    "per_tensor, cycle 5 ms": ("per_tensor", None, 5.0),
    "per_tensor, threshold 2 MiB": ("per_tensor", 2, None),
    "per_tensor, no fusion": ("per_tensor", 0, None),
}
DEFAULT = "grouped"


def setup(name: str) -> Setup:
    allreduce, threshold_mb, cycle_ms = SETTINGS[name]
    env = ([("HOROVOD_FUSION_THRESHOLD", str(int(threshold_mb * MIB)))] if threshold_mb is not None else []) + \
          ([("HOROVOD_CYCLE_TIME", str(cycle_ms))] if cycle_ms is not None else [])
    return Setup(name, "horovod", "horovodrun", 2, (f"--allreduce={allreduce}",), tuple(env))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the settings (median kept)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--out", default="bench/results/fusion.json")
    parser.add_argument("synthetic_args", nargs="*", help="bench/synthetic.py flags, after --")
    options = parser.parse_args()
    synthetic_args = SYNTHETIC_DEFAULTS + options.synthetic_args
    print(f"fusion: horovodrun -np 2 bench/synthetic.py {' '.join(synthetic_args)}")
    runs, medians = in_turn({name: setup(name) for name in options.settings}, synthetic_args, options.repeats,
                            options.timeout)
    reference = medians.get(DEFAULT)
    for name, value in medians.items():
        print(f"{name:<30} {value:8.1f} img/s" + (f"  {value / reference:5.3f} x {DEFAULT}" if reference else ""))
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"synthetic_args": synthetic_args, "settings": {n: SETTINGS[n] for n in runs},
                               "runs_img_sec": runs, "median_img_sec": medians, "default": DEFAULT}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
