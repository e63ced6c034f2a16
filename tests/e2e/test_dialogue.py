"""dialogue.py end to end, as real processes (--debug): both plans train exactly like one
process, the run's outputs, --chat driven through a pipe, and bad input on every rank."""
import math
import subprocess
import time

import numpy as np
import pytest

from scripts.launchers import REPO, assert_same_training, command, launch_env, one_process_run, run_recipe, run_script

pytestmark = pytest.mark.slow

DETERMINISTIC = ["--debug", "--deterministic", "--steps=20", "--log_every=1", "--checkpoint_every=0",
                 "--global_batch_size=16"]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    return one_process_run("dialogue", DETERMINISTIC + [f"--data_dir={data_dir}"], tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("plan", ["data", "tensor=2"])
def test_each_plan_on_two_processes_trains_exactly_like_one(plan, reference, data_dir, tmp_path):
    result = run_recipe("dialogue", DETERMINISTIC + [f"--data_dir={data_dir}", f"--plan={plan}"], tmp_path,
                        launcher="horovodrun")
    assert_same_training(result, reference)
    summary, expected = result.summary(), reference.summary()
    assert summary["test_perplexity"] == pytest.approx(expected["test_perplexity"], rel=1e-4)
    assert [s["reply"] for s in summary["samples"]] == [s["reply"] for s in expected["samples"]]


def test_the_run_reports_held_out_perplexity_beside_the_unigram_baseline(reference):
    summary = reference.summary()
    for name in ("config.json", "metrics.jsonl", "model.npz", "subword.model", "saved_model"):
        assert (reference.out_dir / name).exists(), name
    assert summary["test_pairs"] == 64 and summary["test_response_tokens"] > 64
    assert summary["test_perplexity"] == pytest.approx(math.exp(summary["test_loss"]))
    # Add-one counts over a 500-piece vocabulary: the unigram lies between 1 and the vocabulary.
    assert 10 < summary["unigram_perplexity"] < 500 and 1 < summary["bigram_perplexity"] < 500
    assert (f"held-out perplexity {summary['test_perplexity']:.1f} (unigram {summary['unigram_perplexity']:.1f}, "
            f"bigram {summary['bigram_perplexity']:.1f})") in reference.output
    sample = summary["samples"][0]
    assert len(summary["samples"]) == 2 and sample["context"] and sample["reference"]
    assert f"  REF {sample['reference']}\n  OUT {sample['reply']}" in reference.output


def expected_replies(out_dir, conversation: list[str]) -> list[str]:
    """The greedy reply of the run's model to each turn of `conversation`, each given the last
    turns before it (its own replies too, the non-empty ones), as --chat must answer."""
    from common.data.chitchat import CONTEXT_TURNS, context_row  # TensorFlow only now: collection stays fast
    from common.models.transformer import greedy_decode
    from recipes.dialogue import load_trained
    lm, tokenizer = load_trained(str(out_dir))
    history, replies = [], []
    for turn in conversation:
        history = (history + [turn])[-CONTEXT_TURNS:]
        row = np.array([context_row(tokenizer, history, lm.source_len)], np.int32)
        ids = greedy_decode(lambda batch, head: head(lm(batch)), lm.group, row, lm.size.max_len - lm.source_len,
                            tokenizer.bos_id, tokenizer.eos_id)[0]
        replies.append(tokenizer.decode(ids))
        history = (history + [replies[-1]])[-CONTEXT_TURNS:] if replies[-1].strip() else history
    return replies


def test_chat_answers_each_line_of_a_pipe_from_the_recent_turns(reference):
    conversation = ["hi there!", "what do you do for fun?", "I like hiking in the mountains", "cool"]
    lines = conversation + ["", conversation[0]]  # an empty line starts a new conversation
    done = subprocess.run(command("python", 1) + [str(REPO / "recipes" / "dialogue.py"), "--chat",
                                                  f"--out_dir={reference.out_dir}", "--intra_op_threads=1"],
                          cwd=REPO, env=launch_env(), input="\n".join(lines) + "\n", capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    replies = done.stdout.split("\n")[:-1]
    expected = expected_replies(reference.out_dir, conversation)
    assert replies == expected + expected[:1], done.stdout


@pytest.mark.parametrize("args, launcher, message", [
    (["--chat"], "horovodrun", "--chat reads standard input on one process, not 2"),
    (["--chat", "--out_dir={empty}"], "python", "no finished model in"),
], ids=["chat-on-two-processes", "chat-without-a-run"])
def test_chat_bad_input_is_one_clear_line(args, launcher, message, reference, tmp_path):
    args = [arg.format(empty=tmp_path) for arg in args]
    result = run_recipe("dialogue", args, reference.out_dir, launcher=launcher, timeout=120)
    assert result.returncode != 0 and result.seconds < 120, result.output[-3000:]
    # Counted in the whole output: horovodrun may print two ranks' lines as one.
    assert result.output.count(message) == (2 if launcher == "horovodrun" else 1), result.output[-3000:]
    assert "Traceback" not in result.output, result.output[-3000:]


def test_a_missing_chitchat_package_is_one_line_naming_the_install_on_every_rank(tmp_path):
    """The package is really hidden: a folder first on the path holds a chitchat_dataset that
    fails to import, as an absent one does."""
    shadow = tmp_path / "shadow" / "chitchat_dataset"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("No module named \'chitchat_dataset\'")\n')
    start = time.perf_counter()
    done = run_script(REPO / "recipes" / "dialogue.py",
                      ["--debug", f"--data_dir={tmp_path / 'tfds'}", f"--out_dir={tmp_path / 'out'}",
                       "--intra_op_threads=1"], launcher="horovodrun", timeout=300,
                      env=launch_env(PYTHONPATH=f"{shadow.parent}:{REPO}"))
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    assert done.returncode != 0 and seconds < 120, output[-3000:]
    assert output.count("pip install chitchat-dataset") == 2 and "Traceback" not in output, output[-3000:]
