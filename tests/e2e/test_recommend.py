"""recommend.py end to end on the Horovod data plan, as real processes (--debug): the run's
outputs, 2 processes against one, the sparse rows' bytes, --predict; and the SavedModel export
of that run and of a --plan=ps run, served by stock TensorFlow alone."""

import numpy as np
import pytest

from scripts.launchers import REPO, assert_same_training, one_process_run, run_recipe, run_script
from tests.e2e.test_export import served_outputs

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
    (["--predict=1", "--out_dir={empty}"], "no finished model in"),
], ids=["unknown-user", "no-finished-run"])
def test_predict_bad_input_is_one_clear_line(args, message, two_processes, data_dir, tmp_path):
    args = [arg.format(empty=tmp_path) for arg in args]
    result = run_recipe("recommend", [f"--data_dir={data_dir}", *args], two_processes.out_dir, timeout=60)
    assert result.returncode != 0
    assert [line for line in result.error_lines() if message in line], result.output[-3000:]
    assert "Traceback" not in result.output, result.output[-3000:]


@pytest.fixture(scope="module")
def exported_runs(two_processes, data_dir, tmp_path_factory):
    """The data-plan run and a parameter-server run, each with its saved_model/."""
    ps_run = run_recipe("recommend", ["--debug", "--plan=ps,workers=2,servers=2", f"--data_dir={data_dir}"],
                        tmp_path_factory.mktemp("ps"))
    assert ps_run.returncode == 0, ps_run.output[-3000:]
    return {"data2": two_processes, "ps": ps_run}


@pytest.fixture(scope="module")
def ratings(data_dir):
    from common.data.movielens import load_ratings  # TensorFlow only now: collection stays fast
    return load_ratings(data_dir=data_dir, dataset=None, debug=True)


@pytest.fixture(scope="module")
def served(exported_runs, ratings, tmp_path_factory):
    """{(run, signature): outputs} of each export, from one fresh `python -I` process: the
    predicted ratings of the held-out pairs, and every user's recommendations."""
    folder = tmp_path_factory.mktemp("served")
    users, items, _ = ratings.test
    inputs = {"predict_rating": {"users": users, "items": items},
              "recommend": {"users": np.arange(ratings.num_users, dtype=np.int32)}}
    return served_outputs(folder, {(name, signature): (result.out_dir, arrays)
                                   for name, result in exported_runs.items() for signature, arrays in inputs.items()})


@pytest.mark.parametrize("name", ["data2", "ps"])
def test_the_export_predicts_the_held_out_ratings_of_the_run(name, exported_runs, served, ratings):
    predicted = served[name, "predict_rating"]["ratings"].astype(np.float64)
    rmse = np.sqrt(np.mean((predicted - ratings.test[2]) ** 2))
    assert rmse == pytest.approx(exported_runs[name].summary()["test_rmse"], abs=1e-5)


@pytest.mark.parametrize("name", ["data2", "ps"])
def test_the_export_recommends_what_predict_prints(name, exported_runs, served, ratings, data_dir):
    done = run_script(REPO / "recipes" / "recommend.py",
                      ["--predict=1", f"--out_dir={exported_runs[name].out_dir}", f"--data_dir={data_dir}"])
    assert done.returncode == 0, done.stderr[-3000:]
    recommended, user = served[name, "recommend"], ratings.user_ids.index("1")
    titles = [title.decode() for title in recommended["titles"][user]]
    assert titles == done.stdout.splitlines() == [ratings.titles[item] for item in recommended["items"][user]]
    assert len(titles) == 10 and np.all(np.diff(recommended["scores"][user]) <= 0)


@pytest.mark.parametrize("name", ["data2", "ps"])
def test_the_export_ranks_every_user_as_the_recall_at_k_does(name, exported_runs, served, ratings):
    """The movies each user rated in training are left out: unmasked, many would rank in the top 10."""
    from common import api
    from common.models.recommender import by_user, top_unseen
    from recipes.recommend import RecommendConfig, trained_model
    out_dir = exported_runs[name].out_dir
    model = trained_model(api.load_saved(RecommendConfig, out_dir), ratings, out_dir)
    interests = np.asarray(model.all_scores(np.arange(ratings.num_users, dtype=np.int32))[1])
    seen = by_user(ratings.num_users, ratings.train[0], ratings.train[1])
    expected = [top_unseen(row, items, 10) for row, (items,) in zip(interests, seen)]
    np.testing.assert_array_equal(served[name, "recommend"]["items"], expected)
    assert sum(np.isin(np.argsort(-row)[:10], items).sum() for row, (items,) in zip(interests, seen)) > 0
