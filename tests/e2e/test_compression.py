"""Compressed gradients end to end: translate.py under horovodrun -np 2 (--debug)."""
import numpy as np
import pytest

from common import checkpoint
from tests.launchers import rewind_to, run_recipe

pytestmark = pytest.mark.slow

# Few test sentences: these runs are about training, and decoding would dominate their time.
ARGS = ["--debug", "--deterministic", "--steps=20", "--log_every=1", "--checkpoint_every=0",
        "--max_test=8", "--samples=0"]


def train(compression, data_dir, out_dir):
    result = run_recipe("translate", ARGS + [f"--data_dir={data_dir}", f"--compression={compression}"], out_dir,
                        launcher="horovodrun")
    assert result.returncode == 0, result.output[-3000:]
    losses = result.losses()
    assert len(losses) == 20
    return losses


@pytest.fixture(scope="module")
def uncompressed_losses(data_dir, tmp_path_factory):
    return train("none", data_dir, tmp_path_factory.mktemp("none"))


def test_fp16_trains_like_float32(uncompressed_losses, data_dir, tmp_path):
    np.testing.assert_allclose(train("fp16", data_dir, tmp_path), uncompressed_losses, rtol=1e-2)


@pytest.mark.parametrize("compression", ["topk:0.05", "powersgd:2"])
def test_lossy_compression_with_error_feedback_trains(compression, data_dir, tmp_path):
    losses = train(compression, data_dir, tmp_path)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses


def test_pipeline_stages_share_named_collectives_under_lossy_compression(data_dir, tmp_path):
    # The stages trace different graphs (different variables, and top-k adds ops per variable):
    # gradient clipping's norm, summed over the stages, is a collective they must name alike.
    args = ["--debug", "--deterministic", "--steps=10", "--log_every=1", "--checkpoint_every=0", "--max_test=4",
            f"--data_dir={data_dir}", "--plan=pipeline=2,microbatches=2", "--compression=topk:0.05", "--clip_norm=0.5"]
    result = run_recipe("summarize", args, tmp_path, launcher="horovodrun", timeout=300)
    assert result.returncode == 0, result.output[-3000:]
    assert len(result.losses()) == 10


def test_resume_keeps_what_each_replica_had_not_yet_sent(data_dir, tmp_path):
    # Each replica's top-k residual and (top-k compresses Adam's updates) its own optimizer
    # moments are in the checkpoint: steps 11-20 after a resume match the uninterrupted run.
    # The evaluation at step 10 must leave training as it was, and is checked at the end.
    args = ARGS + [f"--data_dir={data_dir}", "--compression=topk:0.05", "--checkpoint_every=10", "--eval_every=10"]
    first = run_recipe("translate", args, tmp_path, launcher="horovodrun")
    assert first.returncode == 0, first.output[-3000:]
    uninterrupted = first.losses()
    mid_run_eval = next(m for m in first.metrics() if m["step"] == 10 and "test_loss" in m)
    rewind_to(tmp_path / "checkpoints", 10)
    resumed = run_recipe("translate", args + ["--resume"], tmp_path, launcher="horovodrun")
    assert resumed.returncode == 0, resumed.output[-3000:]
    np.testing.assert_allclose(resumed.losses()[10:], uninterrupted[10:], rtol=1e-4)
    # At the end both replicas' unsent updates went into the weights: the last checkpoint
    # holds empty residuals, and the exported model is its weights.
    step, arrays = checkpoint.load(tmp_path / "checkpoints")
    unsent = [name for name in arrays if "/unsent_updates/" in name]
    assert step == 20 and len(unsent) > 2 and not any(np.any(arrays[name]) for name in unsent)
    with np.load(tmp_path / "model.npz") as exported:
        for name in exported.files:
            np.testing.assert_array_equal(exported[name], arrays[name])
    # The mid-run evaluation scored the weights plus both replicas' unsent updates: the model
    # that an uncompressed run resumed from the step-10 checkpoint (which adds them) evaluates,
    # with no steps left to train.
    rewind_to(tmp_path / "checkpoints", 10)
    at_10 = run_recipe("translate", ARGS + [f"--data_dir={data_dir}", "--steps=10", "--resume"], tmp_path,
                       launcher="horovodrun")
    assert at_10.returncode == 0, at_10.output[-3000:]
    for key in ("test_loss", "test_token_accuracy"):
        assert at_10.summary()[key] == pytest.approx(mid_run_eval[key], rel=1e-5), key
