"""A Keras 3 `model.fit` script under Horovod Elastic, written the way Horovod's elastic Keras
example is: the model and optimizer live in `hvd.elastic.KerasState`, committed by callbacks,
and `@hvd.elastic.run` restarts `fit` from the last commit when workers leave or join.
`import common.hvd as hvd` is the only change from `import horovod.tensorflow.keras as hvd`.

    horovodrun -np 2 --min-np 1 --max-np 2 --host-discovery-script hostfiles/discover_hosts.sh \\
        python examples/keras_elastic.py --epochs=10
"""
import argparse
import json
from pathlib import Path

import keras
import tensorflow as tf

import common.hvd as hvd
from common.data.images import load_images


def parse_args():
    parser = argparse.ArgumentParser(description="Elastic Keras model.fit on Fashion-MNIST with Horovod")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=100, help="steps per epoch, over all workers")
    parser.add_argument("--batch-size", type=int, default=64, help="images per worker and step")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of one worker")
    parser.add_argument("--batches-per-commit", type=int, default=5)
    parser.add_argument("--data-dir", default=str(Path.home() / "tensorflow_datasets"))
    parser.add_argument("--out-dir", default="runs/keras_elastic")
    parser.add_argument("--debug", action="store_true", help="the small debug split of the data")
    return parser.parse_args()


def main():
    args = parse_args()
    hvd.init()  # Horovod: also pins one GPU per process, by local rank

    data = load_images(data_dir=args.data_dir, dataset=None, debug=args.debug)
    model = keras.Sequential([
        keras.Input((28, 28, 1), dtype="uint8"),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(len(data.class_names)),
    ])
    optimizer = hvd.DistributedOptimizer(keras.optimizers.Adam(args.lr * hvd.size()))
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])

    state = hvd.elastic.KerasState(model, batch=0, epoch=0)

    def on_state_reset():  # Horovod: the learning rate follows the number of workers
        model.optimizer.learning_rate = args.lr * hvd.size()

    state.register_reset_callbacks([on_state_reset])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log_epoch(epoch, logs):  # the current rank 0 appends a line per epoch, across resets
        if hvd.rank() == 0:
            record = {"epoch": state.epoch, "workers": hvd.size(), **{k: float(v) for k, v in logs.items()}}
            with open(out_dir / "epochs.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")

    callbacks = [
        hvd.callbacks.MetricAverageCallback(),
        # Horovod Elastic: keep epoch and batch in the state, commit it every few batches.
        hvd.elastic.UpdateEpochStateCallback(state),
        hvd.elastic.UpdateBatchStateCallback(state),
        hvd.elastic.CommitStateCallback(state, batches_per_commit=args.batches_per_commit),
        keras.callbacks.LambdaCallback(on_epoch_end=log_epoch),
    ]

    @hvd.elastic.run
    def train(state):
        # Read afresh at every (re)start: the shards follow the workers there are now.
        shard = (tf.data.Dataset.from_tensor_slices((data.train_images, data.train_labels))
                 .shard(hvd.size(), hvd.rank()).repeat().shuffle(10_000).batch(args.batch_size))
        state.model.fit(shard, steps_per_epoch=args.steps_per_epoch // hvd.size(),
                        epochs=args.epochs - state.epoch, callbacks=callbacks, verbose=2 if hvd.rank() == 0 else 0)

    train(state)
    if hvd.rank() == 0:
        model.save(out_dir / "model.keras")
        print(f"finished {args.epochs} epochs on {hvd.size()} workers", flush=True)


if __name__ == "__main__":
    main()
