"""Image classification data: Fashion-MNIST from the Debian package, as a TFDS builder.

Debian's dataset-fashion-mnist ships the original IDX files; their checksums differ from the
ones TFDS registered for `fashion_mnist`, so this builder reads the files itself rather than
pointing TFDS's downloader at them. Its features match the public `fashion_mnist` and `mnist`
data sets ("image" uint8 [28, 28, 1], "label"), so `--dataset=fashion_mnist` loads the same
way where that data set is prepared.
"""
from __future__ import annotations

import dataclasses
import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

from common.data.tfds_io import DataError, load_prepared, prepare_embedded

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
DEBUG_SIZES = {"train": 2000, "test": 500}
_IDX_DTYPES = {0x08: np.uint8}


def check_source(source_dir: str) -> None:
    """Raises DataError unless all four IDX files are in `source_dir`."""
    for name in (name for pair in FILES.values() for name in pair):
        if not os.path.isfile(os.path.join(source_dir, name)):
            raise DataError(f"Fashion-MNIST file {name} not found in {source_dir}: install the Debian "
                            "package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
                            "or run scripts/setup.sh")


def read_idx(path: str) -> np.ndarray:
    """The array in a gzipped IDX file: two zero bytes, a type code, the rank, then each
    dimension as a big-endian uint32, then the values in C order."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES or len(data) < 4 + 4 * data[3]:
        raise DataError(f"{path} is not an unsigned-byte IDX file: reinstall dataset-fashion-mnist")
    rank = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, ">u4", count=rank, offset=4))
    values = np.frombuffer(data, _IDX_DTYPES[data[2]], offset=4 + 4 * rank)
    if values.size != int(np.prod(shape)):
        raise DataError(f"{path} holds {values.size} values for shape {shape}: the file is truncated, "
                        "reinstall dataset-fashion-mnist")
    return values.reshape(shape)


def read_split(source_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [n, 28, 28, 1] and labels uint8 [n] of `split`, in file order."""
    images_file, labels_file = (os.path.join(source_dir, name) for name in FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if len(images) != len(labels):
        raise DataError(f"{images_file} has {len(images)} images but {labels_file} {len(labels)} labels: "
                        "reinstall dataset-fashion-mnist")
    return images[..., np.newaxis], labels


class FashionMnistDebian(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST (Zalando, 2017) read from the files Debian installs."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "The 60k/10k images of dataset-fashion-mnist 0.0~git20200523."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="full", description="All 60,000 train and 10,000 test images."),
        tfds.core.BuilderConfig(name="debug", description="The first {train} train and {test} test "
                                "images.".format(**DEBUG_SIZES)),
    ]
    DEFAULT_CONFIG_NAME = "full"

    def __init__(self, *, source_dir: str = DEFAULT_SOURCE_DIR, **kwargs):
        self._source_dir = source_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES)}),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is read from the local files.
        check_source(self._source_dir)
        limit = DEBUG_SIZES if self.builder_config.name == "debug" else {}
        return {split: self._generate_examples(*read_split(self._source_dir, split), limit.get(split))
                for split in FILES}

    def _generate_examples(self, images, labels, limit):
        for number, (image, label) in enumerate(zip(images[:limit], labels[:limit])):
            yield number, {"image": image, "label": int(label)}


@dataclasses.dataclass(frozen=True)
class ImageData:
    train_images: np.ndarray  # uint8 [n, height, width, channels]
    train_labels: np.ndarray  # int32 [n]
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]


def _arrays(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All of `split` as arrays, in the stored order (the same in every process)."""
    images, labels = [], []
    for batch in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False).batch(10_000)):
        images.append(batch["image"])
        labels.append(batch["label"])
    return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def load_images(*, data_dir: str, dataset: str | None, debug: bool,
                source_dir: str = DEFAULT_SOURCE_DIR) -> ImageData:
    """Train and test images with labels, preparing the embedded data set if needed.

    `dataset=None` selects Fashion-MNIST from the Debian package (its `debug` config if
    `debug`); otherwise `dataset` names a prepared public TFDS image classification data set
    with "image" and "label" features and train/test splits, e.g. fashion_mnist or mnist.
    """
    if dataset is None:
        check_source(source_dir)
        builder = prepare_embedded(FashionMnistDebian, data_dir, config="debug" if debug else "full",
                                   source_dir=source_dir)
    else:
        builder = load_prepared(dataset, data_dir)
        features = dict(builder.info.features) if isinstance(builder.info.features, tfds.features.FeaturesDict) else {}
        if not ("image" in features and isinstance(features.get("label"), tfds.features.ClassLabel)
                and {"train", "test"} <= set(builder.info.splits)):
            raise DataError(f"TFDS dataset {dataset!r} needs image and class-label features and train and test "
                            "splits: pass an image classification data set such as fashion_mnist, mnist or cifar10")
    train_images, train_labels = _arrays(builder, "train")
    test_images, test_labels = _arrays(builder, "test")
    return ImageData(train_images, train_labels, test_images, test_labels,
                     list(builder.info.features["label"].names))
