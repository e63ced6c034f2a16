"""common.inference on one process: batches within a share, the finished-run check, the input
lines (tests/e2e/test_predict.py runs them on 2 processes and the tensor plan)."""
import pytest

from common import inference
from common.errors import RecipeError
from tests.unit.one_process import ONE_PROCESS


def test_a_share_runs_in_batches_of_the_given_size_and_comes_back_in_order():
    batches = []

    def doubled(batch):
        batches.append(list(batch))
        return [2 * row for row in batch]

    assert inference.gathered_outputs(ONE_PROCESS, doubled, list(range(7)), batch_size=2) == [0, 2, 4, 6, 8, 10, 12]
    assert batches == [[0, 1], [2, 3], [4, 5], [6]]


def test_no_rows_run_no_batch():
    def never(batch):
        raise AssertionError(f"called with {batch}")

    assert inference.gathered_outputs(ONE_PROCESS, never, [], batch_size=4) == []


def test_batch_size_zero_runs_the_whole_share_at_once():
    sizes = []
    inference.gathered_outputs(ONE_PROCESS, lambda batch: sizes.append(len(batch)) or list(batch), list(range(5)))
    assert sizes == [5]


def test_one_output_per_row_or_an_error():
    with pytest.raises(ValueError, match="gave 1 outputs for 3 rows"):
        inference.gathered_outputs(ONE_PROCESS, lambda batch: ["one"], [1, 2, 3])


def test_a_folder_without_a_finished_run_is_one_clear_error(tmp_path):
    (tmp_path / "model.npz").write_bytes(b"")  # a run that stopped before its summary
    with pytest.raises(RecipeError, match=f"^no finished model in {tmp_path} \\(model.npz and summary.json\\): "
                                          f"train first with --out_dir={tmp_path}$"):
        inference.finished_run(ONE_PROCESS, tmp_path)
    (tmp_path / "summary.json").write_text("{}")
    assert inference.finished_run(ONE_PROCESS, str(tmp_path)) == tmp_path


def test_the_chief_reads_the_lines_or_says_why_not(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("one\n\nthree\n")
    assert inference.chief_lines(ONE_PROCESS, str(path)) == ["one", "", "three"]
    with pytest.raises(RecipeError, match="--predict: cannot read .*missing.txt"):
        inference.chief_lines(ONE_PROCESS, str(tmp_path / "missing.txt"))
