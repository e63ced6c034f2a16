"""Gradient compressors on one process: what they send, what they keep, what they cost."""
import numpy as np
import pytest
import tensorflow as tf

from common.compression import float32_bytes, make_compressor
from common.config import TrainConfig, parse
from common.dist import Dist
from common.errors import ConfigError

ONE_PROCESS = Dist("horovod", 0, 1, 0, 1)


def built(spec, shapes):
    compressor = make_compressor(spec)
    compressor.build([tf.Variable(tf.zeros(shape)) for shape in shapes], ONE_PROCESS)
    return compressor


def test_top_k_sends_the_largest_entries_and_keeps_the_rest():
    grads = [tf.random.stateless_normal(shape, seed=(1, i)) for i, shape in enumerate([(20, 10), (50,)])]
    compressor = built("topk:0.1", [g.shape for g in grads])
    sent = compressor.reduce(grads, ONE_PROCESS)
    for g, s, residual in zip(grads, sent, compressor.residuals):
        g, s, residual = g.numpy().ravel(), s.numpy().ravel(), residual.numpy().ravel()
        k = int(np.ceil(0.1 * g.size))
        largest = np.argsort(-np.abs(g))[:k]
        assert sorted(np.flatnonzero(s)) == sorted(largest)
        np.testing.assert_array_equal(s + residual, g)


def test_error_feedback_sends_everything_eventually():
    gradient = tf.random.stateless_normal((10, 10), seed=(2, 0))
    compressor = built("topk:0.05", [gradient.shape])
    step = tf.function(lambda g: compressor.reduce([g], ONE_PROCESS)[0])
    total = step(gradient)
    for _ in range(19):  # 5 of 100 entries per step: the residual drains in 20 steps
        total += step(tf.zeros_like(gradient))
    np.testing.assert_allclose(total, gradient, rtol=1e-6)
    assert not np.any(compressor.residuals[0].numpy())


def test_powersgd_reconstructs_an_exactly_low_rank_matrix():
    left, right = tf.random.stateless_normal((30, 3), seed=(3, 0)), tf.random.stateless_normal((3, 4, 5), seed=(3, 1))
    matrix = tf.reshape(left @ tf.reshape(right, (3, 20)), (30, 4, 5))
    vector = tf.random.stateless_normal((7,), seed=(3, 2))
    compressor = built("powersgd:3", [matrix.shape, vector.shape])
    sent_matrix, sent_vector = tf.function(lambda m, v: compressor.reduce([m, v], ONE_PROCESS))(matrix, vector)
    np.testing.assert_allclose(sent_matrix, matrix, atol=1e-4)
    np.testing.assert_array_equal(sent_vector, vector)  # vectors travel uncompressed
    assert np.abs(compressor.residuals[0].numpy()).max() < 1e-4


@pytest.mark.parametrize("spec", ["fp16", "bf16"])
def test_casts_round_to_the_wire_type(spec):
    grads = [tf.constant([1.0, 1.0 + 2 ** -9, -3e-3])]
    sent = make_compressor(spec).reduce(grads, ONE_PROCESS)[0]
    wire = {"fp16": tf.float16, "bf16": tf.bfloat16}[spec]
    np.testing.assert_array_equal(sent, tf.cast(tf.cast(grads[0], wire), tf.float32))


@pytest.mark.parametrize("spec, ratio", [("none", 1), ("fp16", 2), ("bf16", 2), ("topk:0.01", 50),
                                         ("powersgd:4", 1000 * 1000 / (2000 * 4))])
def test_wire_bytes_of_a_large_matrix(spec, ratio):
    shapes = [(1000, 1000)]
    assert float32_bytes(shapes) / make_compressor(spec).wire_bytes(shapes) == pytest.approx(ratio)


def test_powersgd_sends_small_tensors_whole():
    compressor = make_compressor("powersgd:4")
    assert compressor.wire_bytes([(64,), (4, 100), (8, 8)]) == float32_bytes([(64,), (4, 100), (8, 8)])
    assert compressor.wire_bytes([(16, 2, 8)]) == 4 * (16 + 16) * 4  # viewed as 16 x 16


def test_translate_default_model_gradients_shrink_twentyfold():
    """translate.py's default model (vocabulary padded to 4032, as the embedded data gives)."""
    from common.dist import Group
    from common.models.transformer import build_transformer
    from recipes.translate import TranslateConfig
    model = build_transformer(TranslateConfig().transformer_size(4000, 16), Group((0,), 0))
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    for spec in ("topk:0.01", "powersgd:4"):
        assert float32_bytes(shapes) / make_compressor(spec).wire_bytes(shapes) >= 20, spec


@pytest.mark.parametrize("spec", ["bf16", "topk:0.1", "powersgd:2"])
def test_mirrored_backend_is_refused(spec):
    mirrored = Dist("mirrored", 0, 1, 0, 2)
    with pytest.raises(ConfigError, match="needs --backend=horovod"):
        make_compressor(spec).build([tf.Variable(tf.zeros((4, 4)))], mirrored)


def test_unbuilt_state_is_a_clear_error():
    with pytest.raises(ConfigError, match="keeps state"):
        make_compressor("topk:0.1").reduce([tf.zeros((4, 4))], ONE_PROCESS)


@pytest.mark.parametrize("spec", ["none", "fp16", "bf16", "topk:0.01", "topk:.5", "powersgd:1", "powersgd:16"])
def test_good_flag_values(spec):
    assert parse(TrainConfig, [f"--compression={spec}"]).compression == spec


@pytest.mark.parametrize("spec", ["fp32", "topk", "topk:0", "topk:1", "topk:abc", "topk:nan", "powersgd",
                                  "powersgd:0", "powersgd:2.5", "fp16:2", ""])
def test_bad_flag_values_name_the_choices(spec):
    with pytest.raises(ConfigError) as error:
        parse(TrainConfig, [f"--compression={spec}"])
    message = str(error.value)
    assert message.startswith("--compression must be none, fp16, bf16, topk:F") and "\n" not in message
