"""The Slurm batch scripts in hostfiles/, submitted with sbatch to a real one-node Slurm
cluster started for this module (scripts/slurm_cluster.py), and a requeued job that resumes."""
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from scripts.launchers import REPO, Result, final_weights, run_recipe
from scripts.slurm_cluster import ClusterUnavailable, local_cluster

pytestmark = pytest.mark.slow

SCRIPTS = {"srun": REPO / "hostfiles/translate.sbatch", "horovodrun": REPO / "hostfiles/translate-mpirun.sbatch"}
# One node, two tasks of one core each: the scripts' #SBATCH lines ask for 2 nodes x 4 tasks.
ONE_NODE = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=00:15:00"]
# Test-only environment, handed to the job by sbatch: quiet TensorFlow, Open MPI on loopback.
EXPORT = "--export=ALL,TF_CPP_MIN_LOG_LEVEL=2,OMPI_MCA_btl_tcp_if_include=lo,OMPI_MCA_oob_tcp_if_include=lo"
REQUEUE_FLAGS = ["--debug", "--deterministic", "--steps=60", "--checkpoint_every=10", "--log_every=1"]
ERROR = re.compile(r"\berror\b|Traceback|\bfatal\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        with local_cluster(tmp_path_factory.mktemp("slurm")) as running:
            yield running
    except ClusterUnavailable as error:
        pytest.skip(f"no Slurm cluster here: {error}")


@pytest.fixture
def submit(cluster, tmp_path):
    """sbatch one of SCRIPTS on one node from the repository root; every job it submitted is
    cancelled at the end of the test, so a failed test leaves the node free for the next."""
    jobs = []

    def submit(script, args):
        job = cluster.sbatch([SCRIPTS[script], *args], cwd=REPO,
                             options=[*ONE_NODE, f"--output={tmp_path}/job-%j.out", EXPORT])
        jobs.append(job)
        return job

    yield submit
    for job in jobs:
        cluster.cancel(job)


def job_output(cluster, job):
    return Path(cluster.job(job)["StdOut"]).read_text(errors="replace")


def steps_logged(out_dir):
    return [record for record in Result(0, "", 0.0, out_dir).metrics() if record.get("kind") != "final"]


@pytest.mark.parametrize("script", ["srun", "horovodrun"])
def test_a_batch_script_trains_the_recipe(script, cluster, submit, data_dir, tmp_path):
    out_dir = tmp_path / "run"
    job = submit(script, ["--debug", f"--out_dir={out_dir}", f"--data_dir={data_dir}"])
    info = cluster.wait_job(job, timeout=360)
    output = job_output(cluster, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), output[-3000:]
    assert not [line for line in output.splitlines() if ERROR.search(line)], output[-3000:]
    logged = steps_logged(out_dir)
    assert [record["step"] for record in logged] == list(range(1, 21))
    assert {record["world_size"] for record in logged} == {2}
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and "bleu" in summary
    assert (out_dir / "config.json").exists() and list((out_dir / "checkpoints").glob("ckpt-*.npz"))
    with np.load(out_dir / "model.npz") as model:
        assert model.files and all(np.isfinite(model[name]).all() for name in model.files)
    cluster.wait_idle(timeout=60)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    result = run_recipe("translate", REQUEUE_FLAGS + [f"--data_dir={data_dir}"],
                        tmp_path_factory.mktemp("uninterrupted"), launcher="horovodrun", processes=2)
    assert result.returncode == 0, result.output[-3000:]
    return result


def wait_for_step(out_dir, step, cluster, job, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            logged = steps_logged(out_dir)
        except (OSError, ValueError):  # not written yet, or a line half written
            logged = []
        if logged and logged[-1]["step"] >= step:
            return logged[-1]["step"]
        state = cluster.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {job} is {state}: {job_output(cluster, job)[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"job {job} did not log step {step} in {timeout} s")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("script", ["srun", "horovodrun"])
def test_a_requeued_job_resumes_from_its_checkpoint(script, cluster, submit, uninterrupted, data_dir, tmp_path):
    out_dir = tmp_path / "run"
    job = submit(script, REQUEUE_FLAGS + [f"--out_dir={out_dir}", f"--data_dir={data_dir}"])
    wait_for_step(out_dir, 25, cluster, job)
    first_attempt = cluster.job_processes(job)
    assert first_attempt
    cluster.run(["scontrol", "requeue", str(job)])

    info = cluster.wait_job(job, timeout=120, states={"PENDING"})
    assert info["Restarts"] == "1"
    # Held back (below), the job has no processes now: any is a survivor of the first attempt.
    survivors = cluster.job_processes(job)
    deadline = time.monotonic() + 10
    while survivors and time.monotonic() < deadline:
        time.sleep(0.2)
        survivors = cluster.job_processes(job)
    assert not survivors, f"processes of the first attempt {first_attempt} outlived the requeue: {survivors}"
    cluster.wait_idle(timeout=60)
    resumed_from = json.loads((out_dir / "checkpoints/latest.json").read_text())["step"]
    assert resumed_from >= 20
    before = [record for record in Result(0, "", 0.0, out_dir).metrics() if record["step"] <= resumed_from]
    # Slurm holds a requeued job back (its BeginTime) for a while: let it start now.
    cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])

    info = cluster.wait_job(job, timeout=360)
    output = job_output(cluster, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), output[-3000:]
    # --open-mode=append: both attempts in one file; the first one's end is Slurm's requeue.
    first, started, second = output.partition(f"job {job} start 1:")
    assert started and f"job {job} start 0:" in first, output[-3000:]
    assert not [line for line in second.splitlines() if ERROR.search(line)], second[-3000:]

    run = Result(0, output, 0.0, out_dir)
    assert [record["step"] for record in steps_logged(out_dir)] == list(range(1, 61))
    # The records up to the checkpoint are the first attempt's own (their timings differ in
    # any rerun): the second attempt resumed there rather than starting over.
    assert run.metrics()[:len(before)] == before
    np.testing.assert_allclose(run.losses(), uninterrupted.losses(), rtol=1e-5)
    weights, expected = final_weights(run), final_weights(uninterrupted)
    assert sorted(weights) == sorted(expected)
    with np.load(out_dir / "model.npz") as model, np.load(uninterrupted.out_dir / "model.npz") as reference:
        assert sorted(model.files) == sorted(reference.files)
        for name in model.files:
            np.testing.assert_allclose(model[name], reference[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for name, value in weights.items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-7, err_msg=name)

