"""Top-k of each replica's optimizer update (common.compressed_updates), on one process."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from common.compressed_updates import (UpdateTopK, feed_second_moments, global_square_estimates,
                                       step_on_compressed_updates, weights_moved_by)
from common.optimizers import build_slots
from tests.unit.one_process import ONE_PROCESS


def adam_steps(gradient, steps, fraction=None):
    """The weights after `steps` Adam steps on a constant gradient, from zero: plain, or with
    top-k of the weight updates (one process), plus what still waits in the residual."""
    weights = tf.Variable(tf.zeros_like(gradient))
    optimizer = keras.optimizers.Adam(0.01)
    build_slots(optimizer, [weights], ONE_PROCESS)
    if fraction is None:
        step = tf.function(lambda: optimizer.apply([gradient], [weights]))
    else:
        codec = UpdateTopK(fraction)
        codec.build([weights], ONE_PROCESS)
        step = tf.function(lambda: step_on_compressed_updates(
            [gradient], [weights], optimizer, codec, ONE_PROCESS, lambda grads: grads))
    for _ in range(steps):
        step()
    return weights.numpy() + (0 if fraction is None else codec.residuals[0].numpy())


def test_compressing_updates_that_lose_nothing_is_the_optimizers_own_step():
    gradient = tf.random.stateless_normal((2, 2), seed=(4, 0))
    # Keeps all 4 entries; what bfloat16 rounds off waits in the residual.
    np.testing.assert_allclose(adam_steps(gradient, 5, 0.9), adam_steps(gradient, 5), rtol=1e-6)


def test_sparse_updates_move_the_weights_as_far_as_dense_adam():
    """100 entries, 1 sent per step: each moves in spikes about once per 100 steps, yet
    (compressing Adam's updates, not its gradients) about as far as dense Adam. Top-k of the
    gradients would feed Adam those spikes, which it scales down about tenfold (sqrt of 100)."""
    gradient = tf.ones((10, 10))
    assert np.abs(adam_steps(gradient, 300, 0.01)).mean() > 0.75 * np.abs(adam_steps(gradient, 300)).mean()


def test_the_look_ahead_moves_the_weights_by_the_residuals_and_puts_them_back_exactly():
    start = tf.random.stateless_normal((4, 5), seed=(6, 0))
    weights, residual = tf.Variable(start), tf.Variable(tf.random.stateless_normal((4, 5), seed=(6, 1)))

    @tf.function
    def weights_seen():
        with weights_moved_by([weights], [residual]):
            return tf.identity(weights)
    np.testing.assert_allclose(weights_seen(), start + residual, rtol=1e-6)
    np.testing.assert_array_equal(weights.numpy(), start.numpy())  # restored, not subtracted


def test_update_residuals_are_named_apart_from_gradient_residuals():
    codec = UpdateTopK(0.5)
    codec.build([tf.Variable(tf.zeros((2, 2)), name="kernel")], ONE_PROCESS)
    assert [name.split("/")[0] for name in codec.replica_state()] == ["unsent_updates"]
    assert codec.spec == "topk_updates:0.5"


@pytest.mark.parametrize("replicas", [2, 4])
def test_global_square_estimates_remove_the_extra_noise_of_a_replicas_share(replicas):
    """Per-example gradients mu + noise (sd sigma), batch B over N replicas: a replica's mean
    estimate squared averages mu^2 + N sigma^2 / B; the estimate averages mu^2 + sigma^2 / B,
    what one process on the whole batch sees."""
    rng = np.random.default_rng(0)
    mu, sigma, batch, trials = np.array([0.0, 0.3, 1.0]), 2.0, 32, 40000
    examples = mu + sigma * rng.standard_normal((trials, batch // replicas, 3))
    share = examples.mean(axis=1)
    half = batch // replicas // 2
    difference = examples[:, :half].mean(axis=1) - examples[:, half:].mean(axis=1)
    # The halves' sums, scaled to mean size like the step scales them: (first - second) / (B/N) * ...
    difference_scaled = difference / 2
    estimates = global_square_estimates([tf.constant(share)], [tf.constant(difference_scaled)], replicas)[0].numpy()
    np.testing.assert_allclose((share ** 2).mean(axis=0), mu ** 2 + replicas * sigma ** 2 / batch, rtol=0.03)
    np.testing.assert_allclose(estimates.mean(axis=0), mu ** 2 + sigma ** 2 / batch, rtol=0.06)


def test_adam_averages_the_fed_squares_into_its_second_moment():
    weights = tf.Variable(tf.zeros(3))
    optimizer = keras.optimizers.Adam(0.1)
    moment = build_slots(optimizer, [weights], ONE_PROCESS)["velocity"][0]
    moment.assign([1.0, 2.0, 3.0])
    gradient, squares = tf.constant([4.0, -1.0, 0.5]), tf.constant([2.0, 0.0, 9.0])
    feed_second_moments([moment], optimizer.beta_2, [gradient], [squares])
    optimizer.apply([gradient], [weights])
    expected = optimizer.beta_2 * np.array([1.0, 2.0, 3.0]) + (1 - optimizer.beta_2) * squares.numpy()
    np.testing.assert_allclose(moment.numpy(), expected, rtol=1e-5)


def test_a_negative_square_never_takes_adams_second_moment_to_zero():
    weights = tf.Variable(tf.zeros(2))
    optimizer = keras.optimizers.Adam(0.1)
    moment = build_slots(optimizer, [weights], ONE_PROCESS)["velocity"][0]
    gradient = tf.constant([1e-3, 5.0])
    feed_second_moments([moment], optimizer.beta_2, [gradient], [tf.constant([-1.0, -30.0])])
    optimizer.apply([gradient], [weights])
    assert (moment.numpy() > 0).all() and np.isfinite(weights.numpy()).all()


def test_a_very_negative_square_lowers_a_large_second_moment_only_a_little():
    weights = tf.Variable(tf.zeros(1))
    optimizer = keras.optimizers.Adam(0.1)
    moment = build_slots(optimizer, [weights], ONE_PROCESS)["velocity"][0]
    moment.assign([1.0])
    gradient = tf.constant([1e-4])
    feed_second_moments([moment], optimizer.beta_2, [gradient], [tf.constant([-1e6])])
    optimizer.apply([gradient], [weights])
    assert 0.99 < moment.numpy()[0] < 1.0 and np.isfinite(weights.numpy()).all()
