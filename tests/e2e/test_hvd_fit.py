"""A Horovod Keras script on `common.hvd`: `model.fit` under horovodrun -np 2, global batch B
(B/2 per rank), trains as one process's `fit` with batch B, step by step."""
import json

import numpy as np
import pytest

from scripts.launchers import REPO, run_script

pytestmark = pytest.mark.slow

SCRIPT = REPO / "tests" / "e2e" / "hvd_fit_script.py"


class Run:
    """What one launch of the script wrote for each of its configurations."""

    def __init__(self, out_dir, processes):
        self.out_dir, self.processes = out_dir, processes

    def report(self, config: str) -> dict:
        return json.loads((self.out_dir / f"{config}.json").read_text())

    def losses(self, config: str) -> np.ndarray:
        return np.array(self.report(config)["step_losses"])

    def weights(self, config: str, rank: int = 0) -> list[np.ndarray]:
        with np.load(self.out_dir / f"{config}-rank{rank}.npz") as stored:
            return [stored[name] for name in sorted(stored.files, key=lambda name: int(name.split("_")[1]))]


def launch(tmp_path_factory, data_dir, configs, processes) -> Run:
    out_dir = tmp_path_factory.mktemp(f"hvd_fit_{processes}")
    done = run_script(SCRIPT, [f"--out_dir={out_dir}", f"--data_dir={data_dir}", f"--configs={configs}"],
                      launcher="python" if processes == 1 else "horovodrun", processes=processes)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return Run(out_dir, processes)


@pytest.fixture(scope="module")
def one(tmp_path_factory, data_dir):
    return launch(tmp_path_factory, data_dir, "plain,passes2", 1)  # first: it prepares the data


@pytest.fixture(scope="module")
def two(tmp_path_factory, data_dir, one):
    return launch(tmp_path_factory, data_dir, "plain,passes2,fp16", 2)


def assert_same_weights(weights, expected):
    assert len(weights) == len(expected) == 6
    for value, reference in zip(weights, expected):
        np.testing.assert_allclose(value, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", ["plain", "passes2"])
def test_two_processes_take_the_steps_of_one(one, two, config):
    losses, expected = two.losses(config), one.losses(config)
    assert len(losses) == len(expected) == 16
    np.testing.assert_allclose(losses, expected, rtol=1e-4)
    assert_same_weights(two.weights(config), one.weights(config))
    for value, other_rank in zip(two.weights(config), two.weights(config, rank=1)):
        np.testing.assert_array_equal(value, other_rank)  # broadcast from rank 0, then equal updates
    assert two.report(config)["iterations"] == one.report(config)["iterations"] == 16


def test_metric_average_callback_reports_the_global_metrics(one, two):
    history, expected = two.report("plain")["history"], one.report("plain")["history"]
    assert sorted(history) == sorted(expected) == ["accuracy", "loss"]
    for name in expected:
        np.testing.assert_allclose(history[name], expected[name], rtol=1e-4)


def test_accumulated_passes_update_every_second_call(one):
    """Half the updates of twice the batch: a training of its own, not the plain one."""
    assert not np.allclose(one.losses("passes2")[2:], one.losses("plain")[2:], rtol=1e-3)


def test_fp16_compression_trains_close_to_full_precision(one, two):
    losses, expected = two.losses("fp16"), one.losses("plain")
    np.testing.assert_allclose(losses, expected, rtol=1e-2)
    assert not np.array_equal(two.weights("fp16")[0], one.weights("plain")[0])  # float16 on the wire
