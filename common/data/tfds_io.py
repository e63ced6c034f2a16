"""Preparing and opening TFDS builders safely from several processes at once.

Every MPI rank of a job calls the same loading code. Builders are prepared under an
exclusive file lock so exactly one rank writes the dataset while the others wait
and then read what it wrote; no collective communication is needed for that.
"""
import contextlib
import fcntl
import os

import tensorflow_datasets as tfds

from common.errors import RecipeError


class DataError(RecipeError):
    """A dataset cannot be used; the message is one line naming the fix."""


@contextlib.contextmanager
def file_lock(path: str):
    """Holds an exclusive `fcntl` lock on `path` (created if missing) for the block."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_embedded(builder_cls, data_dir: str, **builder_kwargs) -> tfds.core.DatasetBuilder:
    """Returns a prepared builder of `builder_cls`, building it once across processes.

    The builder is re-created after the lock is taken: one created before another
    process finished preparing would not have read the written dataset info.
    """
    builder = builder_cls(data_dir=data_dir, **builder_kwargs)
    if builder.is_prepared():
        return builder
    config = builder.builder_config.name if builder.builder_config else "default"
    with file_lock(os.path.join(data_dir, f".{builder.name}-{config}.lock")):
        builder = builder_cls(data_dir=data_dir, **builder_kwargs)
        if not builder.is_prepared():
            tfds.disable_progress_bar()  # every rank's bars would interleave in the job's log
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
            builder = builder_cls(data_dir=data_dir, **builder_kwargs)
    return builder


def load_prepared(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """Returns the builder of the public TFDS dataset `name`, which must be prepared.

    Never downloads: the training machines have no network, where a download would
    hang for minutes before failing.
    """
    where = data_dir or "the default TFDS data dir (~/tensorflow_datasets)"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (tfds.core.registered.DatasetNotFoundError, ValueError):
        raise DataError(f"Unknown TFDS dataset or config {name!r}: pass a --dataset "
                        "name/config from the TFDS catalog, e.g. wmt14_translate/de-en") from None
    if not builder.is_prepared():
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in {where}: prepare it on a machine "
            f"with network (`tfds build {name} --data_dir {data_dir or '~/tensorflow_datasets'}`) "
            "or drop --dataset to train on the embedded data")
    return builder
