"""A Keras 3 model trained by a custom loop on Horovod, written the way Horovod's TF2 examples
are: `hvd.DistributedGradientTape` averages the gradients, `hvd.broadcast_variables` after the
first step (between steps, outside the traced step) gives every process rank 0's weights and
optimizer state. `import common.hvd as hvd` is the only change from `import horovod.tensorflow as hvd`.

    horovodrun -np 2 python examples/keras_custom_loop.py --steps=500
"""
import argparse
from pathlib import Path

import keras
import tensorflow as tf

import common.hvd as hvd
from common.data.images import load_images


def parse_args():
    parser = argparse.ArgumentParser(description="A custom training loop on Fashion-MNIST with Horovod")
    parser.add_argument("--steps", type=int, default=500, help="steps of every process")
    parser.add_argument("--batch-size", type=int, default=64, help="images per process and step")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of one process")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--data-dir", default=str(Path.home() / "tensorflow_datasets"))
    parser.add_argument("--out-dir", default="runs/keras_custom_loop")
    parser.add_argument("--debug", action="store_true", help="the small debug split of the data")
    return parser.parse_args()


def main():
    args = parse_args()
    hvd.init()  # Horovod: also pins one GPU per process, by local rank

    data = load_images(data_dir=args.data_dir, dataset=None, debug=args.debug)
    train = (tf.data.Dataset.from_tensor_slices((data.train_images, data.train_labels))
             .shard(hvd.size(), hvd.rank()).repeat().shuffle(10_000, seed=hvd.rank()).batch(args.batch_size))

    # Each process draws its own initial weights here: the broadcast after the first step
    # is what makes them rank 0's.
    model = keras.Sequential([
        keras.Input((28, 28, 1), dtype="uint8"),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(data.class_names)),
    ])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # Horovod: scale the learning rate by the number of processes.
    optimizer = keras.optimizers.Adam(args.lr * hvd.size())

    @tf.function
    def training_step(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        # Horovod: the tape's gradients are averaged over the processes.
        tape = hvd.DistributedGradientTape(tape)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    for step, (images, labels) in enumerate(train.take(args.steps)):
        loss = training_step(images, labels)
        # Horovod: after the first step (the optimizer's variables exist only then), every
        # process takes rank 0's weights and optimizer state.
        if step == 0:
            hvd.broadcast_variables(model.variables, root_rank=0)
            hvd.broadcast_variables(optimizer.variables, root_rank=0)
        if hvd.rank() == 0 and (step + 1) % args.log_every == 0:
            print(f"step {step + 1} loss {float(loss):.4f}", flush=True)

    # Every process scores its share of the test set; the sums over processes give the accuracy.
    images, labels = data.test_images[hvd.rank()::hvd.size()], data.test_labels[hvd.rank()::hvd.size()]
    correct = tf.reduce_sum(tf.cast(tf.argmax(model(images), -1, output_type=tf.int32) == labels, tf.float32))
    totals = hvd.allreduce(tf.stack([correct, float(len(labels))]), op=hvd.Sum)
    if hvd.rank() == 0:  # Horovod: only rank 0 saves
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        model.save(Path(args.out_dir) / "model.keras")
        print(f"test accuracy {float(totals[0] / totals[1]):.4f} on {int(totals[1])} images, "
              f"{hvd.size()} processes")


if __name__ == "__main__":
    main()
