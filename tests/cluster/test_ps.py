"""Parameter-server training with real processes: a local cluster of 2 workers and 2 parameter
servers (gRPC on loopback) trains `ps_toy.py`'s embedding model. One run, during which the test
SIGKILLs a worker, serves most assertions: the tables' shards on each server, the run that
finishes anyway, the restarted worker's steps, held-out RMSE against the one-process run, and
model.npz in a one-process model. Then a parameter server killed mid-run, and bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "tests" / "cluster" / "ps_toy.py"
STEPS = 1000
pytestmark = pytest.mark.slow


def start_toy(out_dir: Path, *flags: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TOY), f"--out_dir={out_dir}", *flags],
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def children_of(chief_pid: int) -> list[psutil.Process]:
    """The server processes a chief started (found by the parent pid they watch), still alive."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if "common.plans.ps" in " ".join(process.info["cmdline"] or []) and \
                    process.environ().get("PS_PARENT_PID") == str(chief_pid):
                found.append(process)
        except psutil.Error:
            continue
    return found


def task_process(chief_pid: int, job: str, index: int) -> psutil.Process:
    wanted = {"type": job, "index": index}
    for process in children_of(chief_pid):
        if json.loads(process.environ()["TF_CONFIG"])["task"] == wanted:
            return process
    raise AssertionError(f"no {job}:{index} process under chief {chief_pid}")


def wait_for_step(out_dir: Path, step: int, chief: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    metrics = out_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert chief.poll() is None, chief.communicate()[1][-3000:]
        if metrics.exists():
            records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            if records and records[-1]["step"] >= step:
                return
        time.sleep(0.5)
    raise AssertionError(f"no step {step} in {metrics} after {timeout} s")


def last_error_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("one_process")
    toy = start_toy(out_dir, f"--steps={STEPS}")
    _, stderr = toy.communicate(timeout=300)
    assert toy.returncode == 0, stderr[-3000:]
    return json.loads((out_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def ps_run(tmp_path_factory):
    """The PS run with worker 1 SIGKILLed at step 200 or later: (out dir, summary, stderr, the
    killed worker's log)."""
    out_dir = tmp_path_factory.mktemp("ps")
    chief = start_toy(out_dir, f"--steps={STEPS}", "--plan=ps,workers=2,servers=2", "--checkpoint_every=500")
    try:
        wait_for_step(out_dir, 200, chief)
        task_process(chief.pid, "worker", 1).send_signal(signal.SIGKILL)
        _, stderr = chief.communicate(timeout=300)
    finally:
        chief.kill()
    assert chief.returncode == 0, stderr[-3000:]
    assert not children_of(chief.pid)
    return out_dir, json.loads((out_dir / "summary.json").read_text()), stderr


def test_each_server_holds_half_of_each_table(ps_run):
    _, summary, _ = ps_run
    for table, rows in (("user_embedding/embeddings", 600), ("item_embedding/embeddings", 400)):
        held = summary["rows_per_server"][table]
        assert sorted(held) == ["ps:0", "ps:1"], held
        assert sum(held.values()) == rows and all(abs(count - rows / 2) <= 1 for count in held.values()), held
    counts = summary["parameters_per_server"]
    assert abs(counts["ps:0"] - counts["ps:1"]) < 0.05 * summary["parameters"], counts


def test_killed_worker_is_restarted_and_takes_steps_again(ps_run):
    out_dir, summary, stderr = ps_run
    assert summary["steps"] == STEPS and summary["worker_restarts"] == 1
    assert "worker:1" in stderr and "exited (signal 9); starting it again" in stderr
    log = (out_dir / "servers" / "worker-1.log").read_text()
    before, after = log.split("ps: worker:1 serving")[1:3]  # its first life, and its second
    assert "ran step" in before
    steps_after = [int(line.split()[-1]) for line in after.splitlines() if "ran step" in line]
    assert len(steps_after) >= 3 and min(steps_after) > 200, steps_after
    other = (out_dir / "servers" / "worker-0.log").read_text()
    # Every logged step ran (the killed worker may have logged one it did not finish).
    assert other.count("ran step") + log.count("ran step") >= STEPS // 10


def test_rmse_matches_one_process(ps_run, one_process):
    _, summary, _ = ps_run
    assert one_process["test_rmse"] < 0.6  # it learns: the ratings' spread is about 1.5
    assert abs(summary["test_rmse"] - one_process["test_rmse"]) / one_process["test_rmse"] < 0.02, \
        (summary["test_rmse"], one_process["test_rmse"])
    assert summary["steady_examples_per_sec"] > 0 and summary["plan"] == "ps" and summary["world_size"] == 2


def test_model_npz_loads_into_one_process_model(ps_run):
    out_dir, summary, _ = ps_run
    sys.path.insert(0, str(TOY.parent))
    import ps_toy
    from common.state import load_weights
    config = ps_toy.ToyConfig()
    model = ps_toy.build_model(config)
    load_weights(model, out_dir / "model.npz")
    assert ps_toy.rmse(model, ps_toy.toy_data(config))["test_rmse"] == pytest.approx(summary["test_rmse"], rel=1e-5)
    with np.load(out_dir / "checkpoints" / f"ckpt-{STEPS:08d}.npz") as ckpt:
        # A step the killed worker had applied may run again on the other (at least once).
        assert STEPS <= int(ckpt["ps_adagrad/iterations"]) <= STEPS + 2


def test_resume_goes_on_from_the_checkpoints_step(ps_run, tmp_path):
    """A copy of the finished run resumed to 20 more steps schedules those 20: from the
    checkpoint's step, whatever its optimizer count (a step run twice moves that past it)."""
    out_dir = tmp_path / "run"
    shutil.copytree(ps_run[0], out_dir)
    with np.load(out_dir / "checkpoints" / f"ckpt-{STEPS:08d}.npz") as ckpt:
        applied_before = int(ckpt["ps_adagrad/iterations"])
    chief = start_toy(out_dir, f"--steps={STEPS + 20}", "--plan=ps,workers=2,servers=2", "--resume")
    _, stderr = chief.communicate(timeout=300)
    assert chief.returncode == 0, stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-4] == STEPS and steps[-3:] == [STEPS + 10, STEPS + 20, STEPS + 20], steps[-6:]  # last: final
    assert json.loads((out_dir / "checkpoints" / "latest.json").read_text())["step"] == STEPS + 20
    with np.load(out_dir / "checkpoints" / f"ckpt-{STEPS + 20:08d}.npz") as ckpt:
        assert int(ckpt["ps_adagrad/iterations"]) >= applied_before + 20


def test_dead_parameter_server_stops_the_run(tmp_path):
    chief = start_toy(tmp_path, "--steps=100000", "--plan=ps,workers=2,servers=2")
    try:
        wait_for_step(tmp_path, 10, chief)
        task_process(chief.pid, "ps", 1).send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = chief.communicate(timeout=90)
        seconds = time.monotonic() - killed
    finally:
        chief.kill()
    assert chief.returncode != 0 and seconds < 60, seconds
    assert last_error_line(stderr).startswith("error: parameter server ps:1 (localhost:"), stderr[-2000:]
    assert not children_of(chief.pid)


def free_address() -> str:
    import portpicker
    return f"localhost:{portpicker.pick_unused_port()}"


@pytest.mark.parametrize("flags, tf_config, message", [
    (["--plan=ps,workers=0,servers=2"], None, "workers must be at least 1"),
    (["--plan=ps,workers=2,servers=0"], None, "servers must be at least 1"),
    (["--plan=ps,shards=2"], None, "unknown or repeated 'shards'"),
    (["--plan=ps"], "{not json", "TF_CONFIG does not parse"),
    (["--plan=ps"], "unreachable", "no server answers at localhost:"),
])
def test_bad_input_is_one_line(tmp_path, flags, tf_config, message):
    env = {}
    if tf_config == "unreachable":
        cluster = {"chief": [free_address()], "worker": [free_address()], "ps": [free_address()]}
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "chief", "index": 0}})
    if tf_config is not None:
        env["TF_CONFIG"] = tf_config
    started = time.monotonic()
    toy = start_toy(tmp_path, "--steps=10", *flags, env=env)
    _, stderr = toy.communicate(timeout=60)
    assert toy.returncode != 0 and time.monotonic() - started < 30
    line = last_error_line(stderr)
    assert line.startswith("error: ") and message in line, stderr[-2000:]
    assert not children_of(toy.pid)


def test_a_tf_config_cluster_started_by_hand_trains(tmp_path):
    """As on real hosts (hostfiles/ps.md): each server started on its own from its TF_CONFIG,
    then the chief with --plan=ps takes the cluster's counts from TF_CONFIG."""
    cluster = {"chief": [free_address()], "worker": [free_address()], "ps": [free_address(), free_address()]}
    servers = []
    try:
        for job, index in (("ps", 0), ("ps", 1), ("worker", 0)):
            tf_config = json.dumps({"cluster": cluster, "task": {"type": job, "index": index}})
            servers.append(subprocess.Popen([sys.executable, "-m", "common.plans.ps", "serve", "--intra_op_threads=1"],
                                            env={**os.environ, "TF_CONFIG": tf_config, "TF_CPP_MIN_LOG_LEVEL": "2"},
                                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        chief_config = json.dumps({"cluster": cluster, "task": {"type": "chief", "index": 0}})
        toy = start_toy(tmp_path, "--steps=50", "--log_every=10", "--plan=ps", env={"TF_CONFIG": chief_config})
        _, stderr = toy.communicate(timeout=240)
        assert toy.returncode == 0, stderr[-3000:]
        assert all(server.poll() is None for server in servers)  # the chief leaves servers it did not start
    finally:
        for server in servers:
            server.kill()
            server.wait()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["workers"], summary["servers"], summary["steps"]) == (1, 2, 50), summary
    assert sorted(summary["rows_per_server"]["user_embedding/embeddings"].values()) == [300, 300], summary
