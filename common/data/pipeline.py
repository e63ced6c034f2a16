"""tf.data input for data parallelism: the same shuffled stream on every rank, then
interleaved sharding, so the examples of global step t are the same whatever the number of
ranks (rank r of N takes every N-th example). That is what makes N-process training equal
to one-process training on the same global batch."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

PREFETCH_BATCHES = 2  # the next step's batch is ready while this one trains


def sharded_batches(arrays: Sequence[np.ndarray], *, batch_size: int, num_shards: int, shard_index: int,
                    seed: int, skip_batches: int = 0) -> Iterator:
    """Endless batches of `batch_size` examples for one shard; `skip_batches` resumes mid-run.

    A fixed prefetch and tf.data's autotuning off: its tuning thread, which the iterator's
    deletion waits for, held an elastic survivor long after a failed step, past the stall
    watchdog's timeout (`docs/fault-tolerance.md` has the times); there is nothing here for
    it to tune but the prefetch depth."""
    dataset = tf.data.Dataset.from_tensor_slices(tuple(arrays))
    dataset = dataset.shuffle(len(arrays[0]), seed=seed, reshuffle_each_iteration=True).repeat()
    dataset = dataset.shard(num_shards, shard_index).batch(batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.autotune.enabled = False
    return iter(dataset.skip(skip_batches).prefetch(PREFETCH_BATCHES).with_options(options))


def shard_rows(rows: Sequence, num_shards: int, shard_index: int) -> list:
    """Interleaved share of a list (for evaluation); `unshard_rows` restores the order."""
    return list(rows[shard_index::num_shards])


def unshard_rows(shards: Sequence[Sequence]) -> list:
    total = sum(len(s) for s in shards)
    merged = [None] * total
    for index, shard in enumerate(shards):
        merged[index::len(shards)] = shard
    return merged
