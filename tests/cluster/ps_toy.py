"""A test fixture: a small Keras 3 rating model over synthetic user and item ids, trained by
`common.plans.ps` under --plan=ps,... and by the one-process data plan otherwise (with the
Keras Adagrad the PS engine mirrors), so the tests can compare the two.

    python tests/cluster/ps_toy.py --plan=ps,workers=2,servers=2 --out_dir=OUT
    python tests/cluster/ps_toy.py --out_dir=OUT                       # one process
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common.config import TrainConfig, flag, parse_or_exit  # noqa: E402
from common.plans import ps  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ToyConfig(TrainConfig):
    steps: int = flag(300, "optimizer steps to train")
    global_batch_size: int = flag(128, "examples per step")
    lr: float = flag(0.1, "peak learning rate")
    warmup_steps: int = flag(10, "warm-up steps")
    log_every: int = flag(10, "steps between metrics lines")
    users: int = flag(600, "rows of the user table")
    items: int = flag(400, "rows of the item table")
    dim: int = flag(16, "embedding width")


def toy_data(config: ToyConfig, rows: int = 40000, seed: int = 1):
    """Ratings of user and item biases and a rank-4 taste, plus noise: (user ids, item ids, ratings)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    bias_u, bias_i = rng.normal(size=config.users), rng.normal(size=config.items)
    taste_u, taste_i = rng.normal(size=(config.users, 4)), rng.normal(size=(config.items, 4))
    users = rng.integers(0, config.users, rows).astype("int32")
    items = rng.integers(0, config.items, rows).astype("int32")
    taste = np.sum(taste_u[users] * taste_i[items], 1) / 4
    ratings = (3 + bias_u[users] + bias_i[items] + taste + 0.1 * rng.normal(size=rows)).astype("float32")
    return users, items, ratings


def build_model(config: ToyConfig):
    import keras
    user, item = keras.Input((), dtype="int32", name="user"), keras.Input((), dtype="int32", name="item")
    u = keras.layers.Embedding(config.users, config.dim, name="user_embedding")(user)
    i = keras.layers.Embedding(config.items, config.dim, name="item_embedding")(item)
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(keras.layers.Concatenate()([u, i, u * i]))
    rating = keras.layers.Dense(1, name="rating")(hidden)
    return keras.Model([user, item], rating)


def loss_sums(model, batch, training):
    import tensorflow as tf
    users, items, ratings = batch
    predicted = tf.squeeze(model([users, items], training=training), -1) + 3.0
    squared = tf.square(predicted - tf.cast(ratings, predicted.dtype))
    return tf.reduce_sum(squared), tf.cast(tf.size(squared), tf.float32), {"squared_error": tf.reduce_sum(squared)}


def rmse(model, data) -> dict:
    import numpy as np
    loss, count, _ = loss_sums(model, tuple(a[-4000:] for a in data), False)
    return {"test_rmse": float(np.sqrt(float(loss) / int(count)))}


def main():
    config = parse_or_exit(ToyConfig)
    data = toy_data(config)
    train_data = tuple(a[:-4000] for a in data)
    if ps.is_ps_plan(config.plan):
        ps.train(config, Path(config.out_dir), build_model=lambda: build_model(config), loss_sums=loss_sums,
                 train_data=train_data, evaluate=lambda model: rmse(model, data))
        return
    from common import api
    run = api.start(ToyConfig, "ps_toy")
    with run.model_scope():
        model = build_model(config)
        optimizer = api.make_optimizer(config, "adagrad")
    step = api.make_step(run, model, optimizer, loss_sums)
    api.train(run, model, optimizer, step, train_data, evaluate=lambda: rmse(model, data))


if __name__ == "__main__":
    from common.api import guarded
    guarded(main)()
