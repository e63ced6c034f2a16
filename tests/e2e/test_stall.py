"""A rank that is stopped (SIGSTOP: a frozen node, a stuck driver, a lost link) ends the job:
every other rank exits non-zero soon after --stall_timeout with one line naming the stopped
rank, the launcher exits non-zero, and nothing of the job is left (translate.py --debug under
mpirun and horovodrun --gloo, real processes)."""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from scripts.launchers import REPO, command, launch_env

pytestmark = pytest.mark.slow

STALL_TIMEOUT = 10
# Each survivor exits as soon as the stopped rank has been silent for the timeout (the margin is
# for a busy machine); the launchers then stop the rest: Open MPI within a second, horovodrun's
# Gloo launcher after its 5 s grace for SIGTERM, twice (for the ranks, then for its shell).
SURVIVORS_WITHIN = STALL_TIMEOUT + 5
LAUNCHER_WITHIN = STALL_TIMEOUT + 16


def ranks_of(job: subprocess.Popen) -> dict[int, psutil.Process]:
    """The job's Python worker processes by rank, found under the launcher by command line."""
    found = {}
    for child in psutil.Process(job.pid).children(recursive=True):
        try:
            cmdline = child.cmdline()
            if cmdline and Path(cmdline[0]).name.startswith("python") and "recipes/translate.py" in " ".join(cmdline):
                env = child.environ()
                found[int(env.get("OMPI_COMM_WORLD_RANK", env.get("HOROVOD_RANK", -1)))] = child
        except psutil.Error:  # ended meanwhile
            continue
    return found


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def left_running(marker: str) -> list[str]:
    """Processes whose command line holds `marker` (this test's output folder), from /proc."""
    left = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            left.append(f"{proc.name} ({state}): {cmdline[:120]}")
    return left


def wait_for_steps(job: subprocess.Popen, metrics: Path, steps: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        assert job.poll() is None, f"the job ended before training (exit {job.returncode})"
        time.sleep(0.2)
    raise AssertionError(f"no {steps} steps in {timeout} s")


@pytest.mark.parametrize("launcher, processes, stopped", [
    ("mpirun", 2, 1),
    ("mpirun", 3, 0),
    ("horovodrun-gloo", 2, 0),
    ("horovodrun-gloo", 3, 2),
], ids=["mpirun-np2-rank1", "mpirun-np3-rank0", "gloo-np2-rank0", "gloo-np3-rank2"])
def test_a_stopped_rank_ends_the_job_with_a_line_naming_it(launcher, processes, stopped, data_dir, tmp_path):
    log = tmp_path / "output.log"
    args = ["--debug", "--steps=400", "--log_every=1", "--checkpoint_every=0", f"--global_batch_size={8 * processes}",
            f"--stall_timeout={STALL_TIMEOUT}", f"--data_dir={data_dir}", f"--out_dir={tmp_path}",
            "--intra_op_threads=1"]
    with open(log, "w") as output:
        job = subprocess.Popen(command(launcher, processes) + [str(REPO / "recipes/translate.py"), *args], cwd=REPO,
                               env=launch_env(), stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    ranks = {}
    try:
        wait_for_steps(job, tmp_path / "metrics.jsonl", 3)
        ranks = ranks_of(job)
        assert sorted(ranks) == list(range(processes)), ranks
        everything = [psutil.Process(job.pid)] + psutil.Process(job.pid).children(recursive=True)
        ranks[stopped].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        ended = {}
        while time.monotonic() - stopped_at < LAUNCHER_WITHIN + 30 and job.poll() is None:
            for rank, process in ranks.items():
                if rank not in ended and gone(process):
                    ended[rank] = time.monotonic() - stopped_at
            time.sleep(0.1)
        launcher_seconds = time.monotonic() - stopped_at
        for rank, process in ranks.items():
            if rank not in ended and gone(process):
                ended[rank] = launcher_seconds
        text = log.read_text(errors="replace")
        print(f"after SIGSTOP of rank {stopped}: ranks ended at "
              f"{ {rank: round(s, 1) for rank, s in sorted(ended.items())} } s, the launcher at {launcher_seconds:.1f} s")
        assert job.returncode is not None and job.returncode != 0, text[-3000:]
        assert launcher_seconds < LAUNCHER_WITHIN, text[-3000:]
        for rank in ranks:
            if rank != stopped:
                assert ended.get(rank, 1e9) < SURVIVORS_WITHIN, (rank, ended, text[-3000:])
        lines = [line[line.index("error: "):] for line in text.splitlines() if "error: " in line]
        assert lines, text[-3000:]
        # Each line a survivor printed names the stopped rank, its host and the address its
        # heartbeats came from (loopback: every rank runs on this host), and the steps.
        pattern = (rf"error: rank {stopped} on host \S+ \(127\.0\.0\.1\) sent no heartbeat for \d+ s \(its last "
                   rf"step \d+, this rank's \d+\): it is frozen or cut off; ending the job "
                   rf"\(--stall_timeout={STALL_TIMEOUT}\)$")
        assert all(re.match(pattern, line) for line in lines), lines
        time.sleep(0.5)
        assert all(gone(process) for process in everything), [p for p in everything if not gone(p)]
        assert not left_running(str(tmp_path)), left_running(str(tmp_path))
    finally:  # a failed test leaves nothing running: the stopped rank is continued, then killed
        try:
            rest = psutil.Process(job.pid).children(recursive=True) if job.poll() is None else []
        except psutil.Error:
            rest = []
        for process in [*ranks.values(), *rest]:
            try:
                process.send_signal(signal.SIGCONT)
                process.kill()
            except psutil.Error:
                pass
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except OSError:
            pass
        job.wait()
