"""Horovod's TF2 custom training loop on `common.hvd`, for tests/e2e/test_hvd_custom_loop.py:
a `tf.function` step on a DistributedGradientTape that broadcasts the model's and the
optimizer's variables inside its first traced call (a Python bool, so the step is traced once
with the broadcasts and once without). Each rank starts from its own random weights and
reads its own rows. Writes `rank<r>.npz` to --out_dir: that rank's initial first kernel
(`initial`), then its final model and optimizer variables (`final_<i>`).
"""
import argparse
import os

import keras
import numpy as np
import tensorflow as tf

import common.hvd as hvd
from common.data.images import load_images


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="rows per rank and step")
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    hvd.init()
    data = load_images(data_dir=args.data_dir, dataset=None, debug=True)
    rows = slice(hvd.rank() * args.steps * args.batch, (hvd.rank() + 1) * args.steps * args.batch)
    dataset = tf.data.Dataset.from_tensor_slices(
        (data.train_images[rows].astype("float32") / 255.0, data.train_labels[rows])).batch(args.batch)
    keras.utils.set_random_seed(1000 + hvd.rank())
    model = keras.Sequential([keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    model.build((None, 28, 28, 1))
    initial = model.trainable_variables[0].numpy()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.Adam(0.01)

    @tf.function
    def training_step(images, labels, first_batch):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        tape = hvd.DistributedGradientTape(tape)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        if first_batch:
            hvd.broadcast_variables(model.variables, root_rank=0)
            hvd.broadcast_variables(optimizer.variables, root_rank=0)
        return loss

    for batch, (images, labels) in enumerate(dataset):
        training_step(images, labels, batch == 0)
    final = [np.asarray(v) for v in model.variables + optimizer.variables]
    os.makedirs(args.out_dir, exist_ok=True)
    np.savez(os.path.join(args.out_dir, f"rank{hvd.rank()}.npz"), initial=initial,
             **{f"final_{index}": value for index, value in enumerate(final)})


if __name__ == "__main__":
    main()
