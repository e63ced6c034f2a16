"""Training steps of two stacked batch normalisations, written to OUT/rank-<r>.npz.

    sync_bn_script.py OUT sync       (under horovodrun) SyncBatchNormalization over the world;
                                     each rank normalises its rows of every step's batch
    sync_bn_script.py OUT keras      (one process) keras.layers.BatchNormalization on whole batches
    sync_bn_script.py OUT bad_group  SyncBatchNormalization given MirroredStrategy's group

Every step's batch is the same fixed array in both modes; the loss is a sum over rows, so a
rank's gradients w.r.t. its rows are the whole batch's, and its weight gradients summed over
the ranks are one process's. Each mode runs in float32 (the kernel users train with) and in
float64 (where the two orders of summation agree to many more digits): keys "<dtype>/<name>".
"""
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

from common import api, dist as dist_lib
from common.mesh import Plan

SHAPE = (3, 3, 5)  # rows of height x width x channels
# Rows of rank 0 in each step's batch (rank 1 has the rest): equal halves, then an unequal split.
BATCHES = [(8, 4), (8, 4), (7, 5)]
MOMENTUM = 0.6
DTYPES = ("float32", "float64")


def batch(step: int) -> np.ndarray:
    """Channels with unequal means and scales, so that a wrong statistic shows."""
    rng = np.random.RandomState(step)
    rows = BATCHES[step][0]
    return (rng.randn(rows, *SHAPE) * rng.uniform(0.5, 3, SHAPE[-1])
            + rng.uniform(-2, 2, SHAPE[-1])).astype("float32")


def rows_of(step: int, rank: int, size: int) -> slice:
    if size == 1:
        return slice(None)
    rows, first = BATCHES[step]
    return slice(0, first) if rank == 0 else slice(first, rows)


def loss_of(y: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tf.tanh(y) * tf.range(1.0, y.shape[-1] + 1.0, dtype=y.dtype))


def build_layers(mode: str, dist: dist_lib.Dist, dtype: str) -> list:
    """Two layers, built before the traced step so that it sees their weights."""
    import keras
    from common.models.norm import SyncBatchNormalization
    if mode == "keras":
        layers = [keras.layers.BatchNormalization(momentum=MOMENTUM, dtype=dtype) for _ in range(2)]
    else:
        group = dist_lib.ReplicaGroup(2) if mode == "bad_group" else dist.data
        layers = [SyncBatchNormalization(group, momentum=MOMENTUM, dtype=dtype) for _ in range(2)]
    for layer in layers:
        layer.build((None, *SHAPE))
    return layers


def record_steps(layers: list, dist: dist_lib.Dist, dtype: str) -> dict[str, np.ndarray]:
    weights = [w for layer in layers for w in layer.trainable_weights]

    @tf.function(reduce_retracing=True)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layers[1](tf.tanh(layers[0](x, training=True)), training=True)
            loss = loss_of(y)
        return y, tape.gradient(loss, [x, *weights])

    arrays = {}
    for index in range(len(BATCHES)):
        x = tf.constant(batch(index)[rows_of(index, dist.process_rank, dist.num_processes)], dtype)
        y, (x_grad, *weight_grads) = step(x)
        arrays[f"outputs_{index}"], arrays[f"input_grad_{index}"] = y.numpy(), x_grad.numpy()
        for number, grad in enumerate(weight_grads):
            arrays[f"weight_grad_{index}_{number}"] = grad.numpy()
    for number, layer in enumerate(layers):
        arrays[f"moving_mean_{number}"] = layer.moving_mean.numpy()
        arrays[f"moving_variance_{number}"] = layer.moving_variance.numpy()
    return {f"{dtype}/{name}": value for name, value in arrays.items()}


@api.guarded
def main():
    out, mode = Path(sys.argv[1]), sys.argv[2]
    dist = dist_lib.init("horovod", Plan(), seed=0, deterministic=False, intra_op_threads=1)
    arrays = {}
    for dtype in DTYPES:
        arrays.update(record_steps(build_layers(mode, dist, dtype), dist, dtype))
    np.savez(out / f"rank-{dist.process_rank}.npz", **arrays)


if __name__ == "__main__":
    main()
