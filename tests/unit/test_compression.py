"""Gradient compressors on one process: what they send, what they keep, what they cost."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from common.compression import float32_bytes, make_compressor
from common.config import TrainConfig, parse
from common.dist import Dist
from common.errors import ConfigError
from common.plans.data import step_on_compressed_updates

ONE_PROCESS = Dist("horovod", 0, 1, 0, 1)


def built(spec, shapes):
    compressor = make_compressor(spec)
    compressor.build([tf.Variable(tf.zeros(shape)) for shape in shapes], ONE_PROCESS)
    return compressor


def test_top_k_sends_the_largest_entries_of_all_matrices_together_and_keeps_the_rest():
    # The second matrix is scaled down: one selection over both sends mostly the first's entries.
    grads = [tf.random.stateless_normal((20, 10), seed=(1, 0)), 0.1 * tf.random.stateless_normal((5, 2, 5), seed=(1, 1))]
    compressor = built("topk:0.1", [g.shape for g in grads])
    sent = compressor.reduce(grads, ONE_PROCESS)
    flat = np.concatenate([g.numpy().ravel() for g in grads])
    largest = np.argsort(-np.abs(flat))[:20 + 5]  # 10% of each matrix's entries, in all
    assert sorted(np.flatnonzero(np.concatenate([s.numpy().ravel() for s in sent]))) == sorted(largest)
    assert np.count_nonzero(sent[1].numpy()) < 5
    for g, s, residual in zip(grads, sent, compressor.residuals):
        np.testing.assert_array_equal(s.numpy() + residual.numpy(), g.numpy())


def test_top_k_sends_vectors_whole():
    matrix, vector = tf.random.stateless_normal((10, 10), seed=(1, 2)), tf.random.stateless_normal((50,), seed=(1, 3))
    compressor = built("topk:0.1", [matrix.shape, vector.shape])
    sent_vector = compressor.reduce([matrix, vector], ONE_PROCESS)[1]
    np.testing.assert_array_equal(sent_vector, vector)
    assert not np.any(compressor.residuals[1].numpy())
    assert compressor.wire_bytes([matrix.shape, vector.shape]) == 6 * 10 + 4 * 50


def test_error_feedback_sends_everything_eventually():
    gradient = tf.random.stateless_normal((10, 10), seed=(2, 0))
    compressor = built("topk:0.05", [gradient.shape])
    step = tf.function(lambda g: compressor.reduce([g], ONE_PROCESS)[0])
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
    sent = compressor.reduce([gradient], ONE_PROCESS)[0].numpy()
    np.testing.assert_array_equal(sent, [[1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(compressor.residuals[0].numpy(), [[2 ** -10, 0.5], [0.25, 0.125]])


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


def adam_steps(gradient, steps, compressor=None, flush=False):
    """The weights after `steps` Adam steps on a constant gradient, from zero: plain, or with
    the error-feedback compressor on the weight updates (one process), then its residuals
    added to the weights if `flush`."""
    weights = tf.Variable(tf.zeros_like(gradient))
    optimizer = keras.optimizers.Adam(0.01)
    if compressor is None:
        step = tf.function(lambda: optimizer.apply([gradient], [weights]))
    else:
        compressor.build([weights], ONE_PROCESS)
        step = tf.function(lambda: step_on_compressed_updates(
            [gradient], [weights], optimizer, compressor, ONE_PROCESS, lambda grads: grads))
    for _ in range(steps):
        step()
    if flush:
        compressor.flush(ONE_PROCESS)
    return weights.numpy()


def test_top_k_takes_gradients_at_the_weights_plus_its_unsent_updates_and_puts_them_back_exactly():
    start = tf.random.stateless_normal((4, 5), seed=(6, 0))
    weights = tf.Variable(start)
    compressor = make_compressor("topk:0.1")
    compressor.build([weights], ONE_PROCESS)
    compressor.residuals[0].assign(tf.random.stateless_normal((4, 5), seed=(6, 1)))

    @tf.function
    def weights_seen():
        with compressor.gradient_point():
            return tf.identity(weights)
    np.testing.assert_allclose(weights_seen(), start + compressor.residuals[0], rtol=1e-6)
    np.testing.assert_array_equal(weights.numpy(), start.numpy())  # restored, not subtracted


def test_powersgd_takes_gradients_at_the_weights():
    weights = tf.Variable(tf.ones((4, 5)))
    compressor = make_compressor("powersgd:1")
    compressor.build([weights], ONE_PROCESS)
    compressor.residuals[0].assign(tf.ones((4, 5)))
    with compressor.gradient_point():
        np.testing.assert_array_equal(weights.numpy(), 1.0)


@pytest.mark.parametrize("spec, added", [("topk:0.1", 0.5), ("powersgd:1", 0.0)])
def test_a_mid_run_evaluation_scores_the_weights_with_the_unsent_updates_and_changes_nothing(spec, added):
    # What flush would leave, without flushing: training goes on exactly as without the evaluation.
    # PowerSGD's residuals are gradients, not weights: nothing to add.
    start = tf.random.stateless_normal((4, 5), seed=(6, 2))
    weights = tf.Variable(start)
    compressor = make_compressor(spec)
    compressor.build([weights], ONE_PROCESS)
    compressor.residuals[0].assign(tf.fill((4, 5), 0.5))
    with compressor.evaluation_point(ONE_PROCESS):
        np.testing.assert_allclose(weights.numpy(), start + added, rtol=1e-6)
    np.testing.assert_array_equal(weights.numpy(), start.numpy())
    np.testing.assert_array_equal(compressor.residuals[0].numpy(), 0.5)


@pytest.mark.parametrize("spec, weights_after, residual_after", [("topk:0.1", 1.5, 0.0), ("powersgd:1", 1.0, 0.5)])
def test_flush_puts_unsent_updates_into_the_weights(spec, weights_after, residual_after):
    # PowerSGD's residuals are gradients, which only the optimizer can turn into weights.
    weights = tf.Variable(tf.ones((4, 5)))
    compressor = make_compressor(spec)
    compressor.build([weights], ONE_PROCESS)
    compressor.residuals[0].assign(tf.fill((4, 5), 0.5))
    compressor.flush(ONE_PROCESS)
    np.testing.assert_array_equal(weights.numpy(), weights_after)
    np.testing.assert_array_equal(compressor.residuals[0].numpy(), residual_after)


def test_compressing_updates_that_lose_nothing_is_the_optimizers_own_step():
    gradient = tf.random.stateless_normal((2, 2), seed=(4, 0))
    # Keeps all 4 entries; what bfloat16 rounds off waits in the residuals until the flush.
    np.testing.assert_allclose(adam_steps(gradient, 5, make_compressor("topk:0.9"), flush=True),
                               adam_steps(gradient, 5), rtol=1e-6)


def test_sparse_updates_move_the_weights_as_far_as_dense_adam():
    """100 entries, 1 sent per step: each moves in spikes about once per 100 steps, yet
    (compressing Adam's updates, not its gradients) about as far as dense Adam. Top-k of the
    gradients would feed Adam those spikes, which it scales down about tenfold (sqrt of 100)."""
    gradient = tf.ones((10, 10))
    dense = adam_steps(gradient, 300)
    sparse = adam_steps(gradient, 300, make_compressor("topk:0.01"))
    assert np.abs(sparse).mean() > 0.75 * np.abs(dense).mean()


@pytest.mark.parametrize("spec, ratio", [("none", 1), ("fp16", 2), ("bf16", 2), ("topk:0.01", 4 / 0.06),
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


def test_top_k_warm_up_falls_geometrically_from_ten_times_the_fraction():
    compressor = make_compressor("topk:0.01,warmup=100")
    matrix = [(1000, 100)]
    assert [compressor.wire_bytes(matrix, step) // 6 for step in (0, 50, 100, 1000)] == [10_000, 3163, 1000, 1000]
    ramp = (10_000 - 1000) / np.log(10)  # entries per step, averaged over the warm-up
    flush = 4 * 100_000 / 6  # the residuals' float32 all-reduce at the end, in the same 6-byte units
    assert compressor.mean_wire_bytes(matrix, 400) / 6 == pytest.approx((100 * ramp + 300 * 1000 + flush) / 400,
                                                                        rel=0.01)


def test_top_k_warm_up_follows_the_optimizer_step():
    gradient = tf.random.stateless_normal((50, 20), seed=(5, 0))
    step = tf.Variable(0, dtype=tf.int64)
    compressor = make_compressor("topk:0.01,warmup=100")
    compressor.build([tf.Variable(tf.zeros_like(gradient))], ONE_PROCESS, step)
    reduce = tf.function(lambda: compressor.reduce([gradient], ONE_PROCESS)[0])
    assert np.count_nonzero(reduce()) == 100  # 10% of 1000 entries at step 0
    step.assign(100)
    assert np.count_nonzero(reduce()) == 10
