import json

import numpy as np
import pytest
import tensorflow as tf

from common import checkpoint
from common.errors import RecipeError


def make_variables(seed):
    rng = np.random.default_rng(seed)
    return [tf.Variable(rng.normal(size=(3, 4)).astype("float32"), name="kernel"),
            tf.Variable(rng.normal(size=(4,)).astype("float32"), name="bias"),
            tf.Variable(7, dtype=tf.int64, name="iterations")]


def test_round_trip_restores_every_value(tmp_path):
    saved = make_variables(0)
    checkpoint.save(tmp_path, 12, saved)
    restored = make_variables(1)
    assert checkpoint.restore(tmp_path, restored) == 12
    for a, b in zip(saved, restored):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert checkpoint.latest_step(tmp_path) == 12


def test_keeps_the_newest_three_and_no_temporary_files(tmp_path):
    variables = make_variables(0)
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, variables)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000003.npz", "ckpt-00000004.npz", "ckpt-00000005.npz", "latest.json"]


def test_no_checkpoint_means_no_step(tmp_path):
    assert checkpoint.latest_step(tmp_path) is None


def test_corrupt_file_is_detected(tmp_path):
    path = checkpoint.save(tmp_path, 3, make_variables(0))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RecipeError, match="corrupt.*drop --resume"):
        checkpoint.restore(tmp_path, make_variables(1))


def test_truncated_file_with_matching_manifest_is_detected(tmp_path):
    path = checkpoint.save(tmp_path, 3, make_variables(0))
    path.write_bytes(path.read_bytes()[:100])
    manifest = json.loads((tmp_path / "latest.json").read_text())
    manifest["sha256"] = checkpoint._sha256(path)
    (tmp_path / "latest.json").write_text(json.dumps(manifest))
    with pytest.raises(RecipeError, match="cannot be read"):
        checkpoint.restore(tmp_path, make_variables(1))


def test_other_model_is_refused(tmp_path):
    checkpoint.save(tmp_path, 3, make_variables(0))
    other = [tf.Variable(np.zeros((3, 5), "float32"), name="kernel")] + make_variables(0)[1:]
    with pytest.raises(RecipeError, match="shape"):
        checkpoint.restore(tmp_path, other)


def test_garbled_manifest_is_detected(tmp_path):
    checkpoint.save(tmp_path, 3, make_variables(0))
    (tmp_path / "latest.json").write_text("{not json")
    with pytest.raises(RecipeError, match="manifest"):
        checkpoint.restore(tmp_path, make_variables(1))
