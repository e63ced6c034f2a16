"""Upstream Horovod's synthetic benchmark logic on legacy tf_keras: the yardstick of bench/keras_speed.py.

    TF_USE_LEGACY_KERAS=1 horovodrun -np 2 <upstream env>/bin/python bench/upstream.py --model=ResNet50

Runs only in the environment scripts/upstream_env.sh builds (tf_keras beside TensorFlow, upstream
Horovod), never in the project's own: Horovod's Keras and gradient-tape wrappers work on tf_keras's
variables only. This file is therefore the one place outside common/dist.py that imports Horovod:
what it measures is upstream Horovod itself.

The training step is the one Horovod's TF2 synthetic benchmark times: a `keras.applications` model
(weights=None, softmax output), sparse categorical cross-entropy on one fixed batch of random images
and labels, SGD(0.01), the gradients averaged by `hvd.DistributedGradientTape`, and model and
optimizer variables broadcast from rank 0 after the first step. The flags, the timing and the
`--result` JSON are bench/synthetic.py's, so that the two scripts' numbers compare directly.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

import timing  # bench/, this script's folder


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="MobileNetV2", help="a keras.applications model name")
    parser.add_argument("--batch-size", type=int, default=8, help="images per process per step")
    parser.add_argument("--image-size", type=int, default=224, help="square input side, in pixels")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--num-warmup-batches", type=int, default=10, help="steps before timing")
    parser.add_argument("--num-batches-per-iter", type=int, default=10, help="steps per timed iteration")
    parser.add_argument("--num-iters", type=int, default=10, help="timed iterations")
    parser.add_argument("--intra-op-threads", type=int, default=1, help="TensorFlow threads per process")
    parser.add_argument("--inter-op-threads", type=int, default=-1,
                        help="TensorFlow inter-op threads (-1: as many as intra-op, as bench/synthetic.py; "
                             "0: TensorFlow's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", default="", help="write this process's numbers here (JSON); "
                        "'{rank}' in the path is replaced by the process rank")
    return parser.parse_args(argv)


def make_step(options, tf, hvd):
    """The benchmark's step: one `tf.function` whose first call also broadcasts the variables."""
    builder = getattr(tf.keras.applications, options.model)
    model = builder(weights=None, input_shape=(options.image_size, options.image_size, 3),
                    classes=options.num_classes)
    optimizer = tf.keras.optimizers.SGD(0.01)
    generator = tf.random.Generator.from_seed(options.seed)
    images = generator.uniform([options.batch_size, options.image_size, options.image_size, 3])
    labels = generator.uniform([options.batch_size, 1], maxval=options.num_classes, dtype=tf.int64)

    @tf.function
    def step(first_batch: bool):
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(labels, probabilities))
        tape = hvd.DistributedGradientTape(tape)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        if first_batch:  # a Python bool: traced once with the broadcast, once without
            hvd.broadcast_variables(model.variables, root_rank=0)
            hvd.broadcast_variables(optimizer.variables(), root_rank=0)
        return loss

    return step


def main(argv=None) -> None:
    options = parse_args(argv)
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise SystemExit("error: bench/upstream.py measures legacy tf_keras: set TF_USE_LEGACY_KERAS=1 "
                         "and run it with the python of scripts/upstream_env.sh")
    import tensorflow as tf
    import horovod.tensorflow as hvd
    tf.config.threading.set_intra_op_parallelism_threads(options.intra_op_threads)
    inter_op = options.intra_op_threads if options.inter_op_threads < 0 else options.inter_op_threads
    tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    hvd.init()
    step = make_step(options, tf, hvd)
    step(True)  # the first warm-up step
    seconds = timing.iteration_seconds(lambda: step(False), options.num_warmup_batches - 1, options.num_iters,
                                       options.num_batches_per_iter)
    measured = timing.rates(seconds, options.batch_size * options.num_batches_per_iter)
    mean, spread = measured["mean_img_sec"], 1.96 * float(np.std(measured["img_sec"]))
    print(f"[upstream rank {hvd.rank()}] {options.model} {options.image_size}px, batch {options.batch_size} "
          f"on tf_keras: {mean:.1f} +- {spread:.1f} img/sec", flush=True)
    if options.result:
        Path(options.result.format(rank=hvd.rank())).write_text(json.dumps(
            {"mode": "upstream", "rank": hvd.rank(), "replicas": 1, **measured}) + "\n")


if __name__ == "__main__":
    main()
