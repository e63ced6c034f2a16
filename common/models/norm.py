"""Batch normalisation for Keras 3 on TensorFlow: fast (TensorFlow's fused kernel) and
synchronised (the global batch's statistics over a Horovod group).

Keras 3's `BatchNormalization` computes its training-mode statistics with generic ops, several
times slower forward and backward than TensorFlow's fused kernel on CPU.
`FusedBatchNormalization` is the same layer (arguments, weights, moving averages, inference)
with the fused kernel in training mode; `use_fused_batch_norm` swaps it into an existing model.
`SyncBatchNormalization` normalises each shard with the mean and variance of the batch of all
members of a group, one all-reduce per layer and step.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from common import dist as dist_lib
from common.errors import ConfigError

# The smallest epsilon TensorFlow's fused kernel accepts on every device (cuDNN's bound,
# rounded up as `tf.compat.v1.nn.fused_batch_norm` does).
FUSED_MIN_EPSILON = 1.001e-5


def _named_as_keras(cls: type) -> type:
    """Give a layer class Keras's class name. Keras's weights files (`.weights.h5`, `.keras`)
    key each layer by its class name, and unnamed layers are named after it: so named, a model
    with these layers and the same one with Keras's read each other's weights files, and
    number their layers alike (`batch_normalization_3`)."""
    cls.__name__ = cls.__qualname__ = keras.layers.BatchNormalization.__name__
    return cls


@keras.saving.register_keras_serializable(package="common", name="FusedBatchNormalization")
@_named_as_keras
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` (the same constructor, weights in the same order and
    names, config, moving-average update and inference) whose training-mode forward and
    backward run in TensorFlow's fused kernel (`FusedBatchNormV3`).

    The kernel serves a float32 computation over the last axis of an input of any rank of at
    least 2 (4-D inputs as NHWC, others folded to that shape), with `epsilon` of at least
    `FUSED_MIN_EPSILON`, no mask, no `renorm` and no `synchronized`. Every other case
    (channels-first `axis=1`, float64, a mask, renorm, ...) and inference mode run Keras's own
    code, so the layer is never wrong, only sometimes not faster.

    The kernel's batch variance is the unbiased one (divided by n - 1); Keras's moving
    variance averages the biased one (divided by n), so the update rescales it by (n - 1) / n.
    """

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, tf.float32)
        outputs, mean, variance = _fused_training(x, self._scale_or_ones(x), self._offset_or_zeros(x),
                                                  self.epsilon)
        self._update_moving_statistics(mean, variance)
        return tf.cast(outputs, self.compute_dtype)

    def _fusable(self, inputs, mask) -> bool:
        rank = len(inputs.shape)
        return (mask is None and not self.renorm and not self.synchronized and rank >= 2
                and self.axis % rank == rank - 1 and self.epsilon >= FUSED_MIN_EPSILON
                and keras.backend.result_type(inputs.dtype, "float32") == "float32")

    def _scale_or_ones(self, x):
        return tf.cast(self.gamma, x.dtype) if self.scale else tf.ones([x.shape[-1]], x.dtype)

    def _offset_or_zeros(self, x):
        return tf.cast(self.beta, x.dtype) if self.center else tf.zeros([x.shape[-1]], x.dtype)

    def _update_moving_statistics(self, mean, variance) -> None:
        """Keras's update: moving = moving * momentum + batch * (1 - momentum)."""
        for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
            moving.assign(tf.cast(moving, batch.dtype) * self.momentum + batch * (1.0 - self.momentum))


def _fused_training(x, scale, offset, epsilon: float):
    """Training-mode batch normalisation of `x` over all axes but the last, in the fused kernel:
    the outputs, and the batch mean and biased variance (no gradient flows through these two:
    they only feed the moving averages)."""
    channels = x.shape[-1]
    as_nhwc = x if len(x.shape) == 4 else tf.reshape(x, [-1, 1, 1, channels])
    empty = tf.constant([], tf.float32)
    outputs, mean, unbiased, *_ = tf.raw_ops.FusedBatchNormV3(
        x=as_nhwc, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=epsilon,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    count = tf.cast(tf.size(x, out_type=tf.int64) // channels, tf.float32)
    biased = unbiased * ((count - 1.0) / count)
    return tf.reshape(outputs, tf.shape(x)), mean, biased


def use_fused_batch_norm(model: keras.Model) -> keras.Model:
    """A copy of a Sequential or functional `model` (nested ones too, `keras.applications`
    models among them) whose every `keras.layers.BatchNormalization` is a
    `FusedBatchNormalization` of the same config, every weight copied: the same outputs in
    inference mode, the same training semantics. Call it before `compile`, on the model that
    the optimizer will train. Subclassed models cannot be cloned: build them with
    `FusedBatchNormalization` directly."""

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, SyncBatchNormalization):
            return SyncBatchNormalization(layer.group, **layer.get_config())
        cls = FusedBatchNormalization if type(layer) is keras.layers.BatchNormalization else type(layer)
        return cls.from_config(layer.get_config())

    fused = keras.models.clone_model(model, clone_function=clone, recursive=True)
    fused.set_weights(model.get_weights())
    return fused


@keras.saving.register_keras_serializable(package="common", name="SyncBatchNormalization")
@_named_as_keras
class SyncBatchNormalization(FusedBatchNormalization):
    """Batch normalisation with the statistics of the global batch: in training mode each
    member of `group` (a `common.dist.Group`: `dist.data` for the data-parallel replicas)
    sums its shard's values, their squares and its row count per channel; one all-reduce over
    the group adds them up; every member normalises its own rows with the global mean and
    (biased) variance and updates the moving averages with them, so those stay equal on
    every member. Horovod's all-reduce is differentiable (its gradient is the all-reduce of
    the gradients), so each member's gradients are those of the global-batch normalisation:
    summed over the members, the gradients of gamma and beta are one process's on the whole
    batch. In a group of one process, and in inference mode, it is `FusedBatchNormalization`.

    The variance is E[x^2] - E[x]^2 (one collective rather than two), as Keras's own
    `synchronized=True` computes it. Other arguments are `keras.layers.BatchNormalization`'s;
    `renorm`, `synchronized` (MirroredStrategy's replicas: Keras's own) and masks are not
    served. The group is a live object of the job: restored from a config alone (a `.keras`
    file's `load_model`, `clone_model`) the layer is a `FusedBatchNormalization` with the same
    weights, fit for inference or one process (`use_fused_batch_norm` keeps it synchronised)."""

    def __init__(self, group: dist_lib.Group, **kwargs):
        _check_group(group)
        if kwargs.get("renorm") or kwargs.get("synchronized"):
            raise ConfigError("SyncBatchNormalization does not take renorm or synchronized: "
                              "drop those arguments (synchronized=True is Keras's layer for "
                              "MirroredStrategy)")
        super().__init__(**kwargs)
        self.group = group

    @classmethod
    def from_config(cls, config):
        return FusedBatchNormalization.from_config(config)

    def call(self, inputs, training=None, mask=None):
        synchronised = self.group.size > 1 or self.group.elastic
        if not (training and self.trainable and synchronised):
            return super().call(inputs, training=training, mask=mask)
        if mask is not None:
            raise ValueError("SyncBatchNormalization does not take a mask: normalise masked "
                             "inputs with keras.layers.BatchNormalization")
        x = tf.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        mean, variance = self._global_moments(x)
        self._update_moving_statistics(mean, variance)
        outputs = keras.ops.batch_normalization(
            x, mean, variance, axis=self.axis, offset=self.beta if self.center else None,
            scale=self.gamma if self.scale else None, epsilon=self.epsilon)
        return tf.cast(outputs, self.compute_dtype)

    def _global_moments(self, x):
        """The mean and biased variance of the group's batch per channel, from one all-reduce
        of [sum, sum of squares, count]."""
        rank = len(x.shape)
        axes = [axis for axis in range(rank) if axis != self.axis % rank]
        channels = x.shape[self.axis]
        count = tf.cast(tf.size(x, out_type=tf.int64) // channels, x.dtype)
        local = tf.concat([tf.reduce_sum(x, axes), tf.reduce_sum(tf.square(x), axes), count[None]], 0)
        total = self.group.sum([local])[0]
        sums, squares, global_count = total[:channels], total[channels:2 * channels], total[-1]
        mean = sums / global_count
        return mean, tf.maximum(squares / global_count - tf.square(mean), 0.0)


def _check_group(group) -> None:
    if isinstance(group, dist_lib.ReplicaGroup):
        raise ConfigError("SyncBatchNormalization synchronises Horovod processes; under "
                          "--backend=mirrored use keras.layers.BatchNormalization(synchronized=True)")
    if not isinstance(group, dist_lib.Group):
        raise ConfigError(f"SyncBatchNormalization(group) takes a common.dist.Group (e.g. "
                          f"dist.data, from common.dist.init), not {type(group).__name__}")
