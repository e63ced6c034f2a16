"""Batch inference by every rank of a job, and a finished run's model under the current plan.

Each data-parallel replica takes an interleaved share of the rows (`shard_rows`) and runs it in
batches; the ranks of one tensor group hold the same share and run each batch together (their
split layers' collectives pair up), so a model split by the tensor plan predicts as it trains.
Replicas never wait for each other until the end, so their shares may differ in size (rows
that do not divide, fewer rows than replicas, none at all). The outputs come back on every
rank in the order of the rows (`unshard_rows`).

A finished run's `--out_dir` holds `model.npz` (the full weights, whatever plan trained it) and
`summary.json`; every rank reads it (one host, or a folder every host sees, as --data_dir).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from common.data.pipeline import shard_rows, unshard_rows
from common.errors import RecipeError
from common.state import load_weights

FINISHED = ("model.npz", "summary.json")


def gathered_outputs(dist, outputs_of: Callable[[list], list], rows: Sequence, batch_size: int = 0) -> list:
    """`outputs_of(batch)` (one picklable output per row, such as a decoded text) over this
    replica's share of `rows`, `batch_size` rows at a time (0: the whole share at once);
    every replica's outputs, in the order of `rows`, on every rank. A collective: every rank
    calls it with the same rows."""
    share = shard_rows(rows, dist.input_shards, dist.coords["data"])
    size = batch_size or len(share) or 1
    outputs = [output for start in range(0, len(share), size) for output in outputs_of(share[start:start + size])]
    if len(outputs) != len(share):
        raise ValueError(f"outputs_of gave {len(outputs)} outputs for {len(share)} rows")
    return unshard_rows(dist.gather_replica_objects(outputs))


def predictions(dist, outputs_of: Callable[[list], list], rows: Sequence, batch_size: int, noun: str) -> list:
    """`gathered_outputs`, and on the chief's stderr how many `noun` it took and how fast, over
    how many replicas (bench/inference.py reads the rate)."""
    start = time.perf_counter()
    outputs = gathered_outputs(dist, outputs_of, rows, batch_size)
    seconds = time.perf_counter() - start
    if dist.is_chief:
        print(f"predicted {len(rows)} {noun} in {seconds:.2f} s: {len(rows) / max(seconds, 1e-9):.1f} {noun}/s "
              f"on {dist.input_shards} replicas", file=sys.stderr, flush=True)
    return outputs


def finished_run(dist, out_dir: str | Path) -> Path:
    """`out_dir`, once every rank has found a finished run there; RecipeError on every rank
    otherwise (a collective: no rank goes on to wait for one that stopped)."""
    out_dir = Path(out_dir)
    missing = [name for name in FINISHED if not (out_dir / name).is_file()]
    dist.raise_any(f"no finished model in {out_dir} ({' and '.join(FINISHED)}): train first with "
                   f"--out_dir={out_dir}" if missing else None)
    return out_dir


def load_finished(dist, model, out_dir: Path) -> None:
    """The weights of the finished run in `out_dir` into `model`, built for the current plan:
    under a tensor plan each rank keeps its slice of every split weight."""
    try:
        load_weights(model, out_dir / FINISHED[0], dist.tensor)
    except (KeyError, ValueError) as error:
        raise RecipeError(f"{out_dir / FINISHED[0]} does not match the model its config.json describes ({error}): "
                          f"train it again with --out_dir={out_dir}") from None


def chief_lines(dist, path: str) -> list[str]:
    """The lines of the text file `path` (`-`: standard input, which launchers hand to rank 0
    only), read by the chief, on every rank; RecipeError on every rank if it cannot be read."""
    lines, error = None, None
    if dist.is_chief:
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
            lines = text.splitlines()
        except (OSError, UnicodeDecodeError) as failure:
            error = f"--predict: cannot read {path} ({failure}): pass a UTF-8 text file, or - for standard input"
    dist.raise_any(error)
    return dist.broadcast_object(lines)
