"""FusedBatchNormalization against Keras's BatchNormalization, the swap helper, and the
checks of SyncBatchNormalization's group (its collectives are tested under horovodrun in
tests/e2e/test_sync_batch_norm.py)."""
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from common.dist import Group
from common.errors import ConfigError
from common.models.norm import FusedBatchNormalization, SyncBatchNormalization, use_fused_batch_norm
from tests.unit.one_process import ALONE, MIRRORED

RTOL = 1e-5


def _inputs(shape, seed=0):
    """Channels with unequal means and scales, so that a wrong statistic shows."""
    rng = np.random.RandomState(seed)
    return (rng.randn(*shape) * rng.uniform(0.5, 3, shape[-1]) + rng.uniform(-2, 2, shape[-1])).astype("float32")


def _training_steps(layer, batches):
    """Per batch: the training-mode outputs and the gradients of a nonlinear loss w.r.t. the
    inputs and the trainable weights (in a tf.function, as in a training step); then the
    moving statistics and the inference outputs of the last batch."""

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.tanh(tf.cast(y, tf.float32)) * tf.range(1.0, y.shape[-1] + 1.0))
        return y, tape.gradient(loss, [x, *layer.trainable_weights])

    per_step = [step(tf.constant(x)) for x in batches]
    return {"outputs": [y for y, _ in per_step], "gradients": [g for _, g in per_step],
            "moving": [layer.moving_mean, layer.moving_variance],
            "inference": layer(tf.constant(batches[-1]), training=False)}


def _assert_close(actual, expected, rtol=RTOL):
    """Each tensor equal within `rtol`, elements near zero within `rtol` of the tensor's
    largest: a gradient summed over the batch cancels to values whose float32 rounding
    differs between the two kernels' orders of summation (both are as close to a float64
    computation)."""
    for a, e in zip(tf.nest.flatten(actual), tf.nest.flatten(expected), strict=True):
        e = np.asarray(e)
        np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=rtol * np.abs(e).max())


def _compare_with_keras(shape, **kwargs):
    batches = [_inputs(shape, seed) for seed in range(3)]
    fused, reference = FusedBatchNormalization(**kwargs), keras.layers.BatchNormalization(**kwargs)
    got, expected = _training_steps(fused, batches), _training_steps(reference, batches)
    assert [w.name for w in fused.weights] == [w.name for w in reference.weights]
    for key in expected:
        _assert_close(got[key], expected[key])
    return fused


def _runs_fused_kernel(layer, shape, **call_kwargs) -> bool:
    graph = tf.function(lambda x: layer(x, training=True, **call_kwargs)).get_concrete_function(
        tf.TensorSpec(shape, tf.float32)).graph
    return any(op.type == "FusedBatchNormV3" for op in graph.get_operations())


@pytest.mark.parametrize("shape,kwargs", [
    ((4, 6, 5, 8), {}),
    ((4, 6, 5, 8), {"momentum": 0.5, "epsilon": 1.001e-5}),
    ((4, 6, 5, 8), {"center": False, "scale": False}),
    ((16, 8), {"momentum": 0.7}),
    ((3, 7, 8), {"momentum": 0.7, "scale": False}),
])
def test_fused_layer_trains_as_keras_batch_normalization(shape, kwargs):
    fused = _compare_with_keras(shape, **kwargs)
    assert _runs_fused_kernel(fused, shape)


def test_under_mixed_precision_the_fused_layer_computes_in_float32_as_keras_does():
    batches = [_inputs((4, 6, 5, 8), seed) for seed in range(3)]
    fused = FusedBatchNormalization(dtype="mixed_float16")
    got = _training_steps(fused, batches)
    expected = _training_steps(keras.layers.BatchNormalization(dtype="mixed_float16"), batches)
    assert got["outputs"][0].dtype == tf.float16 and fused.moving_mean.dtype == "float32"
    for key in expected:
        _assert_close(got[key], expected[key], rtol=1e-3)  # float16 outputs
    assert _runs_fused_kernel(fused, (4, 6, 5, 8))


@pytest.mark.parametrize("shape,kwargs", [
    ((4, 8, 6, 5), {"axis": 1}),  # channels first: the kernel runs NHWC only on CPU
    ((4, 6, 5, 8), {"epsilon": 1e-6}),  # below the kernel's smallest epsilon
    ((4, 6, 5, 8), {"renorm": True, "momentum": 0.5}),
])
def test_configurations_the_kernel_does_not_serve_run_keras_code(shape, kwargs):
    fused = _compare_with_keras(shape, **kwargs)
    assert not _runs_fused_kernel(fused, shape)


def test_a_masked_call_runs_keras_code():
    x, mask = _inputs((3, 7, 8)), np.arange(21).reshape(3, 7) % 3 > 0
    fused, reference = FusedBatchNormalization(), keras.layers.BatchNormalization()
    _assert_close(fused(x, training=True, mask=mask), reference(x, training=True, mask=mask))
    assert not _runs_fused_kernel(fused, (3, 7, 8), mask=tf.constant(mask))


def test_a_frozen_layer_normalises_with_its_moving_statistics():
    fused = FusedBatchNormalization()
    x = _inputs((4, 8))
    fused.build(x.shape)
    fused.trainable = False
    _assert_close(fused(x, training=True), fused(x, training=False))
    _assert_close(fused.moving_mean, np.zeros(8))


def _small_model(norm_in_nested_model: bool) -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.8)(x)
    block = keras.Sequential([keras.layers.Conv2D(6, 3), keras.layers.BatchNormalization(center=False)])
    x = block(x) if norm_in_nested_model else x
    x = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, keras.layers.BatchNormalization()(x))


def _trained(model):
    """Moving statistics away from their initial values, so that copying them matters."""
    model(_inputs((4, *model.input_shape[1:]), seed=5), training=True)
    return model


def _batch_norm_types(model) -> list[type]:
    """The types of the model's batch normalisation layers, nested models' included."""
    types = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            types += _batch_norm_types(layer)
        elif isinstance(layer, keras.layers.BatchNormalization):
            types.append(type(layer))
    return types


def _assert_swapped(model, fused):
    assert _batch_norm_types(fused) == [FusedBatchNormalization] * len(_batch_norm_types(model))
    assert [w.path for w in fused.weights] == [w.path for w in model.weights]
    _assert_close(fused.get_weights(), model.get_weights())
    x = _inputs((2, *model.input_shape[1:]), seed=9)
    _assert_close(fused(x, training=False), model(x, training=False))


def test_swap_keeps_weights_and_inference_outputs_of_a_functional_model_with_a_nested_one():
    model = _trained(_small_model(norm_in_nested_model=True))
    fused = use_fused_batch_norm(model)
    _assert_swapped(model, fused)
    assert len(_batch_norm_types(model)) == 3


def test_weights_saved_by_either_model_load_into_the_other(tmp_path):
    model, fused = _small_model(False), use_fused_batch_norm(_trained(_small_model(False)))
    fused.save_weights(tmp_path / "fused.weights.h5")
    model.load_weights(tmp_path / "fused.weights.h5")
    _assert_close(model.get_weights(), fused.get_weights())
    _trained(model).save_weights(tmp_path / "keras.weights.h5")
    fused.load_weights(tmp_path / "keras.weights.h5")
    _assert_close(fused.get_weights(), model.get_weights())


def test_a_swapped_model_is_saved_and_loaded_as_a_keras_file(tmp_path):
    fused = use_fused_batch_norm(_trained(_small_model(False)))
    fused.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert _batch_norm_types(loaded) == _batch_norm_types(fused)
    _assert_close(loaded.get_weights(), fused.get_weights())


def test_swap_into_mobilenet_v2_keeps_inference_and_training_outputs():
    model = _trained(keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35))
    fused = use_fused_batch_norm(model)
    _assert_swapped(model, fused)
    x = _inputs((4, 32, 32, 3), seed=3)
    # 52 layers normalising with batch statistics compound the float32 rounding.
    _assert_close(fused(x, training=True), model(x, training=True), rtol=1e-3)


def test_sync_layer_in_a_group_of_one_process_is_batch_normalization():
    sync = SyncBatchNormalization(ALONE, momentum=0.6)
    batches = [_inputs((4, 5, 5, 8), seed) for seed in range(3)]
    expected = _training_steps(keras.layers.BatchNormalization(momentum=0.6), batches)
    got = _training_steps(sync, batches)
    for key in expected:
        _assert_close(got[key], expected[key])


@pytest.mark.parametrize("group,fix", [
    (MIRRORED.data, "under --backend=mirrored use keras.layers.BatchNormalization(synchronized=True)"),
    (None, "takes a common.dist.Group (e.g. dist.data, from common.dist.init), not NoneType"),
    (2, "takes a common.dist.Group"),
])
def test_sync_layer_rejects_a_group_it_cannot_synchronise(group, fix):
    with pytest.raises(ConfigError, match=re.escape(fix)) as raised:
        SyncBatchNormalization(group)
    assert "\n" not in str(raised.value)


def test_sync_layer_rejects_renorm_and_synchronized():
    for flag in ("renorm", "synchronized"):
        with pytest.raises(ConfigError, match="drop those arguments"):
            SyncBatchNormalization(ALONE, **{flag: True})


def _model_with_sync_layer(group) -> keras.Model:
    inputs = keras.Input((4,))
    return keras.Model(inputs, SyncBatchNormalization(group, momentum=0.5)(keras.layers.Dense(3)(inputs)))


def test_a_saved_sync_layer_loads_as_the_fused_layer(tmp_path):
    model = _trained(_model_with_sync_layer(ALONE))
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert [type(layer) for layer in loaded.layers[1:]] == [keras.layers.Dense, FusedBatchNormalization]
    _assert_close(loaded.get_weights(), model.get_weights())


def test_swap_keeps_sync_layers_and_their_group():
    group = Group((0,), 0, grouped=False)
    fused = use_fused_batch_norm(_trained(_model_with_sync_layer(group)))
    sync = fused.layers[-1]
    assert type(sync) is SyncBatchNormalization and sync.group is group and sync.momentum == 0.5
