"""A small residual convolutional network for image classification (ResNet-20 is one shape of it).

Normalisation is GroupNorm by default: its statistics are per example, so the update does
not depend on how the global batch is split over replicas, and N-process training equals
one-process training with no synchronised batch statistics. Batch normalisation is offered
too: "batch" (TensorFlow's fused kernel, each replica's own statistics) and "sync_batch" (the
statistics of the global batch, so N processes again train like one).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import keras
import tensorflow as tf

BATCH_NORM_MOMENTUM = 0.9  # moving statistics over about the last ten steps


@dataclasses.dataclass(frozen=True)
class ConvNetSize:
    image_shape: tuple[int, int, int]
    num_classes: int
    widths: tuple[int, ...]  # channels of each stage; every stage after the first halves the resolution
    blocks: int  # residual blocks per stage
    groups: int  # GroupNorm groups; must divide every width
    norm: str = "group"  # group, batch or sync_batch (norm_factory)


def _conv(width: int, kernel: int, stride: int, name: str) -> keras.layers.Conv2D:
    return keras.layers.Conv2D(width, kernel, strides=stride, padding="same", use_bias=False,
                               kernel_initializer="he_normal", name=name)


def norm_factory(size: ConvNetSize, sync_group=None) -> Callable[[str], keras.layers.Layer]:
    """The layer of `size.norm`, by name: GroupNorm, TensorFlow's fused batch norm, or batch
    norm synchronised over `sync_group` (a `common.dist.Group`, the data-parallel replicas).
    Batch-norm weights have the same names either way, so a sync_batch run's weights load
    into a "batch" model on one process (inference uses the moving statistics alone)."""
    from common.models.norm import FusedBatchNormalization, SyncBatchNormalization
    if size.norm == "group":
        return lambda name: keras.layers.GroupNormalization(size.groups, name=name)
    if size.norm == "batch":
        return lambda name: FusedBatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=name)
    return lambda name: SyncBatchNormalization(sync_group, momentum=BATCH_NORM_MOMENTUM, name=name)


def _residual_block(x, width: int, stride: int, norm, name: str):
    """conv-norm-relu-conv-norm plus a shortcut (a strided 1x1 conv where the shape changes)."""
    shortcut = x
    if stride != 1 or x.shape[-1] != width:
        shortcut = _conv(width, 1, stride, f"{name}_shortcut")(x)
        shortcut = norm(f"{name}_shortcut_norm")(shortcut)
    y = _conv(width, 3, stride, f"{name}_conv1")(x)
    y = keras.layers.ReLU()(norm(f"{name}_norm1")(y))
    y = _conv(width, 3, 1, f"{name}_conv2")(y)
    y = norm(f"{name}_norm2")(y)
    return keras.layers.ReLU()(keras.layers.Add()([shortcut, y]))


def build_convnet(size: ConvNetSize, sync_group=None) -> keras.Model:
    """uint8 images in, class logits out (the scaling to [0, 1] is part of the model).
    `sync_group`: the group whose batch a "sync_batch" norm normalises over."""
    norm = norm_factory(size, sync_group)
    images = keras.Input(size.image_shape, dtype="uint8", name="images")
    x = keras.layers.Rescaling(1.0 / 255.0, dtype="float32")(images)
    x = _conv(size.widths[0], 3, 1, "stem_conv")(x)
    x = keras.layers.ReLU()(norm("stem_norm")(x))
    for stage, width in enumerate(size.widths):
        for block in range(size.blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _residual_block(x, width, stride, norm, name=f"stage{stage}_block{block}")
    x = keras.layers.GlobalAveragePooling2D()(x)
    logits = keras.layers.Dense(size.num_classes, name="classifier")(x)
    return keras.Model(images, logits, name="convnet")


def loss_sums(model: keras.Model, batch, training: bool):
    """(summed cross-entropy, number of images, {"accuracy": correct predictions})."""
    images, labels = batch
    logits = model(images, training=training)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels), tf.float32)
    count = tf.cast(tf.shape(labels)[0], tf.float32)
    return tf.reduce_sum(losses), count, {"accuracy": tf.reduce_sum(correct)}
