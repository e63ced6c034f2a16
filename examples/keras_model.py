"""Your own Keras 3 model, trained data-parallel with the project's API (README: Your own model).

    horovodrun -np 2 python examples/keras_model.py      # or mpirun, srun, or plain python
"""
import dataclasses

import keras
import tensorflow as tf

from common import api
from common.data.images import load_images


@dataclasses.dataclass(frozen=True)
class Config(api.TrainConfig):            # every recipe flag (--steps, --plan, ...) plus these
    steps: int = api.flag(300, "optimizer steps")
    hidden: int = api.flag(256, "hidden units")


def loss_sums(model, batch, training):    # sums, not means: the step divides by the global count
    images, labels = batch
    logits = model(images, training=training)
    losses = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    correct = tf.cast(tf.argmax(logits, -1, output_type=labels.dtype) == labels, tf.float32)
    return tf.reduce_sum(losses), tf.cast(tf.size(labels), tf.float32), {"accuracy": tf.reduce_sum(correct)}


@api.guarded                               # a user-fixable error: one line, non-zero exit, every rank
def main():
    run = api.start(Config, "keras_model")  # flags, Horovod (or MirroredStrategy), the mesh
    data = load_images(data_dir=run.data_dir, dataset=None, debug=run.config.debug)
    with run.model_scope():                # the same seeded weights on every rank
        model = keras.Sequential([keras.Input(data.train_images.shape[1:]), keras.layers.Rescaling(1 / 255),
                                  keras.layers.Flatten(), keras.layers.Dense(run.config.hidden, activation="relu"),
                                  keras.layers.Dense(len(data.class_names))])
        optimizer = api.make_optimizer(run.config)  # Adam, warm-up then cosine decay
    step = api.make_step(run, model, optimizer, loss_sums)
    test_set = (data.test_images[:1000], data.test_labels[:1000])
    summary = api.train(run, model, optimizer, step, (data.train_images, data.train_labels),
                        evaluate=lambda: api.held_out_metrics(run.dist, model, loss_sums, test_set))
    if run.dist.is_chief:
        print(f"test accuracy {summary['test_accuracy']:.4f}; outputs in {run.out_dir}")


if __name__ == "__main__":
    main()
