"""Synthetic ImageNet-style training throughput, after Horovod's tensorflow2_synthetic_benchmark.py.

    horovodrun -np 2 python bench/synthetic.py                    # the project's Horovod data plan
    python bench/synthetic.py --mode=keras                        # plain Keras 3, no Horovod
    python bench/synthetic.py --mode=mirrored                     # MirroredStrategy, 2 logical CPUs
    TF_CONFIG='{...}' python bench/synthetic.py --mode=multiworker  # once per worker (bench/peers.py)
    horovodrun -np 2 python bench/synthetic.py --mode=fit --fused-bn  # model.fit through common.hvd

A keras.applications model (weights=None) trains on one fixed batch of random images, so only
compute and communication are measured. Every mode runs the same model, loss (softmax
cross-entropy), optimizer (SGD) and batch per replica, from a `tf.data` iterator:
- `horovod`: the project's path, `common.api.make_step` on the data plan.
- `keras`: the minimal Keras 3 step (tape, mean loss, `optimizer.apply`) in a `tf.function`; the
  reference for the plan's own overhead. (`fit` adds its own loop, callbacks and metrics.)
- `fit`: a user's Keras script on `common.hvd`: `compile` with `hvd.DistributedOptimizer`,
  `BroadcastGlobalVariablesCallback(0)`, `model.fit` on the batches, one epoch per timed
  iteration (so the fit loop's own per-step and per-epoch work is timed too).
- `mirrored` / `multiworker`: the custom training loop tf.distribute documents for Keras 3:
  `strategy.run` on batches from `distribute_datasets_from_function`, the optimizer all-reducing
  in replica context. (`fit` on a dataset of tensors fails under MultiWorkerMirroredStrategy.)
`--fused-bn` swaps every `BatchNormalization` for `common.models.norm`'s fused-kernel layer
(`use_fused_batch_norm`). Each replica gets `--intra-op-threads` TensorFlow threads. Prints
images/s per iteration and per process as Horovod's benchmark does; `--result` also writes them,
and images per second of the process's CPU time, as JSON (one file per process).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from collections.abc import Callable, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tensorflow as tf  # noqa: E402

import timing  # noqa: E402  (bench/, this script's folder)
from common.dist import configure_threads  # noqa: E402

MODES = ("horovod", "keras", "fit", "mirrored", "multiworker")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="horovod")
    parser.add_argument("--model", default="MobileNetV2", help="a keras.applications model name")
    parser.add_argument("--batch-size", type=int, default=8, help="images per replica per step")
    parser.add_argument("--image-size", type=int, default=96, help="square input side, in pixels")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--fused-bn", action="store_true",
                        help="batch normalisation in TensorFlow's fused kernel (common.models.norm)")
    parser.add_argument("--num-warmup-batches", type=int, default=10, help="steps before timing")
    parser.add_argument("--num-batches-per-iter", type=int, default=10, help="steps per timed iteration")
    parser.add_argument("--num-iters", type=int, default=10, help="timed iterations")
    parser.add_argument("--intra-op-threads", type=int, default=1, help="TensorFlow threads per replica")
    parser.add_argument("--mirrored-devices", type=int, default=2, help="mirrored: logical CPU devices")
    parser.add_argument("--allreduce", choices=("grouped", "per_tensor"), default="grouped",
                        help="horovod: the recipes' --allreduce")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", default="", help="write this process's numbers here (JSON); "
                        "'{rank}' in the path is replaced by the process rank")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- model and data
def build_model(options):
    import keras
    builder = getattr(keras.applications, options.model)
    model = builder(weights=None, input_shape=(options.image_size, options.image_size, 3),
                    classes=options.num_classes, classifier_activation=None)
    if options.fused_bn:
        from common.models.norm import use_fused_batch_norm
        model = use_fused_batch_norm(model)
    return model


def synthetic_batch(options) -> tuple[tf.Tensor, tf.Tensor]:
    """One replica's batch of random images and labels (the same on every replica)."""
    generator = tf.random.Generator.from_seed(options.seed)
    images = generator.uniform([options.batch_size, options.image_size, options.image_size, 3])
    labels = generator.uniform([options.batch_size], maxval=options.num_classes, dtype=tf.int64)
    return images, labels


def per_example_losses(model, images, labels):
    import keras
    logits = model(images, training=True)
    return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def repeated(batch) -> Iterator:
    return iter(tf.data.Dataset.from_tensors(batch).repeat())


def make_optimizer():
    import keras
    return keras.optimizers.SGD(0.01)


# ---------------------------------------------------------------- one builder per mode
# Each returns (step, process rank, replicas in this process); step() trains on one batch
# and returns a loss tensor.
def horovod_plan(options) -> tuple[Callable[[], tf.Tensor], int, int]:
    """The project's data plan on Horovod processes (any count, plain python = one)."""
    from common import api, dist as dist_lib
    from common.mesh import parse_plan
    # A Run of this benchmark's own settings: its batch is per process, not a global one to split.
    config = api.TrainConfig(seed=options.seed, allreduce=options.allreduce, clip_norm=0.0)
    dist = dist_lib.init("horovod", parse_plan("data"), seed=options.seed, deterministic=False,
                         grouped_allreduce=options.allreduce == "grouped")
    run = api.Run(config, dist, parse_plan("data"), Path("runs/synthetic"), "")  # writes nothing
    with run.model_scope():  # the same seed on every rank: equal weights, no broadcast
        model = build_model(options)

    def loss_sums(model, batch, training):
        losses = per_example_losses(model, *batch)
        return tf.reduce_sum(losses), tf.cast(tf.size(losses), tf.float32), {}

    train_step = api.make_step(run, model, make_optimizer(), loss_sums)
    batches = repeated(synthetic_batch(options))
    return (lambda: train_step(next(batches))["loss"]), run.dist.process_rank, 1


def plain_keras(options) -> tuple[Callable[[], tf.Tensor], int, int]:
    """The same model trained by the smallest Keras 3 step, no Horovod."""
    import keras
    keras.utils.set_random_seed(options.seed)
    model, optimizer = build_model(options), make_optimizer()

    @tf.function
    def train_step(batch):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(per_example_losses(model, *batch))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    batches = repeated(synthetic_batch(options))
    return (lambda: train_step(next(batches))), 0, 1


def fit_iteration_seconds(options) -> tuple[list[tuple[float, float]], int]:
    """The same model trained by `model.fit` through common.hvd, as a user's Keras script does:
    a warm-up `fit`, then one `fit` of `--num-iters` epochs of `--num-batches-per-iter` steps,
    each epoch timed. Returns (wall, CPU) seconds per epoch and the process rank."""
    import keras
    from common import hvd
    hvd.init()
    keras.utils.set_random_seed(options.seed)
    model = build_model(options)
    model.compile(optimizer=hvd.DistributedOptimizer(make_optimizer()),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dataset = tf.data.Dataset.from_tensors(synthetic_batch(options)).repeat()
    model.fit(dataset, steps_per_epoch=options.num_warmup_batches, epochs=1, verbose=0, shuffle=False,
              callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    seconds = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = timing.clocks()

        def on_epoch_end(self, epoch, logs=None):
            float(logs["loss"])  # the epoch's last step has finished
            seconds.append(timing.since(self.start))

    model.fit(dataset, steps_per_epoch=options.num_batches_per_iter, epochs=options.num_iters, verbose=0,
              shuffle=False, callbacks=[EpochTimer()])
    return seconds, hvd.rank()


def strategy_loop(strategy: tf.distribute.Strategy, options) -> Callable[[], tf.Tensor]:
    """tf.distribute's custom training loop: each replica scales its loss by the global batch,
    the optimizer sums the gradients across replicas (in replica context) and applies them."""
    import keras
    keras.utils.set_random_seed(options.seed)
    with strategy.scope():
        model, optimizer = build_model(options), make_optimizer()
    global_batch = options.batch_size * strategy.num_replicas_in_sync
    batch = synthetic_batch(options)
    dataset = strategy.distribute_datasets_from_function(
        lambda context: tf.data.Dataset.from_tensors(batch).repeat())

    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(per_example_losses(model, images, labels),
                                              global_batch_size=global_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(batch):
        losses = strategy.run(replica_step, args=batch)
        return strategy.experimental_local_results(losses)[0]

    batches = iter(dataset)
    return lambda: train_step(next(batches))


def mirrored(options) -> tuple[Callable[[], tf.Tensor], int, int]:
    """MirroredStrategy over logical CPU devices of this one process."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(options.mirrored_devices)])
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(options.mirrored_devices)])
    return strategy_loop(strategy, options), 0, options.mirrored_devices


def multiworker(options) -> tuple[Callable[[], tf.Tensor], int, int]:
    """MultiWorkerMirroredStrategy: one worker per process, the cluster in TF_CONFIG."""
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rank = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    return strategy_loop(strategy, options), rank, 1


BUILDERS = {"horovod": horovod_plan, "keras": plain_keras, "mirrored": mirrored, "multiworker": multiworker}


def main(argv=None) -> None:
    options = parse_args(argv)
    replicas_here = options.mirrored_devices if options.mode == "mirrored" else 1
    configure_threads(options.intra_op_threads * replicas_here)
    if options.mode == "fit":
        (seconds, rank), replicas = fit_iteration_seconds(options), 1
    else:
        step, rank, replicas = BUILDERS[options.mode](options)
        seconds = timing.iteration_seconds(step, options.num_warmup_batches, options.num_iters,
                                           options.num_batches_per_iter)
    measured = timing.rates(seconds, options.batch_size * replicas * options.num_batches_per_iter)
    mean, spread = measured["mean_img_sec"], 1.96 * float(np.std(measured["img_sec"]))
    print(f"[{options.mode} rank {rank}] {options.model} {options.image_size}px, batch {options.batch_size} "
          f"x {replicas} replica(s): {mean:.1f} +- {spread:.1f} img/sec", flush=True)
    if options.result:
        path = Path(options.result.format(rank=rank))
        path.write_text(json.dumps({"mode": options.mode, "rank": rank, "replicas": replicas, **measured}) + "\n")


if __name__ == "__main__":
    main()
