"""A real one-node Slurm cluster on this machine, from the distribution's packages (Debian's
`slurm-wlm` and `munge`), for tests and for trying the batch scripts by hand.

Everything lives under one folder: the munge key, socket and log, `slurm.conf`, the
controller's state, the node's spool, the pid files and the logs. Clients and daemons read
that `slurm.conf` through `SLURM_CONF` (and `-f`), talk over loopback on ports picked free at
start, and munged listens on its own socket, so a system-wide Slurm or munge is neither used
nor disturbed.

    with local_cluster(tmp_dir) as cluster:
        job = cluster.sbatch(["hostfiles/translate.sbatch", "--debug"], options=["--ntasks=2"])
        info = cluster.wait_job(job, timeout=300)

    python scripts/slurm_cluster.py start DIR     # prints the SLURM_CONF to export
    python scripts/slurm_cluster.py stop DIR

`stop` cancels the cluster's jobs, stops the daemons by their pid files, waits for them to
go, and then ends any process still carrying this cluster's `SLURM_CONF` (a job step that
outlived its daemon). A daemon that cannot start raises `ClusterUnavailable` with the
daemon's own error line; anything else that goes wrong raises an ordinary error.
"""
from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"}
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL
PARTITION = "debug"


class ClusterUnavailable(RuntimeError):
    """The daemons cannot run here (a package missing, not root, a daemon refusing to start)."""


@dataclass
class Cluster:
    root: Path
    node: str
    cpus: int
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a Slurm client (or a job submitted with it) for this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def run(self, args: list[str], *, check: bool = True, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        env = kwargs.pop("env", None) or self.env()
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, **kwargs)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args))} exited {done.returncode}: "
                               f"{(done.stderr or done.stdout).strip()}")
        return done

    # ------------------------------------------------------------------ the node
    def node_state(self) -> str:
        done = self.run(["sinfo", "-h", "-N", "-n", self.node, "-o", "%T"], check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    def wait_idle(self, timeout: float = 60) -> None:
        """Until the node is idle (after start, and after a job or a requeue)."""
        state = ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.node_state()
            if state == "idle":
                return
            if state.startswith(("down", "drain")):
                # A node that was down (the controller restarted before it) can come back.
                self.run(["scontrol", "update", f"NodeName={self.node}", "State=RESUME"], check=False)
            time.sleep(0.5)
        raise TimeoutError(f"node {self.node} is {state or 'unknown'} after {timeout:.0f} s, not idle; "
                           f"{self.log_tail()}")

    # ------------------------------------------------------------------ jobs
    def sbatch(self, args: list[str], *, options: list[str] = (), cwd: Path | str | None = None,
               env: dict[str, str] | None = None) -> int:
        """Submit a batch script (`args`: the script and its arguments) with sbatch `options`
        (which override its #SBATCH lines); returns the job id."""
        done = self.run(["sbatch", "--parsable", *options, *map(str, args)], cwd=cwd, env=env)
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, NodeList, ...)."""
        done = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        return dict(re.findall(r"(\S+?)=(\S*)", done.stdout))

    def wait_job(self, job_id: int, timeout: float, *, states: set[str] = FINISHED) -> dict[str, str]:
        """Until the job reaches one of `states` (by default: any end); returns its record."""
        info: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} is {info.get('JobState')} after {timeout:.0f} s "
                           f"(reason {info.get('Reason')})")

    def cancel(self, job_id: int, timeout: float = 60) -> None:
        """Cancel a job (if it has not ended) and wait until it has."""
        if self.job(job_id).get("JobState") not in FINISHED:
            self.run(["scancel", str(job_id)], check=False)
            self.wait_job(job_id, timeout)

    def jobs(self) -> list[int]:
        done = self.run(["squeue", "-h", "-o", "%i"], check=False)
        return [int(line) for line in done.stdout.split() if line.isdigit()] if done.returncode == 0 else []

    def job_processes(self, job_id: int) -> list[int]:
        """The live processes of a job (its batch script, srun or mpirun, the ranks)."""
        return processes_with(self.conf, SLURM_JOB_ID=str(job_id))

    def log_tail(self, lines: int = 5) -> str:
        parts = []
        for name in ("slurmctld", "slurmd"):
            path = self.root / "log" / f"{name}.log"
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"{path.name}: " + " | ".join(tail))
        return "; ".join(parts)


# ---------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited: it only waits for its parent.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [pid for pid in pids if _alive(pid)]
        if not pids:
            return []
        time.sleep(0.1)
    return [pid for pid in pids if _alive(pid)]


def _error_line(log: Path, fallback: str) -> str:
    """The daemon's own reason: the last error or fatal line of its log."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    errors = [line for line in lines if re.search(r"\b(fatal|error)\b", line, re.IGNORECASE)]
    return (errors or lines or [fallback])[-1].strip()


def _node_hardware(cpus: int) -> str:
    """The node's topology as slurmd itself detects it (so the controller does not drain it
    for a mismatch), its CPU count the cores this process may use."""
    fields = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL, env={**os.environ, "SLURM_CONF": os.devnull})
        fields = dict(re.findall(r"(\w+)=(\S+)", done.stdout.splitlines()[0] if done.stdout else ""))
    if fields.get("CPUs") == str(cpus):
        keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
        return " ".join(f"{key}={fields[key]}" for key in keep if key in fields)
    return f"CPUs={cpus}"


def processes_with(conf: Path, **variables: str) -> list[int]:
    """Processes whose environment holds SLURM_CONF=`conf` (and each of `variables`): the
    daemons' children and the jobs of that cluster (Slurm hands SLURM_CONF to every job)."""
    needles = {f"SLURM_CONF={conf}".encode(), *(f"{k}={v}".encode() for k, v in variables.items())}
    mine = {os.getpid(), os.getppid()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            if needles <= set((entry / "environ").read_bytes().split(b"\0")) and _alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def slurm_conf(cluster: Cluster, *, munge_socket: Path, user: str) -> str:
    root, node = cluster.root, cluster.node
    hardware = _node_hardware(cluster.cpus)
    return "\n".join([
        "# Written by scripts/slurm_cluster.py: a one-node cluster for tests, everything under this folder.",
        "ClusterName=recipes",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={cluster.ports['slurmctld']}",
        f"SlurmdPort={cluster.ports['slurmd']}",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd.log",
        f"PlugStackConfig={root}/plugstack.conf",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "MpiDefault=none",
        "JobRequeue=1",
        "ReturnToService=2",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        # Finished jobs stay visible to `scontrol show job` for an hour (there is no database).
        "MinJobAge=3600",
        # Seconds between SIGTERM and SIGKILL when a job is cancelled or requeued.
        "KillWait=10",
        "InactiveLimit=0",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=60",
        "MailProg=/bin/true",
        f"NodeName={node} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


# ---------------------------------------------------------------------- start / stop
def start(root: Path | str, *, timeout: float = 60) -> Cluster:
    """Start munged, slurmctld and slurmd under `root` and wait until the node is idle. On any
    failure, whatever was started is stopped again."""
    root = Path(root).resolve()
    missing = [name for name in (*DAEMONS, "mungekey", "sinfo", "sbatch", "scontrol", "squeue", "scancel")
               if shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") is None]
    if missing:
        raise ClusterUnavailable(f"not installed: {', '.join(missing)} (Debian packages slurm-wlm munge)")
    if os.geteuid() != 0:
        raise ClusterUnavailable("slurmd must run as root to start jobs (running as "
                                 f"{getpass.getuser()})")
    if any(_alive(pid) for pid in map(_pid, _pid_files(root)) if pid):
        raise RuntimeError(f"a cluster is already running in {root}: stop it first")
    munge_dir = root / "munge"
    munge_socket = munge_dir / "munge.socket.2"
    if len(str(munge_socket)) > SOCKET_PATH_MAX:
        raise RuntimeError(f"{munge_socket} is too long for a Unix socket: use a shorter folder")
    cluster = Cluster(root, socket.gethostname().split(".")[0], len(os.sched_getaffinity(0)),
                      {"slurmctld": _free_port(), "slurmd": _free_port()})
    for sub in ("munge", "state", f"spool/{cluster.node}", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # Clients reach munged's socket through its folder; the key inside stays private (0600).
    munge_dir.chmod(0o755)
    user = getpass.getuser()
    (root / "plugstack.conf").write_text("")
    cluster.conf.write_text(slurm_conf(cluster, munge_socket=munge_socket, user=user))
    env = cluster.env()
    try:
        key = munge_dir / "munge.key"
        if not key.exists():
            _start_step(["mungekey", "--create", f"--keyfile={key}"], env, None)
        _start_step(["munged", "--force", f"--key-file={key}", f"--socket={munge_socket}",
                     f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log",
                     f"--seed-file={munge_dir}/munged.seed"], env, root / "log" / "munged.log")
        _wait_for(lambda: munge_socket.exists(), timeout, "munged", root / "log" / "munged.log")
        _start_step(["slurmctld", "-f", str(cluster.conf)], env, root / "log" / "slurmctld.log")
        _wait_for(lambda: cluster.run(["scontrol", "ping"], check=False).returncode == 0, timeout,
                  "slurmctld", root / "log" / "slurmctld.log", root / "run" / "slurmctld.pid")
        _start_step(["slurmd", "-f", str(cluster.conf), "-N", cluster.node], env, root / "log" / "slurmd.log")
        _wait_for(lambda: cluster.node_state() == "idle", timeout, "slurmd", root / "log" / "slurmd.log",
                  root / "run" / "slurmd.pid")
    except BaseException:
        stop(root)
        raise
    return cluster


def _start_step(args: list[str], env: dict[str, str], log: Path | None) -> None:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        reason = said[-1] if said else _error_line(log, f"exit code {done.returncode}") if log else ""
        raise ClusterUnavailable(f"{args[0]} did not start: {reason}")


def _wait_for(ready, timeout: float, daemon: str, log: Path, pid_file: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        pid = _pid(pid_file) if pid_file else None
        if pid_file and time.monotonic() > deadline - timeout + 3 and not (pid and _alive(pid)):
            raise ClusterUnavailable(f"{daemon} exited: {_error_line(log, 'no log')}")
        time.sleep(0.3)
    raise TimeoutError(f"{daemon} not ready after {timeout:.0f} s: {_error_line(log, 'no log')}")


def _pid_files(root: Path) -> list[Path]:
    return [root / "run" / f"{name}.pid" for name in reversed(DAEMONS)]


def stop(root: Path | str, *, timeout: float = 60) -> None:
    """Cancel every job, stop slurmd, slurmctld and munged (by their pid files) and wait for
    them to go; then end any process still holding this cluster's SLURM_CONF."""
    root = Path(root).resolve()
    conf = root / "slurm.conf"
    env = {**os.environ, "SLURM_CONF": str(conf)}
    ctld = _pid(root / "run" / "slurmctld.pid")
    if conf.exists() and ctld and _alive(ctld):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(["scancel", f"--partition={PARTITION}"], env=env, capture_output=True,
                           timeout=30, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                queue = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True,
                                       timeout=30, stdin=subprocess.DEVNULL)
                if queue.returncode != 0 or not queue.stdout.strip():
                    break
                time.sleep(0.5)
    for pid_file in _pid_files(root):
        pid = _pid(pid_file)
        if pid and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            for left in _wait_gone([pid], timeout / 3):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(left, signal.SIGKILL)
            _wait_gone([pid], 5)
    left = processes_with(conf)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if _wait_gone(left, 10):
        raise RuntimeError(f"processes of the cluster in {root} outlived SIGKILL: {left}")


@contextlib.contextmanager
def local_cluster(root: Path | str, *, timeout: float = 60):
    """A running one-node cluster under `root` for the `with` block; stopped however it ends."""
    cluster = start(root, timeout=timeout)
    try:
        yield cluster
    finally:
        stop(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("dir", type=Path, help="the cluster's folder (created on start)")
    args = parser.parse_args(argv)
    conf = args.dir.resolve() / "slurm.conf"
    if args.action == "start":
        try:
            cluster = start(args.dir)
        except ClusterUnavailable as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"node {cluster.node} ({cluster.cpus} CPUs) idle; use it with:\n  export SLURM_CONF={conf}")
    elif args.action == "stop":
        stop(args.dir)
        print(f"stopped the cluster in {args.dir}")
    else:
        running = [path.stem for path in _pid_files(args.dir.resolve()) if (pid := _pid(path)) and _alive(pid)]
        print(f"running: {', '.join(running) or 'nothing'}")
        return 0 if running else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
