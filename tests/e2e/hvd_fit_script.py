"""A Horovod Keras script on Keras 3, as a user writes one, for tests/e2e/test_hvd_fit.py:
`model.fit` of a small convnet on the embedded Fashion-MNIST through `common.hvd`, each rank
reading its share of every global batch. For each configuration in --configs it trains a
fresh model and writes to --out_dir: `<config>.json` (rank 0: the loss after every step,
averaged over the ranks, fit's epoch history and the optimizer's iteration count) and
`<config>-rank<r>.npz` (every rank's final weights).

Each rank starts from its own random weights: the broadcast callback makes them rank 0's.
"""
import argparse
import json
import os

import keras
import numpy as np
import tensorflow as tf

import common.hvd as hvd
from common.data.images import load_images

CONFIGS = {  # name: DistributedOptimizer arguments
    "plain": {},
    "passes2": {"backward_passes_per_step": 2, "average_aggregated_gradients": True},
    "fp16": {"compression": hvd.Compression.fp16},
}


class StepLosses(keras.callbacks.Callback):
    """fit's running loss after every step, averaged over the ranks (each rank's is that of
    its own rows, and every rank has as many)."""

    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(hvd.allreduce(tf.constant(float(logs["loss"]), tf.float64)).numpy()))


def shard(array: np.ndarray, global_batch: int) -> np.ndarray:
    """This rank's rows of every global batch: the r-th of `size` equal slices of each."""
    per_rank = global_batch // hvd.size()
    batches = array.reshape(-1, hvd.size(), per_rank, *array.shape[1:])
    return batches[:, hvd.rank()].reshape(-1, *array.shape[1:])


def train(config: str, images: np.ndarray, labels: np.ndarray, args) -> None:
    keras.utils.set_random_seed(1000 + hvd.rank())
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10),
    ])
    optimizer = hvd.DistributedOptimizer(keras.optimizers.SGD(0.05, momentum=0.9), **CONFIGS[config])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), optimizer=optimizer,
                  metrics=["accuracy"])
    step_losses = StepLosses()
    history = model.fit(shard(images, args.global_batch), shard(labels, args.global_batch),
                        batch_size=args.global_batch // hvd.size(), epochs=args.epochs, shuffle=False, verbose=0,
                        callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                                   hvd.callbacks.MetricAverageCallback(), step_losses])
    np.savez(os.path.join(args.out_dir, f"{config}-rank{hvd.rank()}.npz"), *model.get_weights())
    if hvd.rank() == 0:
        with open(os.path.join(args.out_dir, f"{config}.json"), "w") as out:
            json.dump({"step_losses": step_losses.losses, "history": history.history,
                       "iterations": int(optimizer.iterations.numpy())}, out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--configs", default="plain")
    parser.add_argument("--global_batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.experimental.enable_op_determinism()
    hvd.init()
    data = load_images(data_dir=args.data_dir, dataset=None, debug=True)
    count = args.steps * args.global_batch
    images = data.train_images[:count].astype("float32") / 255.0
    os.makedirs(args.out_dir, exist_ok=True)
    for config in args.configs.split(","):
        train(config, images, data.train_labels[:count], args)


if __name__ == "__main__":
    main()
