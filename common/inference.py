"""Batch inference by every rank of a job, and a finished run's model under the current plan.

The rows are cut into batches in their order, and the data-parallel replicas take the batches
in turn (`shard_rows`): every batch holds the same rows whatever the number of replicas, so its
outputs are the same too, bit for bit (a kernel's rounding may depend on the batch's shape and
contents, and greedy decoding amplifies a flipped argmax). The ranks of one tensor group hold
the same share and run each batch together (their split layers' collectives pair up), so a
model split by the tensor plan predicts as it trains. Replicas never wait for each other until
the end, so their shares may differ in size (rows that do not divide, fewer batches than
replicas, none at all). The outputs come back on every rank in the order of the rows
(`unshard_rows`).

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
    replica's batches of `rows`, `batch_size` rows each (0: one batch per replica, whose rows
    then depend on the number of replicas); every replica's outputs, in the order of `rows`,
    on every rank. A collective: every rank calls it with the same rows, and a RecipeError of
    one replica's rows (an input that cannot be read) is raised on every rank."""
    size = batch_size or -(-len(rows) // dist.input_shards) or 1
    batches = [rows[start:start + size] for start in range(0, len(rows), size)]
    outputs, error = [], None
    try:
        outputs = [_outputs_of_batch(outputs_of, batch)
                   for batch in shard_rows(batches, dist.input_shards, dist.coords["data"])]
    except RecipeError as failure:
        error = str(failure)
    dist.raise_any(error)
    return [output for batch in unshard_rows(dist.gather_replica_objects(outputs)) for output in batch]


def _outputs_of_batch(outputs_of: Callable[[list], list], batch: Sequence) -> list:
    outputs = list(outputs_of(list(batch)))
    if len(outputs) != len(batch):
        raise ValueError(f"outputs_of gave {len(outputs)} outputs for {len(batch)} rows")
    return outputs


def predictions(dist, outputs_of: Callable[[list], list], rows: Sequence, batch_size: int, noun: str) -> list:
    """`gathered_outputs`, and on the chief's stderr how many `noun` it took and how fast, over
    how many replicas (bench/inference.py reads the rate)."""
    start = time.perf_counter()
    outputs = gathered_outputs(dist, outputs_of, rows, batch_size)
    seconds = time.perf_counter() - start
    if dist.is_chief:
        print(f"predicted {len(rows)} {noun} in {seconds:.2f} s: {len(rows) / max(seconds, 1e-9):.1f} {noun}/s "
              f"on {dist.input_shards} replica{'s' * (dist.input_shards != 1)}", file=sys.stderr, flush=True)
    return outputs


def finished_run(dist, out_dir: str | Path) -> Path:
    """`out_dir`, once every rank has found a finished run there; RecipeError on every rank
    otherwise (a collective: no rank goes on to wait for one that stopped)."""
    out_dir = Path(out_dir)
    dist.raise_any(unfinished(out_dir))
    return out_dir


def unfinished(out_dir: Path) -> str | None:
    """The error line if `out_dir` holds no finished run (a one-process check), else None."""
    if all((out_dir / name).is_file() for name in FINISHED):
        return None
    return f"no finished model in {out_dir} ({' and '.join(FINISHED)}): train first with --out_dir={out_dir}"


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
