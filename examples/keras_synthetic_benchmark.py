"""Training throughput of a keras.applications model on random images, with Horovod's
`DistributedGradientTape`: the flags and the printed lines of Horovod's TF2 synthetic benchmark,
on Keras 3 (`import common.hvd as hvd`).

    horovodrun -np 2 python examples/keras_synthetic_benchmark.py --model=MobileNetV2 --batch-size=8
"""
import argparse
import time

import keras
import numpy as np
import tensorflow as tf

import common.hvd as hvd
from common.models.norm import use_fused_batch_norm


def parse_args():
    parser = argparse.ArgumentParser(description="Synthetic training benchmark with Horovod",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="ResNet50", help="a model of keras.applications")
    parser.add_argument("--batch-size", type=int, default=32, help="images per process and step")
    parser.add_argument("--image-size", type=int, default=224, help="height and width of the images")
    parser.add_argument("--num-warmup-batches", type=int, default=10, help="steps before the timing starts")
    parser.add_argument("--num-batches-per-iter", type=int, default=10, help="steps per timed iteration")
    parser.add_argument("--num-iters", type=int, default=10, help="timed iterations")
    parser.add_argument("--fp16-allreduce", action="store_true", help="send the gradients as float16")
    parser.add_argument("--fused-batch-norm", action="store_true",
                        help="swap every BatchNormalization for TensorFlow's fused kernel")
    return parser.parse_args()


def main():
    args = parse_args()
    hvd.init()  # Horovod: also pins one GPU per process, by local rank

    model = getattr(keras.applications, args.model)(
        weights=None, input_shape=(args.image_size, args.image_size, 3), classifier_activation=None)
    if args.fused_batch_norm:
        model = use_fused_batch_norm(model)
    optimizer = keras.optimizers.SGD(0.01)
    images = tf.random.uniform([args.batch_size, args.image_size, args.image_size, 3])
    labels = tf.random.uniform([args.batch_size], maxval=model.output_shape[-1], dtype=tf.int64)
    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none

    @tf.function
    def benchmark_step():
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        # Horovod: average the gradients over the processes (as float16 on the wire if asked).
        tape = hvd.DistributedGradientTape(tape, compression=compression)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))

    def seconds_for(steps):
        start = time.perf_counter()
        for _ in range(steps):
            benchmark_step()
        return time.perf_counter() - start

    def log(line):
        if hvd.rank() == 0:
            print(line, flush=True)

    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    log(f"Model: {args.model}{' (fused batch norm)' if args.fused_batch_norm else ''}")
    log(f"Batch size: {args.batch_size}, images {args.image_size}x{args.image_size}")
    log(f"Number of {device}s: {hvd.size()}")
    log("Running warmup...")
    benchmark_step()
    # Horovod: after the first step (the optimizer's variables exist only then), every process
    # takes rank 0's weights and optimizer state.
    hvd.broadcast_variables(model.variables, root_rank=0)
    hvd.broadcast_variables(optimizer.variables, root_rank=0)
    seconds_for(args.num_warmup_batches)
    log("Running benchmark...")
    rates = []
    for iteration in range(args.num_iters):
        rates.append(args.batch_size * args.num_batches_per_iter / seconds_for(args.num_batches_per_iter))
        log(f"Iter #{iteration}: {rates[-1]:.1f} img/sec per {device}")
    mean, spread = np.mean(rates), 1.96 * np.std(rates)
    log(f"Img/sec per {device}: {mean:.1f} +-{spread:.1f}")
    log(f"Total img/sec on {hvd.size()} {device}(s): {hvd.size() * mean:.1f} +-{hvd.size() * spread:.1f}")


if __name__ == "__main__":
    main()
