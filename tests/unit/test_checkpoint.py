import json

import keras
import numpy as np
import pytest

from common import checkpoint
from common.compression import Compressor, PowerSGDCompression, TopKCompression
from common.dist import Dist
from common.errors import RecipeError
from common.state import TrainingState


def make_arrays(seed):
    rng = np.random.default_rng(seed)
    return {"dense/kernel": rng.normal(size=(3, 4)).astype("float32"),
            "dense/bias": rng.normal(size=(4,)).astype("float32"), "adam/iteration": np.int64(7)}


def test_round_trip_keeps_every_value(tmp_path):
    saved = make_arrays(0)
    checkpoint.save(tmp_path, 12, saved)
    step, loaded = checkpoint.load(tmp_path)
    assert step == 12 and sorted(loaded) == sorted(saved)
    for name, value in saved.items():
        np.testing.assert_array_equal(loaded[name], value)
    assert checkpoint.latest_step(tmp_path) == 12


def test_keeps_the_newest_three_and_no_temporary_files(tmp_path):
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, make_arrays(step))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000003.npz", "ckpt-00000004.npz", "ckpt-00000005.npz", "latest.json"]


def test_no_checkpoint_means_no_step(tmp_path):
    assert checkpoint.latest_step(tmp_path) is None


def test_corrupt_file_is_detected(tmp_path):
    path = checkpoint.save(tmp_path, 3, make_arrays(0))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RecipeError, match="corrupt.*drop --resume"):
        checkpoint.load(tmp_path)


def test_truncated_file_with_matching_manifest_is_detected(tmp_path):
    path = checkpoint.save(tmp_path, 3, make_arrays(0))
    path.write_bytes(path.read_bytes()[:100])
    manifest = json.loads((tmp_path / "latest.json").read_text())
    manifest["sha256"] = checkpoint._sha256(path)
    (tmp_path / "latest.json").write_text(json.dumps(manifest))
    with pytest.raises(RecipeError, match="cannot be read"):
        checkpoint.load(tmp_path)


def test_garbled_manifest_is_detected(tmp_path):
    checkpoint.save(tmp_path, 3, make_arrays(0))
    (tmp_path / "latest.json").write_text("{not json")
    with pytest.raises(RecipeError, match="manifest"):
        checkpoint.load(tmp_path)


def one_process_state(width, compressor=None):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(width, name="dense")], name="toy")
    optimizer = keras.optimizers.Adam(name="adam")
    optimizer.build(model.trainable_variables)
    dist = Dist("horovod", 0, 1, 0, 1)
    if compressor is None:
        return TrainingState(dist, model, optimizer)
    compressor.build(model.trainable_variables, dist, optimizer.iterations)
    return TrainingState(dist, model, optimizer, compressor)


def test_state_restores_what_it_saved(tmp_path):
    state = one_process_state(4)
    state.save(tmp_path, 5)
    expected = [np.asarray(v).copy() for v in state.variables]
    for v in state.variables:
        v.assign(np.zeros(v.shape, v.dtype))
    state.restore_or_start(tmp_path, resume=True)
    for v, value in zip(state.variables, expected):
        np.testing.assert_array_equal(np.asarray(v), value)


def test_state_refuses_a_checkpoint_of_another_model(tmp_path):
    one_process_state(4).save(tmp_path, 5)
    with pytest.raises(RecipeError, match="shape"):
        one_process_state(5).restore_or_start(tmp_path, resume=True)


KERNEL, BIAS = "toy/dense/kernel", "toy/dense/bias"


def two_replica_checkpoint(tmp_path, kind):
    """A checkpoint as two replicas of a compressed run write it: the shared state, and what
    each replica had not yet sent (1 and 2 in every entry)."""
    arrays = one_process_state(4).full_arrays()
    for replica, unsent in enumerate([1.0, 2.0]):
        for name in (KERNEL, BIAS):
            arrays[f"per_replica/{replica}/{kind}/{name}"] = np.full(arrays[name].shape, unsent, np.float32)
    checkpoint.save(tmp_path, 5, arrays)
    return arrays


def test_a_compressed_run_keeps_each_replicas_unsent_updates_and_moments(tmp_path):
    state = one_process_state(4, TopKCompression(0.5))
    assert any(name.startswith("unsent_updates/") for name in state.replica_local)
    assert any(name.startswith("adam/") for name in state.replica_local)  # each replica's own moments
    for v in state.replica_local.values():
        v.assign(np.full(v.shape, 3, np.asarray(v).dtype))
    state.save(tmp_path, 5)
    for v in state.replica_local.values():
        v.assign(np.zeros(v.shape, np.asarray(v).dtype))
    state.restore_or_start(tmp_path, resume=True)
    for v in state.replica_local.values():
        np.testing.assert_array_equal(np.asarray(v), 3.0)


def test_fewer_replicas_take_the_sum_of_what_every_replica_had_not_sent(tmp_path):
    saved = two_replica_checkpoint(tmp_path, "unsent_updates")
    state = one_process_state(4, TopKCompression(0.5))
    state.restore_or_start(tmp_path, resume=True)
    residual = state.replica_local[f"unsent_updates/{KERNEL}"]
    np.testing.assert_array_equal(np.asarray(residual), 3.0)  # 1 + 2: replica 0 now holds both
    np.testing.assert_array_equal(np.asarray(state.variables[state.names.index(KERNEL)]), saved[KERNEL])


def test_unsent_updates_go_into_the_weights_when_the_run_no_longer_compresses(tmp_path):
    saved = two_replica_checkpoint(tmp_path, "unsent_updates")
    state = one_process_state(4, Compressor())
    state.restore_or_start(tmp_path, resume=True)
    np.testing.assert_allclose(np.asarray(state.variables[state.names.index(KERNEL)]), saved[KERNEL] + 3.0)


def test_unsent_gradients_need_a_compressor_that_keeps_them(tmp_path):
    two_replica_checkpoint(tmp_path, "unsent_gradients")
    with pytest.raises(RecipeError, match="--compression=powersgd"):
        one_process_state(4, TopKCompression(0.5)).restore_or_start(tmp_path, resume=True)
    state = one_process_state(4, PowerSGDCompression(2))
    state.restore_or_start(tmp_path, resume=True)
    assert all(np.asarray(v).max() == 3.0 for name, v in state.replica_local.items())
