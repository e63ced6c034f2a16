import json

import keras
import numpy as np
import pytest

from common import checkpoint
from common.compression import PowerSGDCodec, TopKCodec
from common.errors import RecipeError
from common.optimizers import build_slots
from common.state import TrainingState
from tests.unit.one_process import ONE_PROCESS


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


def test_keep_sets_how_many_stay_and_a_rewound_run_drops_the_later_ones(tmp_path):
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, make_arrays(step), keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-00000004.npz", "ckpt-00000005.npz"]
    checkpoint.save(tmp_path, 3, make_arrays(3), keep=1)  # a run resumed from step 2 reached step 3
    assert [p.name for p in tmp_path.glob("ckpt-*")] == ["ckpt-00000003.npz"]
    assert checkpoint.load(tmp_path)[0] == 3


def test_a_write_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path):
    checkpoint.save(tmp_path, 1, make_arrays(1))
    torn = tmp_path / ".ckpt-00000002.npz.tmp"
    torn.write_bytes(b"PK\x03\x04 half a zip")  # what a process killed while writing step 2 leaves
    step, arrays = checkpoint.load(tmp_path)
    assert step == 1
    np.testing.assert_array_equal(arrays["dense/kernel"], make_arrays(1)["dense/kernel"])
    checkpoint.save(tmp_path, 2, make_arrays(2))
    assert checkpoint.load(tmp_path)[0] == 2 and not list(tmp_path.glob(".*"))


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


def one_process_state(width, codec=None):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(width, name="dense")], name="toy")
    optimizer = keras.optimizers.Adam(name="adam")
    build_slots(optimizer, model.trainable_variables, ONE_PROCESS)
    if codec is None:
        return TrainingState(ONE_PROCESS, model, optimizer)
    codec.build(model.trainable_variables, ONE_PROCESS)
    return TrainingState(ONE_PROCESS, model, optimizer, codec.replica_state())


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


def test_a_compressed_run_keeps_each_replicas_residuals(tmp_path):
    state = one_process_state(4, TopKCodec(0.5))
    assert sorted(state.replica_state) == [f"unsent_gradients/{BIAS}", f"unsent_gradients/{KERNEL}"]
    for v in state.replica_state.values():
        v.assign(np.full(v.shape, 3, np.float32))
    state.save(tmp_path, 5)
    assert f"per_replica/0/unsent_gradients/{KERNEL}" in checkpoint.load(tmp_path)[1]
    for v in state.replica_state.values():
        v.assign(np.zeros(v.shape, np.float32))
    state.restore_or_start(tmp_path, resume=True)
    for v in state.replica_state.values():
        np.testing.assert_array_equal(np.asarray(v), 3.0)


def test_a_compressed_run_resumed_from_an_uncompressed_checkpoint_starts_with_empty_residuals(tmp_path):
    one_process_state(4).save(tmp_path, 5)
    state = one_process_state(4, PowerSGDCodec(2))
    state.restore_or_start(tmp_path, resume=True)
    assert not any(np.any(np.asarray(v)) for v in state.replica_state.values())


@pytest.mark.parametrize("kind, codec", [("unsent_gradients", TopKCodec(0.5)), ("unsent_updates", TopKCodec(0.5)),
                                         ("unsent_updates", None)],
                         ids=["other-replica-count", "other-kind", "no-compression"])
def test_replica_state_this_run_cannot_take_is_one_clear_error(tmp_path, kind, codec):
    two_replica_checkpoint(tmp_path, kind)
    with pytest.raises(RecipeError) as error:
        one_process_state(4, codec).restore_or_start(tmp_path, resume=True)
    message = str(error.value)
    assert f"holds state of each of its 2 data-parallel replicas ({kind})" in message
    assert "resume with 2 replicas and the --compression its config.json names" in message and "\n" not in message
