"""Gradient codecs on one process: what they send, what they keep, what they cost."""
import numpy as np
import pytest
import tensorflow as tf

from common.compression import float32_bytes, make_codec
from common.config import TrainConfig, parse
from common.errors import ConfigError
from tests.unit.one_process import ALONE, MIRRORED, ONE_PROCESS


def built(spec, shapes):
    compressor = make_codec(spec)
    compressor.build([tf.Variable(tf.zeros(shape)) for shape in shapes], ONE_PROCESS)
    return compressor


def test_top_k_sends_the_largest_entries_of_all_matrices_together_and_keeps_the_rest():
    # The second matrix is scaled down: one selection over both sends mostly the first's entries.
    grads = [tf.random.stateless_normal((20, 10), seed=(1, 0)), 0.1 * tf.random.stateless_normal((5, 2, 5), seed=(1, 1))]
    compressor = built("topk:0.1", [g.shape for g in grads])
    sent = compressor.sum(grads, ALONE)
    flat = np.concatenate([g.numpy().ravel() for g in grads])
    largest = np.argsort(-np.abs(flat))[:20 + 5]  # 10% of each matrix's entries, in all
    assert sorted(np.flatnonzero(np.concatenate([s.numpy().ravel() for s in sent]))) == sorted(largest)
    assert np.count_nonzero(sent[1].numpy()) < 5
    for g, s, residual in zip(grads, sent, compressor.residuals):
        np.testing.assert_array_equal(s.numpy() + residual.numpy(), g.numpy())


def test_top_k_picks_the_matrices_every_tensor_rank_holds_apart_from_its_split_ones():
    # A split shard with large gradients beside a replicated matrix: the replicated one still sends
    # its own 10%, the same on every tensor rank, whatever this rank's shard holds.
    from common.plans.tensor import mark_split
    shard, replicated = 100 * tf.random.stateless_normal((10, 10), seed=(7, 0)), tf.random.stateless_normal((10, 10), seed=(7, 1))
    compressor = make_codec("topk:0.1")
    compressor.build([mark_split(tf.Variable(tf.zeros((10, 10))), 1), tf.Variable(tf.zeros((10, 10)))], ONE_PROCESS)
    sent_shard, sent_replicated = compressor.sum([shard, replicated], ALONE)
    assert np.count_nonzero(sent_shard) == np.count_nonzero(sent_replicated) == 10
    largest = np.argsort(-np.abs(replicated.numpy().ravel()))[:10]
    assert sorted(np.flatnonzero(sent_replicated.numpy())) == sorted(largest)


def test_top_k_sends_vectors_whole():
    matrix, vector = tf.random.stateless_normal((10, 10), seed=(1, 2)), tf.random.stateless_normal((50,), seed=(1, 3))
    compressor = built("topk:0.1", [matrix.shape, vector.shape])
    sent_vector = compressor.sum([matrix, vector], ALONE)[1]
    np.testing.assert_array_equal(sent_vector, vector)
    assert not np.any(compressor.residuals[1].numpy())
    assert compressor.wire_bytes([matrix.shape, vector.shape]) == 6 * 10 + 4 * 50


def test_error_feedback_sends_everything_eventually():
    gradient = tf.random.stateless_normal((10, 10), seed=(2, 0))
    compressor = built("topk:0.05", [gradient.shape])
    step = tf.function(lambda g: compressor.sum([g], ALONE)[0])
    total = step(gradient)
    for _ in range(19):  # 5 of 100 entries per step: 20 steps send as many entries as there are
        total += step(tf.zeros_like(gradient))
    residual = compressor.residuals[0].numpy()
    np.testing.assert_allclose(total + residual, gradient, rtol=1e-6)  # nothing lost
    # What waits is below bfloat16's rounding of the largest entry.
    assert np.abs(residual).max() <= 2 ** -8 * np.abs(gradient.numpy()).max()


def test_top_k_sends_bfloat16_values_and_keeps_what_rounding_drops():
    gradient = tf.constant([[1.0 + 2 ** -10, 0.5], [0.25, 0.125]])
    compressor = built("topk:0.25", [gradient.shape])
    sent = compressor.sum([gradient], ALONE)[0].numpy()
    np.testing.assert_array_equal(sent, [[1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(compressor.residuals[0].numpy(), [[2 ** -10, 0.5], [0.25, 0.125]])


def test_powersgd_reconstructs_an_exactly_low_rank_matrix():
    left, right = tf.random.stateless_normal((30, 3), seed=(3, 0)), tf.random.stateless_normal((3, 4, 5), seed=(3, 1))
    matrix = tf.reshape(left @ tf.reshape(right, (3, 20)), (30, 4, 5))
    vector = tf.random.stateless_normal((7,), seed=(3, 2))
    compressor = built("powersgd:3", [matrix.shape, vector.shape])
    sent_matrix, sent_vector = tf.function(lambda m, v: compressor.sum([m, v], ALONE))(matrix, vector)
    np.testing.assert_allclose(sent_matrix, matrix, atol=1e-4)
    np.testing.assert_array_equal(sent_vector, vector)  # vectors travel uncompressed
    assert np.abs(compressor.residuals[0].numpy()).max() < 1e-4


@pytest.mark.parametrize("spec", ["fp16", "bf16"])
def test_casts_round_to_the_wire_type(spec):
    grads = [tf.constant([1.0, 1.0 + 2 ** -9, -3e-3])]
    sent = make_codec(spec).sum(grads, ALONE)[0]
    wire = {"fp16": tf.float16, "bf16": tf.bfloat16}[spec]
    np.testing.assert_array_equal(sent, tf.cast(tf.cast(grads[0], wire), tf.float32))


@pytest.mark.parametrize("spec, ratio", [("none", 1), ("fp16", 2), ("bf16", 2), ("topk:0.01", 4 / 0.06),
                                         ("powersgd:4", 1000 * 1000 / (2000 * 4))])
def test_wire_bytes_of_a_large_matrix(spec, ratio):
    shapes = [(1000, 1000)]
    assert float32_bytes(shapes) / make_codec(spec).wire_bytes(shapes) == pytest.approx(ratio)


def test_powersgd_sends_small_tensors_whole():
    compressor = make_codec("powersgd:4")
    assert compressor.wire_bytes([(64,), (4, 100), (8, 8)]) == float32_bytes([(64,), (4, 100), (8, 8)])
    assert compressor.wire_bytes([(16, 2, 8)]) == 4 * (16 + 16) * 4  # viewed as 16 x 16


def test_translate_default_model_gradients_shrink_twentyfold():
    """translate.py's default model (vocabulary padded to 4032, as the embedded data gives)."""
    from common.models.transformer import TransformerSize, build_transformer
    from recipes.translate import TranslateConfig
    model = build_transformer(TransformerSize.of(TranslateConfig(), 4000, 16), ALONE)
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    for spec in ("topk:0.01", "powersgd:4"):
        assert float32_bytes(shapes) / make_codec(spec).wire_bytes(shapes) >= 20, spec


@pytest.mark.parametrize("spec", ["bf16", "topk:0.1", "powersgd:2"])
def test_mirrored_backend_is_refused(spec):
    with pytest.raises(ConfigError, match="needs --backend=horovod"):
        make_codec(spec).build([tf.Variable(tf.zeros((4, 4)))], MIRRORED)


@pytest.mark.parametrize("spec", ["none", "fp16", "bf16", "topk:0.01", "topk:.5", "powersgd:1", "powersgd:16",
                                  "topk_updates:0.01"])
def test_good_flag_values(spec):
    assert parse(TrainConfig, [f"--compression={spec}"]).compression == spec


@pytest.mark.parametrize("spec", ["fp32", "topk", "topk:0", "topk:1", "topk:abc", "topk:nan", "powersgd",
                                  "powersgd:0", "powersgd:2.5", "fp16:2", "topk:0.01,warmup=400", ""])
def test_bad_flag_values_name_the_choices(spec):
    with pytest.raises(ConfigError) as error:
        parse(TrainConfig, [f"--compression={spec}"])
    message = str(error.value)
    assert message.startswith("--compression must be none, fp16, bf16, topk:F") and "\n" not in message
    assert message.endswith(f"got {spec!r}")
