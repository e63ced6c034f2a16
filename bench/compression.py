"""Gradient bytes on the wire per step for each compression, on translate's real model.

    python bench/compression.py                                   # the default model
    python bench/compression.py topk:0.001 powersgd:8 --d_model=512 --ff_dim=2048

Builds the model as recipes/translate.py does (any of its flags, the vocabulary from the
embedded data) and prints, per compression, the bytes one replica puts into the collectives
per step against the uncompressed float32 all-reduce, and their ratio. No training, no
processes: the byte counts depend on the variable shapes only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.compression import float32_bytes, make_compressor  # noqa: E402
from common.config import parse  # noqa: E402
from common.data.translation import load_translation  # noqa: E402
from common.dist import Group  # noqa: E402
from common.models.transformer import build_transformer  # noqa: E402
from recipes.translate import TranslateConfig  # noqa: E402

DEFAULT_SPECS = ["none", "fp16", "bf16", "topk:0.01", "powersgd:4"]


def translate_shapes(argv: list[str]) -> list[tuple[int, ...]]:
    """The trainable variable shapes of translate's one-process model under flags `argv`."""
    cfg = parse(TranslateConfig, argv)
    data_dir = cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or str(Path.home() / "tensorflow_datasets")
    data = load_translation(data_dir=data_dir, dataset=cfg.dataset or None, debug=cfg.debug, max_len=cfg.max_len,
                            vocab_size=cfg.vocab_size, source_path=cfg.freedict_file)
    model = build_transformer(cfg.transformer_size(data.tokenizer.vocab_size, cfg.max_len), Group((0,), 0))
    return [tuple(v.shape) for v in model.trainable_variables]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", default=DEFAULT_SPECS, help="--compression values")
    parser.add_argument("--out", default="bench/results/compression.json")
    options, recipe_args = parser.parse_known_args()
    shapes = translate_shapes(recipe_args)
    baseline = float32_bytes(shapes)
    print(f"translate: {len(shapes)} gradient tensors, {baseline / 4:,.0f} parameters, "
          f"{baseline:,} bytes as float32")
    report = {"float32_bytes": baseline, "tensors": len(shapes), "compressions": {}}
    for spec in options.specs:
        wire = make_compressor(spec).wire_bytes(shapes)
        report["compressions"][spec] = {"wire_bytes": wire, "ratio": baseline / wire}
        print(f"  {spec:<12} {wire:>12,} bytes  {baseline / wire:6.1f}x smaller")
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
