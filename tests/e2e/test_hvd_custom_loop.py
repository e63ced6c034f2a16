"""Horovod's TF2 custom loop on `common.hvd` under horovodrun -np 2: the model and optimizer
broadcasts inside the first traced step go through (they once stalled the ranks), and both
ranks end with the same variables."""
import numpy as np
import pytest

from scripts.launchers import REPO, run_script

pytestmark = pytest.mark.slow

SCRIPT = REPO / "tests" / "e2e" / "hvd_custom_loop_script.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, data_dir):
    out_dir = tmp_path_factory.mktemp("hvd_custom_loop")
    done = run_script(SCRIPT, [f"--out_dir={out_dir}", f"--data_dir={data_dir}"], launcher="horovodrun",
                      processes=2, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return [dict(np.load(out_dir / f"rank{rank}.npz")) for rank in (0, 1)]


def test_ranks_start_from_their_own_weights(ranks):
    assert not np.array_equal(ranks[0]["initial"], ranks[1]["initial"])


def test_broadcast_in_the_first_traced_step_leaves_both_ranks_equal(ranks):
    finals = [sorted(name for name in rank if name.startswith("final_")) for rank in ranks]
    assert finals[0] == finals[1] and len(finals[0]) > 10
    for name in finals[0]:
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
