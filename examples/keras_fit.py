"""A Keras 3 `model.fit` script on Horovod, written the way Horovod's TF2 Keras examples are:
`import common.hvd as hvd` where they import horovod.tensorflow.keras; every other line is the
same Horovod API (README: Bring your own Keras script).

    horovodrun -np 2 python examples/keras_fit.py --epochs=3
"""
import argparse
import json
from pathlib import Path

import keras
import tensorflow as tf

import common.hvd as hvd
from common.data.images import load_images


def parse_args():
    parser = argparse.ArgumentParser(description="Keras model.fit on Fashion-MNIST with Horovod")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps-per-epoch", type=int, default=200, help="steps of each process per epoch")
    parser.add_argument("--batch-size", type=int, default=64, help="images per process and step")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of one process")
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--data-dir", default=str(Path.home() / "tensorflow_datasets"))
    parser.add_argument("--out-dir", default="runs/keras_fit")
    parser.add_argument("--debug", action="store_true", help="the small debug split of the data")
    return parser.parse_args()


def build_model(num_classes):
    return keras.Sequential([
        keras.Input((28, 28, 1), dtype="uint8"),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(num_classes),
    ])


def main():
    args = parse_args()
    hvd.init()  # Horovod: also pins one GPU per process, by local rank

    data = load_images(data_dir=args.data_dir, dataset=None, debug=args.debug)
    # Each process reads its own shard; the test set too, in equal shares, so that the
    # averaged validation metrics are those of the whole test set.
    train = (tf.data.Dataset.from_tensor_slices((data.train_images, data.train_labels))
             .shard(hvd.size(), hvd.rank()).repeat().shuffle(10_000, seed=hvd.rank()).batch(args.batch_size))
    share = len(data.test_labels) // hvd.size()
    test = (data.test_images[hvd.rank()::hvd.size()][:share], data.test_labels[hvd.rank()::hvd.size()][:share])

    keras.utils.set_random_seed(0)
    model = build_model(len(data.class_names))
    # Horovod: scale the learning rate by the number of processes, and average the gradients.
    scaled_lr = args.lr * hvd.size()
    optimizer = hvd.DistributedOptimizer(keras.optimizers.Adam(scaled_lr))
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])

    callbacks = [
        # Horovod: start every process from rank 0's weights and optimizer state.
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        # Horovod: report metrics averaged over the processes (before any callback reads them).
        hvd.callbacks.MetricAverageCallback(),
        # Horovod: ramp the learning rate up to scaled_lr over the first epochs.
        hvd.callbacks.LearningRateWarmupCallback(initial_lr=scaled_lr, warmup_epochs=args.warmup_epochs,
                                                 steps_per_epoch=args.steps_per_epoch,
                                                 verbose=int(hvd.rank() == 0)),
    ]
    out_dir = Path(args.out_dir)
    if hvd.rank() == 0:  # Horovod: only rank 0 writes, so that processes don't overwrite each other
        out_dir.mkdir(parents=True, exist_ok=True)
        callbacks.append(keras.callbacks.ModelCheckpoint(str(out_dir / "checkpoint-{epoch}.keras")))

    history = model.fit(train, steps_per_epoch=args.steps_per_epoch, epochs=args.epochs, validation_data=test,
                        callbacks=callbacks, verbose=2 if hvd.rank() == 0 else 0)
    if hvd.rank() == 0:
        (out_dir / "history.json").write_text(json.dumps(history.history) + "\n")
        print(f"test accuracy {history.history['val_accuracy'][-1]:.4f} after {args.epochs} epochs "
              f"on {hvd.size()} processes")


if __name__ == "__main__":
    main()
