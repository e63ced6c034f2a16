"""recommend.py end to end on the Horovod data plan, as real processes (--debug): the run's
outputs, 2 processes against one, the sparse rows' bytes, --predict."""
import numpy as np
import pytest

from scripts.launchers import REPO, assert_same_training, one_process_run, run_recipe, run_script

pytestmark = pytest.mark.slow

DETERMINISTIC = ["--debug", "--deterministic", "--steps=40", "--log_every=2", "--checkpoint_every=20"]


@pytest.fixture(scope="module")
def two_processes(data_dir, tmp_path_factory):
    result = run_recipe("recommend", DETERMINISTIC + [f"--data_dir={data_dir}"], tmp_path_factory.mktemp("np2"),
                        launcher="horovodrun")
    assert result.returncode == 0, result.output[-3000:]
    return result


def test_writes_the_contract_outputs_and_reports_the_held_out_metrics(two_processes):
    out_dir = two_processes.out_dir
    for name in ("config.json", "metrics.jsonl", "summary.json", "model.npz"):
        assert (out_dir / name).is_file(), name
    summary = two_processes.summary()
    assert summary["world_size"] == 2 and summary["test_users"] == 60
    assert 0.5 < summary["test_rmse"] < 1.6, summary  # ratings run from 0.5 to 5
    assert 0 <= summary["test_recall_at_10"] <= 1 and 0 <= summary["test_ndcg_at_10"] <= 1
    assert f"test RMSE = {summary['test_rmse']:.4f} recall@10 = " in two_processes.output


def test_embedding_gradients_travel_as_rows_smaller_than_the_dense_tables(two_processes):
    summary = two_processes.summary()
    # 16 ratings per replica: 3 vector rows (user, item, sampled item) of 8 floats and 4 bias rows (user,
    # item, the item's and the sampled item's interest), each with an int32 index; the dense all-reduce
    # would send every table whole.
    assert summary["gradient_wire_bytes"] == 16 * (3 * (8 * 4 + 4) + 4 * (4 + 4)), summary
    assert summary["gradient_float32_bytes"] > 20 * summary["gradient_wire_bytes"], summary


def test_two_processes_train_exactly_like_one(two_processes, data_dir, tmp_path):
    reference = one_process_run("recommend", DETERMINISTIC + [f"--data_dir={data_dir}"], tmp_path)
    assert_same_training(two_processes, reference)
    for key in ("test_rmse", "test_recall_at_10", "test_ndcg_at_10"):
        assert two_processes.summary()[key] == pytest.approx(reference.summary()[key], rel=1e-4), key


def test_predict_prints_top_k_unseen_titles(two_processes, data_dir, tmp_path):
    done = run_script(REPO / "recipes" / "recommend.py",
                      ["--predict=1", "--top_k=5", f"--out_dir={two_processes.out_dir}", f"--data_dir={data_dir}"])
    assert done.returncode == 0, done.stderr[-3000:]
    titles = done.stdout.splitlines()
    assert len(titles) == 5 and len(set(titles)) == 5, done.stdout

    from common.data.movielens import load_ratings  # TensorFlow only now: collection stays fast
    ratings = load_ratings(data_dir=data_dir, dataset=None, debug=True)
    user = ratings.user_ids.index("1")
    rated = {ratings.titles[item] for item in ratings.train[1][ratings.train[0] == user]}
    assert set(titles) <= set(ratings.titles) and not set(titles) & rated


@pytest.mark.parametrize("args, message", [
    (["--predict=99999"], "is not among the 60 users"),
    (["--predict=1", "--out_dir={empty}"], "no finished run in"),
], ids=["unknown-user", "no-finished-run"])
def test_predict_bad_input_is_one_clear_line(args, message, two_processes, data_dir, tmp_path):
    args = [arg.format(empty=tmp_path) for arg in args]
    result = run_recipe("recommend", [f"--data_dir={data_dir}", *args], two_processes.out_dir, timeout=60)
    assert result.returncode != 0
    assert [line for line in result.error_lines() if message in line], result.output[-3000:]
    assert "Traceback" not in result.output, result.output[-3000:]
