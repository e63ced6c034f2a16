"""SyncBatchNormalization under horovodrun -np 2, each rank holding part of every step's batch,
against one process's keras.layers.BatchNormalization on the whole batch: outputs, gradients
w.r.t. the inputs and the weights, and moving statistics (tests/e2e/sync_bn_script.py runs
the steps: two stacked layers, three steps, the last split unequally)."""
import numpy as np
import pytest

from scripts.launchers import REPO, run_script

pytestmark = pytest.mark.slow

SCRIPT = REPO / "tests" / "e2e" / "sync_bn_script.py"
# float32: the two kernels sum in different orders; a gradient that cancels to small values
# differs by up to about 1e-5 of its tensor's largest element (each is as close to a float64
# computation). float64 shows that the global statistics are the same computation.
TOLERANCES = {"float32": (1e-5, 2e-5), "float64": (1e-10, 1e-10)}  # rtol, atol / tensor's largest


def _run(out_dir, mode, launcher, processes=2):
    out_dir.mkdir()
    done = run_script(SCRIPT, [str(out_dir), mode], launcher=launcher, processes=processes, timeout=300)
    return done, out_dir


@pytest.fixture(scope="module")
def ranks_and_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync_bn")
    done, sync_dir = _run(root / "sync", "sync", "horovodrun")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    done, keras_dir = _run(root / "keras", "keras", "python")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    ranks = [dict(np.load(sync_dir / f"rank-{rank}.npz")) for rank in range(2)]
    return ranks, dict(np.load(keras_dir / "rank-0.npz"))


def _assert_close(actual, expected, name):
    rtol, relative_atol = TOLERANCES[name.split("/")[0]]
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=relative_atol * np.abs(expected).max(),
                               err_msg=name)


def _names(reference, kind):
    names = [name for name in reference if name.split("/")[1].startswith(kind)]
    assert len(names) >= 2 * len(("float32", "float64"))
    return names


@pytest.mark.parametrize("kind", ["outputs", "input_grad"])
def test_rows_of_the_ranks_together_are_the_whole_batch_normalised(ranks_and_reference, kind):
    ranks, reference = ranks_and_reference
    for name in _names(reference, kind):
        _assert_close(np.concatenate([rank[name] for rank in ranks]), reference[name], name)


def test_weight_gradients_summed_over_the_ranks_are_the_whole_batch_gradients(ranks_and_reference):
    ranks, reference = ranks_and_reference
    for name in _names(reference, "weight_grad"):
        _assert_close(ranks[0][name] + ranks[1][name], reference[name], name)
        assert not np.allclose(ranks[0][name], reference[name], rtol=1e-3), name  # a rank's share alone is not


def test_moving_statistics_are_the_whole_batch_ones_on_every_rank(ranks_and_reference):
    ranks, reference = ranks_and_reference
    for name in _names(reference, "moving_"):
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
        _assert_close(ranks[0][name], reference[name], name)


def test_a_group_of_mirrored_replicas_is_one_error_line_naming_the_fix(tmp_path):
    """Every rank raises it as it builds the layer; the launcher may stop a rank before it prints."""
    done, _ = _run(tmp_path / "bad", "bad_group", "horovodrun")
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if "error: " in line]
    assert done.returncode != 0
    assert errors and all("use keras.layers.BatchNormalization(synchronized=True)" in line
                          for line in errors), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
