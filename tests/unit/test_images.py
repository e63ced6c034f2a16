"""Fashion-MNIST IDX reading and the ConvNet's loss sums: pure logic, no processes."""
import gzip
import struct

import numpy as np
import pytest

from common.data.images import DataError, check_source, read_idx, read_split
from common.models.convnet import ConvNetSize, build_convnet, loss_sums


def write_idx(path, array, *, truncate=0):
    header = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write((header + array.astype(np.uint8).tobytes())[:len(header) + array.size - truncate])


def test_read_idx_gives_the_array_back(tmp_path):
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    write_idx(tmp_path / "x.gz", images)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "x.gz")), images)


def test_truncated_idx_is_a_data_error(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((2, 3, 4)), truncate=5)
    with pytest.raises(DataError, match="truncated"):
        read_idx(str(tmp_path / "x.gz"))


def test_not_an_idx_file_is_a_data_error(tmp_path):
    with gzip.open(tmp_path / "x.gz", "wb") as handle:
        handle.write(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="not an unsigned-byte IDX file"):
        read_idx(str(tmp_path / "x.gz"))


def test_read_split_adds_a_channel_axis_and_checks_counts(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([1, 2, 3]))
    images, labels = read_split(str(tmp_path), "train")
    assert images.shape == (3, 28, 28, 1) and labels.tolist() == [1, 2, 3]
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([1, 2]))
    with pytest.raises(DataError, match="3 images but"):
        read_split(str(tmp_path), "train")


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        check_source(str(tmp_path))


def test_loss_sums_count_images_and_correct_predictions():
    model = build_convnet(ConvNetSize((28, 28, 1), 10, (8, 16), 1, 4))
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28, 1)).astype(np.uint8)
    logits = model(images)
    labels = np.array([int(np.argmax(logits[0])), -1, -1, -1, -1, -1], np.int32)
    labels[1:] = (np.argmax(logits[1:], -1) + 1) % 10  # wrong on purpose
    loss, count, metrics = loss_sums(model, (images, labels), False)
    assert float(count) == 6 and float(metrics["accuracy"]) == 1
    expected = -np.sum(np.take_along_axis(np.log(np.exp(logits) / np.sum(np.exp(logits), -1, keepdims=True)),
                                          labels[:, None], -1))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
