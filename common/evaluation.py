"""Evaluation by all ranks together: each data-parallel replica takes an interleaved share of
the held-out rows, and the shares come back together in the rows' order on every rank. The
ranks of a tensor or pipeline group work on the same share (their collectives need it), and
only one of them counts (`Dist.gather_replica_objects`)."""
from __future__ import annotations

from typing import Callable, Sequence

from common.data.pipeline import shard_rows, unshard_rows
from common.errors import RecipeError


def gathered_outputs(dist, outputs_of: Callable[[list], list], rows: Sequence) -> list:
    """`outputs_of(share)` (one picklable output per row, such as a decoded text) over this
    replica's share of `rows`; every replica's outputs, in the order of `rows`, on every rank."""
    share = shard_rows(rows, dist.input_shards, dist.coords["data"])
    return unshard_rows(dist.gather_replica_objects(outputs_of(share)))


def held_out_metrics(dist, model, loss_sums, arrays, batch_size: int = 500) -> dict[str, float]:
    """The mean loss and metrics of `loss_sums` over `arrays` (a held-out set every rank holds
    whole), as "test_loss" and "test_<metric>". Not for pipeline plans (no stage holds the
    whole model)."""
    if not len(arrays[0]):
        raise RecipeError("the held-out set is empty: check --max_test and the data set's test split")
    share = [a[dist.coords["data"]::dist.input_shards] for a in arrays]
    totals: dict[str, float] = {}
    for start in range(0, len(share[0]), batch_size):
        batch = tuple(a[start:start + batch_size] for a in share)
        loss, count, metrics = loss_sums(model, batch, False)
        for key, value in {"loss": loss, "count": count, **metrics}.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    counted = dist.gather_replica_objects(totals)
    summed = {key: sum(sums.get(key, 0.0) for sums in counted) for key in set().union(*counted)}
    return {f"test_{key}": value / summed["count"] for key, value in summed.items() if key != "count"}
