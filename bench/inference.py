"""Distributed inference, 1 process vs N: translate's greedy decoding and classify's labelling
of the held-out set, side by side in one run.

    python bench/inference.py                       # about 7 minutes on 2 cores
    python bench/inference.py --sentences=500 --images=0 --rounds=1

Trains each recipe's default model for a few steps on one process (the weights only decide
how long greedy decoding runs), writes the held-out inputs as `--predict` takes them (the
test split's English sentences, one a line; its images as PNG files), then runs `--predict`
under python and under `mpirun -np N` (one intra-op thread per process), alternating which
goes first over `--rounds` (not horovodrun: its MPI mode loses lines of a large output,
README.md: Troubleshooting). The rate is the one the chief reports for the inference
itself (the rows sharded, run in batches and gathered; not the start-up or the model load).
The outputs of both must be the same, line for line. Prints the table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.launchers import run_recipe, run_script, REPO  # noqa: E402  (the same launcher the tests use)

RATE = re.compile(r"predicted (\d+) \w+ in [\d.]+ s: ([\d.]+) \w+/s on (\d+) replica")


def train(recipe: str, steps: int, out_dir: Path) -> None:
    result = run_recipe(recipe, [f"--steps={steps}", f"--log_every={steps}", "--checkpoint_every=0",
                                 "--max_test=500"], out_dir, launcher="python", timeout=3600)
    if result.returncode:
        raise SystemExit(f"training {recipe} failed:\n{result.output[-2000:]}")


def held_out_inputs(folder: Path, sentences: int, images: int) -> dict[str, Path]:
    """The test split's first `sentences` English sentences (a file) and `images` images (PNGs)."""
    import tensorflow as tf
    from common.data.images import load_images
    from common.data.seq2seq import load_translation
    from recipes.classify import ClassifyConfig
    from recipes.translate import TranslateConfig
    data_dir = str(Path.home() / "tensorflow_datasets")
    text = load_translation(data_dir=data_dir, dataset=None, debug=False, max_len=TranslateConfig.max_len,
                            vocab_size=TranslateConfig.vocab_size,
                            corpus=TranslateConfig.corpus).test_src_text[:sentences]
    lines = folder / "sentences.txt"
    lines.write_text("".join(line.replace("\n", " ") + "\n" for line in text))
    pictures = folder / "images"
    pictures.mkdir()
    for index, image in enumerate(load_images(data_dir=data_dir, dataset=None, debug=False,
                                              source_dir=ClassifyConfig.source_dir).test_images[:images]):
        tf.io.write_file(str(pictures / f"{index:05d}.png"), tf.io.encode_png(image))
    return {"translate": lines, "classify": pictures}


def predict(recipe: str, out_dir: Path, source: Path, launcher: str, processes: int) -> dict:
    done = run_script(REPO / "recipes" / f"{recipe}.py",
                      [f"--out_dir={out_dir}", f"--predict={source}", "--intra_op_threads=1"],
                      launcher=launcher, processes=processes, timeout=3600)
    found = RATE.search(done.stderr + done.stdout)
    if done.returncode or not found:
        raise SystemExit(f"{recipe} --predict under {launcher} failed:\n{(done.stdout + done.stderr)[-2000:]}")
    return {"rows": int(found[1]), "per_sec": float(found[2]), "replicas": int(found[3]),
            "outputs": done.stdout.replace("[1,0]<stdout>:", "").splitlines()}


def measure(recipe: str, out_dir: Path, source: Path, processes: int, rounds: int) -> dict:
    """Median rows/s of 1 and `processes` processes over `rounds` (alternating which runs first),
    and whether every run printed the same outputs."""
    rates: dict[int, list[float]] = {1: [], processes: []}
    outputs = []
    for index in range(rounds):
        order = [(1, "python"), (processes, "mpirun")]
        for count, launcher in order if index % 2 == 0 else order[::-1]:
            run = predict(recipe, out_dir, source, launcher, count)
            rates[count].append(run["per_sec"])
            outputs.append(run["outputs"])
    single, multi = statistics.median(rates[1]), statistics.median(rates[processes])
    return {"recipe": recipe, "rows": len(outputs[0]), "rates": {str(k): v for k, v in rates.items()},
            "single_per_sec": single, "multi_per_sec": multi, "ratio": multi / single,
            "same_outputs": all(out == outputs[0] for out in outputs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=0, help="held-out sentences; 0 = all")
    parser.add_argument("--images", type=int, default=2000, help="held-out images; 0 = all 10,000")
    parser.add_argument("--translate_steps", type=int, default=150)
    parser.add_argument("--classify_steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="bench/results/inference.json")
    options = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        inputs = held_out_inputs(scratch, options.sentences or None, options.images or None)
        for recipe, steps in (("translate", options.translate_steps), ("classify", options.classify_steps)):
            out_dir = scratch / recipe
            train(recipe, steps, out_dir)
            rows.append(measure(recipe, out_dir, inputs[recipe], options.processes, options.rounds))
    unit = {"translate": "sentences", "classify": "images"}
    print(f"| recipe | held-out rows | 1 process /s | {options.processes} processes /s | ratio | same outputs |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['recipe']} ({unit[row['recipe']]}) | {row['rows']} | {row['single_per_sec']:.1f} | "
              f"{row['multi_per_sec']:.1f} | {row['ratio']:.2f} | {'yes' if row['same_outputs'] else 'NO'} |")
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out).write_text(json.dumps({"processes": options.processes, "rows": rows}, indent=2) + "\n")
    differing = [row["recipe"] for row in rows if not row["same_outputs"]]
    if differing:
        raise SystemExit(f"{options.processes} processes did not print what one did: {', '.join(differing)}")


if __name__ == "__main__":
    main()
