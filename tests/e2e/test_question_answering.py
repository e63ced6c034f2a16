"""question_answering.py end to end, as real processes under python and horovodrun (--debug)."""
import pytest

from scripts.launchers import assert_same_training, one_process_run, run_recipe

pytestmark = pytest.mark.slow

DETERMINISTIC = ["--debug", "--deterministic", "--steps=20", "--log_every=1", "--checkpoint_every=0",
                 "--global_batch_size=16"]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    return one_process_run("question_answering", DETERMINISTIC + [f"--data_dir={data_dir}"],
                           tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("plan, replicas", [("data", 2), ("tensor=2", 1)], ids=["data2", "tensor2"])
def test_every_plan_trains_exactly_like_one_process(plan, replicas, reference, data_dir, tmp_path):
    result = run_recipe("question_answering", DETERMINISTIC + [f"--data_dir={data_dir}", f"--plan={plan}"], tmp_path,
                        launcher="horovodrun")
    assert_same_training(result, reference)
    summary, expected = result.summary(), reference.summary()
    assert summary["world_size"] == replicas
    assert summary["f1"] == pytest.approx(expected["f1"], abs=2)
    if plan == "tensor=2":
        # The split blocks and embedding hold most weights; norms, positions and the span head are whole.
        assert 0.5 < summary["parameters_on_chief"] / expected["parameters_on_chief"] < 0.7


def test_one_process_run_reports_exact_match_and_f1_beside_the_baseline(reference):
    summary = reference.summary()
    assert summary["test_questions"] == 64 and len(summary["samples"]) == 10
    for key in ("exact_match", "f1", "baseline_exact_match", "baseline_f1"):
        assert 0 <= summary[key] <= 100
    assert summary["f1"] >= summary["exact_match"] and summary["baseline_f1"] > 0
    assert {"step", "loss", "examples_per_sec", "world_size"} <= set(reference.metrics()[0])
    out = reference.out_dir
    assert (out / "config.json").exists() and (out / "model.npz").exists() and (out / "subword.model").exists()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert f"exact match = {summary['exact_match']:.2f}, F1 = {summary['f1']:.2f}" in reference.output
    sample = summary["samples"][0]
    assert sample["prediction"] in sample["passage"]  # an extractive answer is a span of the passage


def test_the_exported_model_reloads_and_answers_as_the_run_reported(reference, data_dir):
    # TensorFlow only now: collection stays fast.
    from common.data.qa import load_qa
    from common.metrics import squad_scores
    from recipes.question_answering import answerer, load_trained
    model, tokenizer = load_trained(str(reference.out_dir))
    data = load_qa(data_dir=data_dir, dataset=None, debug=True, max_len=96, max_question_len=32, vocab_size=500,
                   max_test=64)
    assert tokenizer.vocab_size == data.tokenizer.vocab_size
    predictions = answerer(model, data, max_answer_len=8)(list(range(64)))
    summary = reference.summary()
    assert predictions[:10] == [sample["prediction"] for sample in summary["samples"]]
    scores = squad_scores(predictions, [question.answers for question in data.test_questions])
    assert scores["f1"] == pytest.approx(summary["f1"], abs=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--wordnet_dir=/nonexistent/wordnet"], "install the Debian package wordnet-base (apt-get install wordnet-base)"),
    (["--dataset=squad", "--data_dir={empty}"], "TFDS dataset 'squad' is not prepared"),
], ids=["missing-package", "unprepared-squad"])
def test_bad_input_fails_fast_on_every_rank(args, message, data_dir, tmp_path):
    empty = tmp_path / "empty_tfds"
    empty.mkdir()
    argv = ["--debug", f"--data_dir={data_dir}"] + [arg.format(empty=empty) for arg in args]
    result = run_recipe("question_answering", argv, tmp_path, launcher="horovodrun", timeout=300)
    assert result.returncode != 0
    assert result.seconds < 60, f"took {result.seconds:.0f} s"
    # Each rank finds the fault by itself; the launcher may stop one before it prints.
    errors = [line for line in result.error_lines() if message in line]
    assert errors, result.output[-3000:]
    assert "Traceback" not in result.output, result.output[-3000:]
