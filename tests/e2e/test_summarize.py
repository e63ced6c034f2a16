"""summarize.py end to end: every model-parallel plan trains exactly like one process."""
import pytest

from scripts.launchers import assert_same_training, one_process_run, run_recipe

pytestmark = pytest.mark.slow

DETERMINISTIC = ["--debug", "--deterministic", "--steps=20", "--log_every=1", "--checkpoint_every=0",
                 "--global_batch_size=16", "--max_test=16"]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    return one_process_run("summarize", DETERMINISTIC + [f"--data_dir={data_dir}"], tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("processes, plan", [
    (2, "pipeline=2,microbatches=4,schedule=gpipe"),
    (2, "pipeline=2,microbatches=4,schedule=1f1b,recompute=true"),
    (2, "tensor=2"),
    (4, "data=2,pipeline=2,microbatches=2,schedule=1f1b"),
    (4, "tensor=2,pipeline=2,microbatches=2"),
], ids=["pipeline2-gpipe", "pipeline2-1f1b-recompute", "tensor2", "data2-pipeline2", "tensor2-pipeline2"])
def test_model_parallel_plans_train_exactly_like_one_process(processes, plan, reference, data_dir, tmp_path):
    result = run_recipe("summarize", DETERMINISTIC + [f"--data_dir={data_dir}", f"--plan={plan}"], tmp_path,
                        launcher="horovodrun", processes=processes)
    assert_same_training(result, reference)
    # Distributed inference through the same plan decodes the same summaries.
    assert [s["summary"] for s in result.summary()["samples"]] == \
        [s["summary"] for s in reference.summary()["samples"]]


def test_one_process_run_reports_rouge(reference):
    summary = reference.summary()
    assert {"rouge1", "rouge2", "rougeL"} <= set(summary) and summary["test_documents"] == 16
    assert (reference.out_dir / "model.npz").exists() and (reference.out_dir / "subword.model").exists()


@pytest.mark.parametrize("args, message", [
    (["--plan=pipeline=3"], "needs a multiple of 3 processes"),
    (["--plan=pipeline=2", "--layers=1"], "pipeline=2 needs at least 2 layers"),
    (["--plan=pipeline=2,microbatches=3"], "do not split into microbatches=3"),
], ids=["world-size", "more-stages-than-layers", "microbatches-do-not-divide"])
def test_plans_that_do_not_fit_fail_before_any_collective(args, message, data_dir, tmp_path):
    result = run_recipe("summarize", ["--debug", f"--data_dir={data_dir}", *args], tmp_path,
                        launcher="horovodrun", timeout=120)
    assert result.returncode != 0 and result.seconds < 30
    assert any(message in line for line in result.error_lines()), result.output[-3000:]
    assert "Traceback" not in result.output
