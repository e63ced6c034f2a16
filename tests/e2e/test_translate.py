"""translate.py end to end, as real processes under python, horovodrun and mpirun (--debug)."""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from scripts.launchers import (assert_same_training, command, launch_env, one_process_run, rewind_to,
                               run_recipe, run_script, Result, BIN, REPO)

pytestmark = pytest.mark.slow

DETERMINISTIC = ["--debug", "--deterministic", "--steps=20", "--log_every=1", "--checkpoint_every=0",
                 "--global_batch_size=16"]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    return one_process_run("translate", DETERMINISTIC + [f"--data_dir={data_dir}"], tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("launcher, processes, extra, replicas", [
    ("horovodrun", 2, [], 2),
    ("horovodrun-gloo", 2, ["--accum_steps=2", "--allreduce=per_tensor"], 2),
    ("python", 1, ["--backend=mirrored", "--mirrored_devices=2"], 2),
    ("horovodrun", 2, ["--plan=tensor=2"], 1),
    ("horovodrun", 4, ["--plan=data=2,tensor=2"], 2),
], ids=["horovodrun-np2", "gloo-np2-accum2-per-tensor", "mirrored-2dev", "tensor2", "data2-tensor2"])
def test_every_plan_trains_exactly_like_one_process(launcher, processes, extra, replicas, reference, data_dir,
                                                    tmp_path):
    result = run_recipe("translate", DETERMINISTIC + [f"--data_dir={data_dir}"] + extra, tmp_path,
                        launcher=launcher, processes=processes)
    assert_same_training(result, reference)
    assert result.metrics()[0]["world_size"] == replicas
    assert result.summary()["bleu"] == pytest.approx(reference.summary()["bleu"], abs=0.5)
    if "tensor=2" in " ".join(extra):
        # Each rank holds about half of the weights: all but norms, positions and row biases are split.
        held = result.summary()["parameters_on_chief"] / reference.summary()["parameters_on_chief"]
        assert 0.5 < held < 0.55, held


def test_one_process_run_writes_the_recipe_outputs(reference):
    summary = reference.summary()
    assert summary["test_sentences"] == 64 and len(summary["samples"]) == 10
    assert summary["steady_examples_per_sec"] > 0 and summary["steady_tokens_per_sec"] > 0
    first = reference.metrics()[0]
    assert {"step", "loss", "examples_per_sec", "tokens_per_sec", "world_size"} <= set(first)
    out = reference.out_dir
    assert (out / "config.json").exists() and (out / "model.npz").exists()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert f"BLEU = {summary['bleu']:.2f}, chrF = {summary['chrf']:.2f}" in reference.output
    assert summary["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0")


def test_the_exported_model_reloads_and_translates_as_the_run_reported(reference, data_dir):
    # TensorFlow only now: collection stays fast.
    from common.data.seq2seq import load_translation
    from common.metrics import bleu
    from common.models.transformer import greedy_decode
    from recipes.translate import load_trained
    model, tokenizer = load_trained(str(reference.out_dir))
    data = load_translation(data_dir=data_dir, dataset=None, debug=True, max_len=16, vocab_size=500, corpus="bible")
    decoded = greedy_decode(lambda batch, head: head(model(batch)), model.group, data.test_src[:64], 16,
                            tokenizer.bos_id, tokenizer.eos_id)
    hypotheses = [tokenizer.decode(ids) for ids in decoded]
    summary = reference.summary()
    assert hypotheses[:10] == [sample["translation"] for sample in summary["samples"]]
    assert bleu(hypotheses, data.test_tgt_text[:64])["bleu"] == pytest.approx(summary["bleu"], abs=1e-9)


def test_mpirun_trains_exactly_like_one_process(reference, data_dir, tmp_path):
    result = run_recipe("translate", DETERMINISTIC + [f"--data_dir={data_dir}"], tmp_path, launcher="mpirun")
    assert_same_training(result, reference)
    assert result.summary()["world_size"] == 2


@pytest.mark.parametrize("first_plan, resumed_plan", [("data", "data"), ("tensor=2", "data")],
                         ids=["same-plan", "tensor2-to-data2"])
def test_resume_continues_the_same_run(first_plan, resumed_plan, reference, data_dir, tmp_path):
    args = DETERMINISTIC + [f"--data_dir={data_dir}", "--checkpoint_every=10"]
    first = run_recipe("translate", args + [f"--plan={first_plan}"], tmp_path, launcher="horovodrun")
    assert first.returncode == 0, first.output[-3000:]
    rewind_to(tmp_path / "checkpoints", 10)
    resumed = run_recipe("translate", args + [f"--plan={resumed_plan}", "--resume"], tmp_path,
                         launcher="horovodrun")
    assert resumed.returncode == 0, resumed.output[-3000:]
    # Weights, optimizer state and the data position all come back, whatever plan wrote
    # the checkpoint (it holds full tensors): steps 11-20 match the uninterrupted run.
    assert [m["step"] for m in resumed.metrics()][:11] == list(range(1, 12))
    np.testing.assert_allclose(resumed.losses()[10:], reference.losses()[10:], rtol=1e-4)


def writer_of(path, job, timeout=180):
    """The pid of the process that opens `path` to write, once one does (while `job` runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.poll() is None:
        for fd_dir in Path("/proc").glob("[0-9]*/fd"):
            if fd_dir.parent.name == str(os.getpid()):  # the test's own end of the pipe
                continue
            try:
                if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                    return int(fd_dir.parent.name)
            except OSError:  # a process that ended meanwhile
                continue
        time.sleep(0.2)
    raise AssertionError(f"nothing opened {path}: {job.poll()=}")


def test_a_kill_during_a_checkpoint_write_resumes_from_the_one_before(reference, data_dir, tmp_path):
    args = DETERMINISTIC + [f"--data_dir={data_dir}", "--checkpoint_every=5"]
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    # The step-15 checkpoint is written into a pipe: the chief blocks mid-write once the pipe
    # is full, and is killed there, its file half written.
    pipe = ckpt_dir / ".ckpt-00000015.npz.tmp"
    os.mkfifo(pipe)
    reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
    job = subprocess.Popen(command("horovodrun", 2) + [str(REPO / "recipes/translate.py"), *args,
                                                        f"--out_dir={tmp_path}", "--intra_op_threads=1"],
                           cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, text=True)
    try:
        chief = writer_of(pipe, job)
        time.sleep(2)
        written = os.read(reader, 4096)  # the write has begun, and blocks on the full pipe
        os.kill(chief, signal.SIGKILL)
        output = job.communicate(timeout=60)[0]
    finally:
        job.kill()
        os.close(reader)
    assert job.returncode != 0 and written, output[-3000:]
    pipe.unlink()
    pipe.write_bytes(written)  # what a killed writer leaves in a real file: its first bytes
    assert json.loads((ckpt_dir / "latest.json").read_text())["step"] == 10
    resumed = run_recipe("translate", args + ["--resume"], tmp_path, launcher="horovodrun")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert [m["step"] for m in resumed.metrics()][:11] == list(range(1, 12))
    np.testing.assert_allclose(resumed.losses(), reference.losses(), rtol=1e-4)
    assert not list(ckpt_dir.glob(".*.tmp"))


# ------------------------------------------------------------------------ bad input, 2 ranks
def corrupted_checkpoint(reference, tmp_path):
    shutil.copytree(reference.out_dir / "checkpoints", tmp_path / "checkpoints")
    path = sorted((tmp_path / "checkpoints").glob("ckpt-*.npz"))[-1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return ["--resume"]


@pytest.mark.parametrize("args, message", [
    (["--bogus=1"], "unknown flag --bogus"),
    (["--global_batch_size=15"], "does not divide into 2 data-parallel ranks"),
    (["--corpus=freedict", "--freedict_file=/nonexistent/freedict-eng-deu.dict.dz"],
     "install the Debian package dict-freedict-eng-deu"),
    (["--corpus=wmt"], "--corpus must be one of bible, freedict"),
    (["--beam=0"], "--beam must be >= 1"),
    (["--dataset=wmt14_translate/de-en", "--data_dir={empty}"], "is not prepared"),
    ([corrupted_checkpoint], "is corrupt"),
    (["--plan=tensor=3"], "needs a multiple of 3 processes"),
    (["--plan=tensor=2", "--heads=3", "--d_model=48"], "--plan: tensor=2 does not divide the attention heads (3)"),
    (["--elastic"], "--elastic runs under horovodrun's elastic mode"),
], ids=["unknown-flag", "batch-not-divisible", "missing-freedict", "unknown-corpus", "no-beam", "unprepared-tfds", "corrupt-checkpoint",
        "plan-does-not-fit", "heads-do-not-split", "elastic-without-elastic-launch"])
def test_bad_input_fails_fast_on_every_rank(args, message, reference, data_dir, tmp_path):
    empty = tmp_path / "empty_tfds"
    empty.mkdir()
    argv = ["--debug", f"--data_dir={data_dir}"]
    for arg in args:
        argv += arg(reference, tmp_path) if callable(arg) else [arg.format(empty=empty)]
    result = run_recipe("translate", argv, tmp_path, launcher="horovodrun", timeout=120)
    assert result.returncode != 0
    assert result.seconds < 30, f"took {result.seconds:.0f} s"
    errors = [line for line in result.error_lines() if message in line]
    assert errors, result.output[-3000:]
    assert "Traceback" not in result.output, result.output[-3000:]


def test_without_diatheke_every_rank_names_the_packages(tmp_path):
    # PATH holds the system's programs but diatheke; a fresh data dir, so the corpus must be built.
    programs = tmp_path / "bin"
    programs.mkdir()
    for program in Path("/usr/bin").iterdir():
        if program.name != "diatheke":
            (programs / program.name).symlink_to(program)
    start = time.perf_counter()
    done = run_script(REPO / "recipes/translate.py", ["--debug", f"--data_dir={tmp_path / 'tfds'}",
                                                      f"--out_dir={tmp_path}", "--intra_op_threads=1"],
                      launcher="horovodrun", env=launch_env(PATH=f"{BIN}:{programs}"), timeout=120)
    result = Result(done.returncode, done.stdout + done.stderr, time.perf_counter() - start, tmp_path)
    assert result.returncode != 0 and result.seconds < 30, (result.seconds, result.output[-3000:])
    message = "diatheke not found on PATH: the Bible corpus is read with it " \
              "(apt-get install diatheke sword-text-web sword-text-sparv)"
    assert result.output.count(message) == 2, result.output[-3000:]  # one a rank, maybe on one line
    assert "Traceback" not in result.output, result.output[-3000:]
