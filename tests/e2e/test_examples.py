"""The Keras examples written against the Horovod drop-in (`common.hvd`), as real processes
under horovodrun: each trains on 2 processes, and the elastic one survives a killed worker."""
import json
import os
import re
import signal

import pytest

from scripts.launchers import BIN, REPO, launch_env, run_script
from tests.cluster.test_elastic import local_hosts, start_in_namespace, wait_for, worker_on  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}  # 2 processes share 2 cores


@pytest.fixture(scope="module")
def data_args(data_dir):
    from common.data.images import load_images
    load_images(data_dir=data_dir, dataset=None, debug=True)  # built once, before any example runs
    return ["--debug", f"--data-dir={data_dir}"]


def run_example(name, args, processes=2):
    done = run_script(REPO / "examples" / name, args, launcher="horovodrun", processes=processes, timeout=300,
                      env=launch_env(**ONE_THREAD))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


def test_fit_script_learns_on_two_processes(data_args, tmp_path):
    output = run_example("keras_fit.py", data_args + ["--epochs=3", "--steps-per-epoch=20", "--batch-size=32",
                                                       f"--out-dir={tmp_path}"])
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["loss"][-1] < history["loss"][0], history
    assert history["val_accuracy"][-1] > 0.4, history  # ten classes: chance is 0.1; 0.71 measured
    assert "test accuracy" in output and "on 2 processes" in output
    assert (tmp_path / "checkpoint-3.keras").exists()  # saved by rank 0


def test_custom_loop_learns_on_two_processes(data_args, tmp_path):
    output = run_example("keras_custom_loop.py", data_args + ["--steps=80", "--log-every=20", "--batch-size=32",
                                                               f"--out-dir={tmp_path}"])
    losses = [float(loss) for loss in re.findall(r"step \d+ loss ([0-9.]+)", output)]
    assert len(losses) == 4 and losses[-1] < losses[0], output[-3000:]
    accuracy = re.search(r"test accuracy ([0-9.]+) on 500 images, 2 processes", output)
    assert accuracy and float(accuracy.group(1)) > 0.25, output[-3000:]  # chance 0.1; 0.40 measured
    assert (tmp_path / "model.keras").exists()


def test_synthetic_benchmark_reports_the_throughput_of_two_processes():
    output = run_example("keras_synthetic_benchmark.py", [
        "--model=MobileNet", "--image-size=32", "--batch-size=4", "--num-warmup-batches=1",
        "--num-batches-per-iter=2", "--num-iters=2", "--fp16-allreduce", "--fused-batch-norm"])
    assert len(re.findall(r"Iter #\d: [0-9.]+ img/sec per CPU", output)) == 2, output[-3000:]
    total = re.search(r"Total img/sec on 2 CPU\(s\): ([0-9.]+) \+-", output)
    assert total and float(total.group(1)) > 0, output[-3000:]


def epochs_logged(out_dir):
    try:
        return [json.loads(line) for line in (out_dir / "epochs.jsonl").read_text().splitlines()]
    except (OSError, ValueError):  # not written yet, or a line half written
        return []


def test_elastic_script_survives_a_killed_worker(local_hosts, data_args, tmp_path):  # noqa: F811
    hosts_file, out_dir, log = tmp_path / "hosts", tmp_path / "run", tmp_path / "job.log"
    hosts_file.write_text("".join(f"{host}:1\n" for host in local_hosts[:2]))
    job = start_in_namespace([str(BIN / "horovodrun"), "--gloo", "-np", "2", "--min-np", "1", "--max-np", "2",
                              "--host-discovery-script", str(REPO / "hostfiles/discover_hosts.sh"),
                              str(BIN / "python"), str(REPO / "examples/keras_elastic.py"), *data_args, "--epochs=6",
                              "--steps-per-epoch=40", "--batch-size=32", "--batches-per-commit=5",
                              f"--out-dir={out_dir}"],
                             log, launch_env(ELASTIC_HOSTS=str(hosts_file), **ONE_THREAD))
    try:
        wait_for(lambda: len(epochs_logged(out_dir)) >= 2, 180, "two epochs", job, log)
        os.kill(worker_on(local_hosts[1]), signal.SIGKILL)
        job.wait(timeout=240)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    output = log.read_text(errors="replace")
    assert job.returncode == 0, output[-3000:]
    assert "finished 6 epochs on 1 workers" in output, output[-3000:]
    records = epochs_logged(out_dir)
    assert records[0]["workers"] == 2 and records[-1]["workers"] == 1, records
    assert records[-1]["epoch"] == 6 and {r["epoch"] for r in records} == set(range(1, 7)), records
    assert records[-1]["loss"] < records[0]["loss"], records
