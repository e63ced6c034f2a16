"""Compressed gradients end to end: translate.py under horovodrun -np 2 (--debug)."""
import numpy as np
import pytest

from common import checkpoint
from scripts.launchers import rewind_to, run_recipe

pytestmark = pytest.mark.slow

# Few test sentences: these runs are about training, and decoding would dominate their time.
ARGS = ["--debug", "--deterministic", "--steps=20", "--log_every=1", "--checkpoint_every=0",
        "--max_test=8", "--samples=0"]


def train(compression, data_dir, out_dir, extra=()):
    result = run_recipe("translate", ARGS + [f"--data_dir={data_dir}", f"--compression={compression}", *extra],
                        out_dir, launcher="horovodrun")
    assert result.returncode == 0, result.output[-3000:]
    assert len(result.losses()) == 20
    return result


@pytest.fixture(scope="module")
def uncompressed(data_dir, tmp_path_factory):
    return train("none", data_dir, tmp_path_factory.mktemp("none"))


def test_fp16_trains_like_float32_on_half_the_bytes(uncompressed, data_dir, tmp_path):
    result = train("fp16", data_dir, tmp_path)
    np.testing.assert_allclose(result.losses(), uncompressed.losses(), rtol=1e-2)
    summary = result.summary()
    assert summary["gradient_wire_bytes"] * 2 == summary["gradient_float32_bytes"]


@pytest.mark.parametrize("compression, smaller", [("topk:0.05", 8), ("powersgd:2", 3), ("topk_updates:0.05", 8)])
def test_lossy_compression_with_error_feedback_trains_on_fewer_bytes(compression, smaller, uncompressed, data_dir,
                                                                       tmp_path):
    result = train(compression, data_dir, tmp_path)
    losses = result.losses()
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses
    # Compression is on: fewer bytes, and training that differs from the float32 run's.
    summary = result.summary()
    assert summary["gradient_float32_bytes"] / summary["gradient_wire_bytes"] > smaller, summary
    assert np.abs(np.array(losses) - uncompressed.losses()).max() > 1e-3


def test_pipeline_stages_share_named_collectives_under_lossy_compression(data_dir, tmp_path):
    # The stages trace different graphs (different variables, and top-k adds ops per variable):
    # gradient clipping's norm, summed over the stages, is a collective they must name alike.
    args = ["--debug", "--deterministic", "--steps=10", "--log_every=1", "--checkpoint_every=0", "--max_test=4",
            f"--data_dir={data_dir}", "--plan=pipeline=2,microbatches=2", "--compression=topk:0.05", "--clip_norm=0.5"]
    result = run_recipe("summarize", args, tmp_path, launcher="horovodrun", timeout=300)
    assert result.returncode == 0, result.output[-3000:]
    assert len(result.losses()) == 10


@pytest.mark.parametrize("compression", ["topk:0.05", "topk_updates:0.05"])
def test_resume_keeps_what_each_replica_had_not_yet_sent(compression, data_dir, tmp_path):
    # Each replica's residuals (and, compressing updates, its own optimizer moments) are in the
    # checkpoint: steps 11-20 after a resume match the uninterrupted run.
    first = train(compression, data_dir, tmp_path, ["--checkpoint_every=10"])
    _, arrays = checkpoint.load(tmp_path / "checkpoints")
    kind = "unsent_updates" if "updates" in compression else "unsent_gradients"
    assert any(name.startswith(f"per_replica/1/{kind}/") and np.any(arrays[name]) for name in arrays)
    rewind_to(tmp_path / "checkpoints", 10)
    resumed = train(compression, data_dir, tmp_path, ["--checkpoint_every=10", "--resume"])
    np.testing.assert_allclose(resumed.losses()[10:], first.losses()[10:], rtol=1e-4)


def test_a_compressed_checkpoint_resumed_without_its_compression_is_one_clear_error(data_dir, tmp_path):
    train("topk:0.05", data_dir, tmp_path, ["--checkpoint_every=10"])
    rewind_to(tmp_path / "checkpoints", 10)
    result = run_recipe("translate", ARGS + [f"--data_dir={data_dir}", "--resume"], tmp_path,
                        launcher="horovodrun", timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.output
    assert any("holds state of each of its 2 data-parallel replicas (unsent_gradients)" in line
               for line in result.error_lines()), result.output[-3000:]
