"""language_model.py end to end: all three parallel axes at once train exactly like one process,
so does block recomputation, bfloat16 compute trains, and a missing text package is one line."""
import math

import numpy as np
import pytest

from scripts.launchers import assert_same_training, one_process_run, run_recipe

pytestmark = pytest.mark.slow

DETERMINISTIC = ["--debug", "--deterministic", "--steps=20", "--log_every=1", "--checkpoint_every=0",
                 "--global_batch_size=16"]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    return one_process_run("language_model", DETERMINISTIC + [f"--data_dir={data_dir}"],
                           tmp_path_factory.mktemp("single"))


def assert_same_evaluation(result, reference):
    """The same held-out perplexity, and the same sampled text (the draws are seeded)."""
    summary, expected = result.summary(), reference.summary()
    assert summary["test_perplexity"] == pytest.approx(expected["test_perplexity"], rel=1e-4)
    assert [s["continuation"] for s in summary["samples"]] == [s["continuation"] for s in expected["samples"]]


@pytest.mark.parametrize("processes, plan", [
    # 8 processes on a 2-core machine: slow when it is busy.
    pytest.param(8, "data=2,tensor=2,pipeline=2,microbatches=2,schedule=1f1b", marks=pytest.mark.timeout(1200)),
    (2, "tensor=2,recompute"),
], ids=["data2-tensor2-pipeline2", "tensor2-recompute"])
def test_plans_train_exactly_like_one_process(processes, plan, reference, data_dir, tmp_path):
    result = run_recipe("language_model", DETERMINISTIC + [f"--data_dir={data_dir}", f"--plan={plan}"], tmp_path,
                        launcher="horovodrun", processes=processes, timeout=900)
    assert_same_training(result, reference)
    assert_same_evaluation(result, reference)


def test_one_process_run_reports_perplexity_baselines_and_samples(reference):
    summary = reference.summary()
    assert math.exp(summary["test_loss"]) == pytest.approx(summary["test_perplexity"])
    assert summary["test_tokens"] > 5000
    # On the same tokens, counting pairs beats counting tokens (the baselines are real models).
    assert 1 < summary["bigram_perplexity"] < summary["unigram_perplexity"] < 500
    assert len(summary["samples"]) == 2 and all(s["prompt"] and s["continuation"] for s in summary["samples"])
    assert "held-out perplexity" in reference.output and "PROMPT" in reference.output
    assert (reference.out_dir / "model.npz").exists() and (reference.out_dir / "subword.model").exists()


def test_bfloat16_compute_trains_like_float32(reference, data_dir, tmp_path):
    result = run_recipe("language_model", DETERMINISTIC + [f"--data_dir={data_dir}", "--plan=tensor=2",
                                                          "--precision=bf16"], tmp_path, launcher="horovodrun")
    assert result.returncode == 0, result.output[-3000:]
    losses, expected = np.array(result.losses()), np.array(reference.losses())
    assert losses[-1] < losses[0] - 0.3  # it learns
    np.testing.assert_allclose(losses, expected, rtol=0.02)  # bfloat16 keeps about 3 significant digits
    # Further from float32 than any plan's reduction order takes it (1e-5): it computed in bfloat16.
    assert np.max(np.abs(losses / expected - 1)) > 1e-5
    assert result.summary()["test_perplexity"] == pytest.approx(reference.summary()["test_perplexity"], rel=0.05)


def test_a_missing_text_package_is_one_line_on_every_rank(data_dir, tmp_path):
    result = run_recipe("language_model", ["--debug", f"--data_dir={data_dir}", f"--source_path={tmp_path}/none"],
                        tmp_path, launcher="horovodrun", timeout=120)
    # Checked before TensorFlow loads: the time is horovodrun's own start.
    assert result.returncode != 0 and result.seconds < 60
    # One line per rank (horovodrun may print two ranks' lines on one).
    assert result.output.count("error: King James Bible text not found") == 2, result.output[-3000:]
    assert all("apt-get install bible-kjv-text" in line for line in result.error_lines())
    assert "Traceback" not in result.output
