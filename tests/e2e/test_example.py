"""The README's example of a user's own Keras model: 2 Horovod processes train it exactly like one."""
import pytest

from scripts.launchers import assert_same_training, one_process_run, run_recipe

pytestmark = pytest.mark.slow

EXAMPLE = "examples/keras_model.py"
ARGS = ["--debug", "--deterministic", "--steps=20", "--log_every=1", "--checkpoint_every=0", "--global_batch_size=32"]


def test_the_readme_example_trains_exactly_like_one_process(data_dir, tmp_path):
    args = ARGS + [f"--data_dir={data_dir}"]
    reference = one_process_run(EXAMPLE, args, tmp_path / "single")
    result = run_recipe(EXAMPLE, args, tmp_path / "two", launcher="horovodrun", processes=2)
    assert_same_training(result, reference)
    assert result.metrics()[0]["world_size"] == 2
    for key in ("test_accuracy", "test_loss"):  # scored by both ranks together
        assert result.summary()[key] == pytest.approx(reference.summary()[key], rel=1e-4)
    assert (result.out_dir / "model.npz").exists() and "test accuracy" in result.output
