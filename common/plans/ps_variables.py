"""Variables on parameter servers: a table's shards, its whole value, where each shard lives,
and `ShardedAdagrad`, the update the servers apply (why Adagrad and not a Keras optimizer:
`common.plans.ps`)."""
from __future__ import annotations

from typing import Callable

import numpy as np


def shards_of(variable) -> list:
    """The tf.Variables that hold `variable` (a keras.Variable or tf.Variable): its
    ShardedVariable's shards in row order, or itself."""
    import keras
    value = variable.value if isinstance(variable, keras.Variable) else variable
    return list(getattr(value, "variables", [value]))


def full_value(shards) -> np.ndarray:
    """The whole tensor of `shards`, read from the servers."""
    import tensorflow as tf
    return np.asarray(tf.concat([tf.convert_to_tensor(s) for s in shards], 0) if len(shards) > 1 else shards[0])


def assign_full(shards, value: np.ndarray) -> None:
    """Give each shard its rows of the whole tensor `value`."""
    if len(shards) == 1:
        shards[0].assign(value)
        return
    begin = 0
    for shard in shards:
        end = begin + int(shard.shape[0])
        shard.assign(value[begin:end])
        begin = end


def task_of(shard) -> str:
    """The task that holds `shard`, as "ps:K", from the device the runtime placed it on."""
    import tensorflow as tf
    spec = tf.DeviceSpec.from_string(shard.device)
    return f"{spec.job}:{spec.task}"


def placement(model_variables, names: list[str]) -> dict[str, dict[str, int]]:
    """{variable name: {task: rows it holds}} over the model's variables."""
    report: dict[str, dict[str, int]] = {}
    for name, v in zip(names, model_variables):
        for shard in shards_of(v):
            rows = int(shard.shape[0]) if shard.shape.rank else 1
            report.setdefault(name, {})[task_of(shard)] = report.get(name, {}).get(task_of(shard), 0) + rows
    return report


def parameters_per_task(model_variables) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in model_variables:
        for shard in shards_of(v):
            counts[task_of(shard)] = counts.get(task_of(shard), 0) + int(np.prod(shard.shape))
    return counts


class ShardedAdagrad:
    """Keras 3's Adagrad (initial accumulator 0.1, epsilon 1e-7) over variable shards, with
    --clip_norm's global-norm clipping: a table's gradient rows are merged by index and only
    those rows of the weights and accumulators change; each shard's update runs on its server."""

    def __init__(self, strategy, variables, learning_rate: Callable, clip_norm: float,
                 initial_accumulator: float = 0.1, epsilon: float = 1e-7):
        import tensorflow as tf
        self.learning_rate, self.clip_norm, self.epsilon = learning_rate, clip_norm, epsilon
        self.shards = [s for v in variables for s in shards_of(v)]
        with strategy.scope():
            self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
            self.accumulators = []
            for shard in self.shards:
                with strategy.extended.colocate_vars_with(shard):
                    self.accumulators.append(tf.Variable(tf.fill(shard.shape, initial_accumulator), trainable=False,
                                                         name="accumulator"))

    def apply(self, grads) -> None:
        """Update the shards by `grads` (one per shard, tf.IndexedSlices or dense), in a step."""
        import tensorflow as tf
        from common.plans.data import merged_rows, scaled
        grads = [merged_rows(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        if self.clip_norm:
            squares = tf.add_n([tf.reduce_sum(tf.square(g.values if isinstance(g, tf.IndexedSlices) else g))
                                for g in grads])
            grads = [scaled(g, tf.minimum(1.0, self.clip_norm / tf.maximum(tf.sqrt(squares), 1e-12))) for g in grads]
        lr = tf.cast(self.learning_rate(self.iterations), tf.float32)
        for grad, shard, accumulator in zip(grads, self.shards, self.accumulators):
            with tf.device(shard.device):
                if isinstance(grad, tf.IndexedSlices):
                    accumulator.scatter_add(tf.IndexedSlices(tf.square(grad.values), grad.indices))
                    rows = tf.gather(accumulator, grad.indices)
                    shard.scatter_sub(tf.IndexedSlices(lr * grad.values / tf.sqrt(rows + self.epsilon), grad.indices))
                else:
                    accumulator.assign_add(tf.square(grad))
                    shard.assign_sub(lr * grad / tf.sqrt(accumulator + self.epsilon))
        self.iterations.assign_add(1)
