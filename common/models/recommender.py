"""Matrix factorisation for rating prediction, and the ranking metrics it is scored by.

Predicted rating = the training set's mean + a user bias + an item bias + the dot product of
a user and an item vector, each a row of a Keras `Embedding` table. Ranked by rating alone,
such a model recommends little-known movies a few users loved; so the same vectors also learn
which movies a user rates at all (a logistic loss against one sampled movie per rating, as in
implicit-feedback collaborative filtering), and items are ranked by that interest. The tables are marked
`plans.data.mark_sparse`: each step touches a few of their rows, so the data plan sends those
rows (Horovod's all-gather), not the whole tables.

Ranking metrics are computed here, not with `tensorflow-recommenders`: its 0.7.7 wheel
requires `tf-keras` and refuses to import under Keras 3 (it asks for TF_USE_LEGACY_KERAS=1,
which would swap this project's Keras for Keras 2).
"""
from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from common.plans.data import mark_sparse


@dataclasses.dataclass(frozen=True)
class RecommenderSize:
    num_users: int
    num_items: int
    dim: int  # length of the user and item vectors


class MatrixFactorization(keras.Model):
    """(users int32 [n], items int32 [n]) in, predicted ratings float32 [n] out. Each item also
    has an interest bias: a user's interest in an item (which ranks items) is the dot product
    of their vectors plus that bias, trained to tell rated items from sampled others."""

    def __init__(self, size: RecommenderSize, **kwargs):
        super().__init__(**kwargs)
        self.size = size
        vectors = keras.initializers.RandomNormal(stddev=0.05)
        self.user_vectors = keras.layers.Embedding(size.num_users, size.dim, embeddings_initializer=vectors,
                                                   name="user_vectors")
        self.item_vectors = keras.layers.Embedding(size.num_items, size.dim, embeddings_initializer=vectors,
                                                   name="item_vectors")
        self.user_bias = keras.layers.Embedding(size.num_users, 1, embeddings_initializer="zeros", name="user_bias")
        self.item_bias = keras.layers.Embedding(size.num_items, 1, embeddings_initializer="zeros", name="item_bias")
        self.item_interest = keras.layers.Embedding(size.num_items, 1, embeddings_initializer="zeros",
                                                    name="item_interest")
        # Not trained: set from the training ratings, and saved with the weights.
        self.mean_rating = self.add_weight(shape=(), initializer="zeros", trainable=False, name="mean_rating")
        for table in (self.user_vectors, self.item_vectors, self.user_bias, self.item_bias, self.item_interest):
            table.build((None,))
            mark_sparse(table.embeddings)
        self.built = True  # every weight exists now: export needs no call to build it

    def rated(self, users, items):
        """(the predicted ratings [n], the rows looked up for them)."""
        rows = (self.user_vectors(users), self.item_vectors(items),
                tf.squeeze(self.user_bias(users), -1), tf.squeeze(self.item_bias(items), -1))
        user_vectors, item_vectors, user_bias, item_bias = rows
        return self.mean_rating + user_bias + item_bias + tf.reduce_sum(user_vectors * item_vectors, -1), rows

    def interest(self, user_vectors, item_vectors, items):
        """(the interest [n] of users in `items`, given both their looked-up vectors; the items'
        interest biases looked up for it [n])."""
        bias = tf.squeeze(self.item_interest(items), -1)
        return bias + tf.reduce_sum(user_vectors * item_vectors, -1), bias

    def call(self, batch, training=False):
        return self.rated(*batch)[0]

    def all_scores(self, users) -> tuple[tf.Tensor, tf.Tensor]:
        """(predicted ratings, interests), each [len(users), num_items], of every item for each of `users`."""
        user_vectors = self.user_vectors(users)
        dots = tf.matmul(user_vectors, self.item_vectors.embeddings, transpose_b=True)
        return (self.mean_rating + self.user_bias(users) + tf.transpose(self.item_bias.embeddings) + dots,
                tf.transpose(self.item_interest.embeddings) + dots)


def build_recommender(size: RecommenderSize, mean_rating: float) -> MatrixFactorization:
    """A fixed name: Keras numbers unnamed models per process, and the name is in the path (so
    model.npz's name) of `mean_rating`; a second model in the training process (the export's)
    must load the same names."""
    model = MatrixFactorization(size, name="matrix_factorization")
    model.mean_rating.assign(mean_rating)
    return model


def make_loss_sums(l2: float, interest_weight: float):
    """loss_sums(model, (users, items, ratings, negatives), training) -> (the sum over examples of
    the squared rating error, plus `interest_weight` times the logistic loss of the user's
    interest in the rated item (label 1) and in the example's sampled item `negatives` (label 0),
    plus `l2` times the squared norm of every row looked up; the example count; the sums of the
    squared errors and of the interest losses). Every term is per example, so the sums add over
    replicas and N processes train like one."""
    def loss_sums(model, batch, training):
        users, items, ratings, negatives = batch
        predicted, rows = model.rated(users, items)
        squared_error = tf.reduce_sum(tf.square(predicted - ratings))
        liked, liked_bias = model.interest(rows[0], rows[1], items)
        other_vectors = model.item_vectors(negatives)
        other, other_bias = model.interest(rows[0], other_vectors, negatives)
        interest_loss = tf.reduce_sum(tf.math.softplus(-liked) + tf.math.softplus(other))
        loss = squared_error + interest_weight * interest_loss
        if l2:
            looked_up = (*rows, liked_bias, other_vectors, other_bias)
            loss += l2 * tf.add_n([tf.reduce_sum(tf.square(row)) for row in looked_up])
        return loss, tf.cast(tf.size(ratings), tf.float32), {"squared_error": squared_error,
                                                             "interest_loss": interest_loss}
    return loss_sums


def sampled_negatives(num_items: int, count: int, seed: int) -> np.ndarray:
    """One uniformly drawn item per training example (int32 [count]), the same on every process."""
    return np.random.default_rng(seed).integers(0, num_items, count, dtype=np.int32)


def by_user(num_users: int, users: np.ndarray, *columns: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """For each user index, its entries of `columns` (parallel to `users`), in input order."""
    order = np.argsort(users, kind="stable")
    bounds = np.searchsorted(users[order], np.arange(num_users + 1))
    return [tuple(column[order][start:end] for column in columns) for start, end in zip(bounds[:-1], bounds[1:])]


def top_unseen(scores: np.ndarray, seen: np.ndarray, k: int) -> np.ndarray:
    """The `k` best-scored item indices not in `seen`, best first (ties: the lower index)."""
    scores = np.array(scores, np.float64)
    scores[seen] = -np.inf
    best = np.argsort(-scores, kind="stable")[:k]
    return best[np.isfinite(scores[best])]


def ranking_scores(top: np.ndarray, relevant: np.ndarray, k: int) -> tuple[float, float]:
    """(recall@k, NDCG@k) of one user's ranked `top` items against their `relevant` items.
    Recall divides the hits by min(k, |relevant|), so a user with more than k held-out items
    can reach 1; NDCG uses binary gains, its ideal ranking putting the relevant items first."""
    hits = np.isin(top[:k], relevant)
    recall = hits.sum() / min(k, len(relevant))
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = discounts[:min(k, len(relevant))].sum()
    return float(recall), float((hits * discounts[:len(hits)]).sum() / ideal)
