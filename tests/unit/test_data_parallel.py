import keras
import numpy as np
import pytest
import tensorflow as tf

from common.data.pipeline import shard_rows, sharded_batches, unshard_rows
from common.errors import ConfigError
from common.plans.data import (WarmupCosine, _feed_second_moments, global_square_estimates, per_replica_batch_size,
                               scaled_lr, second_moments, split_halves)


def test_batch_split_must_be_exact():
    assert per_replica_batch_size(64, 2, 4) == 8
    with pytest.raises(ConfigError, match="multiple of 4"):
        per_replica_batch_size(30, 2, 2)


def test_lr_scaling_depends_on_the_global_batch_only():
    assert scaled_lr(0.1, 256, 64, "none") == 0.1
    assert scaled_lr(0.1, 256, 64, "linear") == pytest.approx(0.4)
    assert scaled_lr(0.1, 256, 64, "sqrt") == pytest.approx(0.2)


def test_warmup_then_cosine_decay():
    schedule = WarmupCosine(1.0, warmup_steps=4, total_steps=14, final_fraction=0.1)
    values = [float(schedule(step)) for step in range(16)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[4] == pytest.approx(1.0)
    assert values[9] == pytest.approx(0.55)
    assert values[14] == pytest.approx(0.1) and values[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


@pytest.mark.parametrize("num_shards", [2, 4])
def test_shards_together_make_the_single_process_batches(num_shards):
    rows = np.arange(40).reshape(20, 2)
    labels = np.arange(20)
    whole = sharded_batches((rows, labels), batch_size=8, num_shards=1, shard_index=0, seed=3)
    parts = [sharded_batches((rows, labels), batch_size=8 // num_shards, num_shards=num_shards,
                             shard_index=i, seed=3) for i in range(num_shards)]
    for _ in range(7):  # crosses epoch boundaries
        expected = sorted(next(whole)[1].numpy().tolist())
        got = sorted(sum((next(p)[1].numpy().tolist() for p in parts), []))
        assert got == expected


def test_skip_resumes_the_same_stream():
    rows = np.arange(30)
    stream = sharded_batches((rows,), batch_size=4, num_shards=1, shard_index=0, seed=1)
    batches = [next(stream)[0].numpy().tolist() for _ in range(10)]
    resumed = sharded_batches((rows,), batch_size=4, num_shards=1, shard_index=0, seed=1, skip_batches=6)
    assert next(resumed)[0].numpy().tolist() == batches[6]


def test_unshard_inverts_shard():
    rows = list("abcdefghij")
    assert unshard_rows([shard_rows(rows, 3, i) for i in range(3)]) == rows


@pytest.mark.parametrize("size, halves", [(6, [3, 3]), (5, [2, 3]), (1, [1])])
def test_split_halves(size, halves):
    batch = (tf.range(size), tf.range(size) * 10)
    parts = split_halves(batch)
    assert [int(p[0].shape[0]) for p in parts] == halves
    assert np.concatenate([p[1].numpy() for p in parts]).tolist() == (np.arange(size) * 10).tolist()


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
    optimizer.build([weights])
    moment = second_moments(optimizer)[0]
    moment.assign([1.0, 2.0, 3.0])
    gradient, squares = tf.constant([4.0, -1.0, 0.5]), tf.constant([2.0, 0.0, 9.0])
    _feed_second_moments([moment], optimizer.beta_2, [gradient], [squares])
    optimizer.apply([gradient], [weights])
    expected = optimizer.beta_2 * np.array([1.0, 2.0, 3.0]) + (1 - optimizer.beta_2) * squares.numpy()
    np.testing.assert_allclose(moment.numpy(), expected, rtol=1e-5)
    assert second_moments(keras.optimizers.SGD(0.1, momentum=0.9)) is None


def test_a_negative_square_never_takes_adams_second_moment_to_zero():
    weights = tf.Variable(tf.zeros(2))
    optimizer = keras.optimizers.Adam(0.1)
    optimizer.build([weights])
    moment = second_moments(optimizer)[0]
    gradient = tf.constant([1e-3, 5.0])
    _feed_second_moments([moment], optimizer.beta_2, [gradient], [tf.constant([-1.0, -30.0])])
    optimizer.apply([gradient], [weights])
    assert (moment.numpy() > 0).all() and np.isfinite(weights.numpy()).all()


def test_a_very_negative_square_lowers_a_large_second_moment_only_a_little():
    weights = tf.Variable(tf.zeros(1))
    optimizer = keras.optimizers.Adam(0.1)
    optimizer.build([weights])
    moment = second_moments(optimizer)[0]
    moment.assign([1.0])
    gradient = tf.constant([1e-4])
    _feed_second_moments([moment], optimizer.beta_2, [gradient], [tf.constant([-1e6])])
    optimizer.apply([gradient], [weights])
    assert 0.99 < moment.numpy()[0] < 1.0 and np.isfinite(weights.numpy()).all()
