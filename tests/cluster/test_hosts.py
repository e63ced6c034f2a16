"""translate.py across two hosts that are network namespaces of this machine (scripts/netns_hosts.py:
their own addresses, veth links to one bridge, their own sshd), launched from the first host
as on a cluster: `horovodrun -H` (MPI and Gloo) and `mpirun --hostfile` train exactly like one
process, over the link; a link cut mid-run ends the job under horovodrun (Gloo and MPI), naming
the lost rank and host, and leaves nothing behind."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from scripts import netns_hosts
from scripts.launchers import BIN, REPO, Result, assert_same_training, launch_env, one_process_run

pytestmark = pytest.mark.slow

DETERMINISTIC = ["--debug", "--deterministic", "--steps=20", "--log_every=1", "--checkpoint_every=0",
                 "--global_batch_size=16"]
STALL_TIMEOUT = 20
# The hosts' TCP gives a silent peer up after 6 retransmissions (0.2 s doubling: 25.4 s), not
# Linux's 15 (about 15 minutes): a launcher or daemon waiting on a cut link ends in the test's time.
TCP_RETRIES2 = 6
TCP_GIVE_UP = 0.2 * (2 ** (TCP_RETRIES2 + 1) - 1)
HOSTFILES = REPO / "hostfiles"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    reason = netns_hosts.unavailable_reason()
    if reason:
        pytest.skip(f"no virtual hosts here: {reason}")
    with netns_hosts.virtual_hosts(tmp_path_factory.mktemp("hosts"), count=2, tcp_retries2=TCP_RETRIES2) as made:
        yield made


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The module's TFDS folder: the embedded data is built once, by the first run."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    return one_process_run("translate", DETERMINISTIC + [f"--data_dir={data_dir}"], tmp_path_factory.mktemp("single"))


def launcher_argv(launcher, hosts):
    """The launcher's command line on host 1, up to the program, and its environment."""
    if launcher == "mpirun":
        # The example hostfile; ssh options given to Open MPI directly, no wrapper on PATH.
        return (["mpirun", "-np", "2", "--hostfile", str(HOSTFILES / "hosts.netns.mpirun"), "--bind-to", "none",
                 "--map-by", "slot", "-mca", "plm_rsh_args", f"-F {hosts.ssh_config}", "-mca", "pml", "ob1",
                 "-mca", "btl", "^openib", "-mca", "btl_tcp_if_include", netns_hosts.IFACE,
                 "-mca", "oob_tcp_if_include", netns_hosts.IFACE,
                 "-x", "PATH", "-x", "PYTHONPATH", "-x", "TF_CPP_MIN_LOG_LEVEL"], launch_env())
    # horovodrun calls `ssh` from PATH: the hosts' ssh (their config) comes first.
    argv = [str(BIN / "horovodrun"), "-np", "2", "-H", hosts.horovodrun_hosts(), "--disable-cache"]
    if launcher == "horovodrun-gloo":
        argv += ["--gloo", "--network-interface", netns_hosts.IFACE]
    return argv, hosts.env(launch_env())


def test_the_example_hostfiles_name_the_hosts(hosts):
    """horovodrun's own parser reads its example (it takes no comments), and both name the hosts."""
    from horovod.runner.common.util.hosts import parse_host_files
    assert parse_host_files(str(HOSTFILES / "hosts.netns.horovodrun")) == hosts.horovodrun_hosts()
    lines = (HOSTFILES / "hosts.netns.mpirun").read_text().splitlines()
    assert [line.split()[0] for line in lines if line and not line.startswith("#")] == hosts.addresses


def translate_argv(out_dir, args):
    return [sys.executable, str(REPO / "recipes/translate.py"), f"--out_dir={out_dir}", "--intra_op_threads=1", *args]


def job_left(hosts, wait=0.0):
    """What is left of jobs in any host's namespace, waiting up to `wait` s for it to go."""
    deadline = time.monotonic() + wait
    while (left := hosts.job_pids()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return {pid: command_of(pid) for pid in left}


def command_of(pid):
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace")[:120]
    return "?"


@pytest.mark.parametrize("launcher", ["horovodrun", "horovodrun-gloo", "mpirun"])
def test_two_hosts_train_exactly_like_one_process_over_the_link(launcher, hosts, reference, data_dir, tmp_path):
    argv, env = launcher_argv(launcher, hosts)
    before = hosts[1].link_counters()
    start = time.perf_counter()
    done = hosts[0].run(argv + translate_argv(tmp_path, DETERMINISTIC + [f"--data_dir={data_dir}"]), cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
    result = Result(done.returncode, done.stdout + done.stderr, time.perf_counter() - start, tmp_path)
    after = hosts[1].link_counters()
    assert_same_training(result, reference)
    assert result.summary()["world_size"] == 2
    # The gradients crossed host 2's link both ways, every step: had both ranks run on host 1,
    # host 2's link would have carried nothing.
    crossed = 20 * result.summary()["gradient_wire_bytes"]
    for way in ("rx_bytes", "tx_bytes"):
        assert after[way] - before[way] > crossed, (way, before, after, crossed)
    assert not job_left(hosts, wait=10)


@pytest.mark.parametrize("launcher", ["horovodrun-gloo", "horovodrun"])
def test_a_cut_link_ends_the_job_naming_the_lost_host(launcher, hosts, data_dir, tmp_path):
    """Host 2's cable pulled mid-run: rank 0's stall watchdog names rank 1 and host 2's address in
    one line, the launcher exits non-zero within the bound, and nothing of the job stays behind
    on either host."""
    argv, env = launcher_argv(launcher, hosts)
    args = ["--debug", "--steps=300", "--log_every=1", "--checkpoint_every=0", f"--stall_timeout={STALL_TIMEOUT}",
            f"--data_dir={data_dir}"]
    # Gloo's launcher ends the job as soon as rank 0 exits; Open MPI's mpirun, aborting it, waits
    # for its daemon on the lost host until TCP gives that connection up.
    bound = STALL_TIMEOUT + 10 + (0 if launcher == "horovodrun-gloo" else TCP_GIVE_UP)
    log_path = tmp_path / "launcher.log"
    metrics = tmp_path / "metrics.jsonl"
    with open(log_path, "w") as log:
        job = hosts[0].popen(argv + translate_argv(tmp_path, args), cwd=REPO, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert job.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no steps logged in 180 s"
            time.sleep(0.2)
        cut_at = time.monotonic()
        hosts[1].cut()
        with contextlib.suppress(subprocess.TimeoutExpired):
            job.wait(timeout=bound + 30)
        ended_after = time.monotonic() - cut_at
        # The lost host's processes hear of nothing: their own watchdog, and TCP giving up, end them.
        left = job_left(hosts, wait=TCP_GIVE_UP + 10)
        left_after = time.monotonic() - cut_at
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        stopped = hosts.stop_jobs()  # mends the link too
    output = log_path.read_text()
    print(f"{launcher}: exit {job.returncode} {ended_after:.1f} s after the cut, "
          f"{'something' if left else 'nothing'} left {left_after:.1f} s after it")
    assert job.returncode not in (None, 0), f"launcher still running {ended_after:.0f} s after the cut"
    assert ended_after < bound, f"{ended_after:.1f} s"
    stalls = [line for line in output.splitlines() if "sent no heartbeat" in line]
    assert len(stalls) == 1, output[-3000:]  # rank 1's own line cannot cross the cut link
    assert "error: rank 1 on host " in stalls[0] and f"({hosts[1].address})" in stalls[0], stalls
    assert not left, f"left running: {left} (stopped {stopped})"
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] < 300
