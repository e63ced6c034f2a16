"""A real one-node Slurm cluster on this machine, from the distribution's packages (Debian's
`slurm-wlm` and `munge`), for tests and for trying the batch scripts by hand.

Everything lives under one folder: the munge key and socket, `slurm.conf`, the controller's
state, the node's spool, the pid files and the logs. Clients and daemons read that
`slurm.conf` through `SLURM_CONF` (and `-f`), talk over loopback on ports picked free at
start, and munged listens on its own socket with its own key, so a system-wide Slurm or munge
is neither used nor disturbed.

    with local_cluster(tmp_dir) as cluster:
        job = cluster.sbatch(["hostfiles/translate.sbatch", "--debug"],
                             options=["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"])
        info = cluster.wait_job(job, timeout=300)

    python scripts/slurm_cluster.py start DIR     # prints the SLURM_CONF to export
    python scripts/slurm_cluster.py status DIR
    python scripts/slurm_cluster.py stop DIR

`stop` cancels the cluster's jobs, stops the daemons by their pid files, waits for them to
go, and then ends any job step or job process of this cluster still running (one that left
its step's process tree). A daemon that cannot start raises `ClusterUnavailable` with the
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
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

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

    def launch(self, name: str, args: list[str], *, ready, timeout: float) -> None:
        """Start daemon `name` in the foreground as a child (its output in log/NAME.out) and
        wait until `ready()`; a daemon that exits first raises ClusterUnavailable."""
        with open(self.root / "log" / f"{name}.out", "ab") as out:
            self.daemons[name] = process = subprocess.Popen(
                args, env=self.env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ClusterUnavailable(f"{name} exited with code {process.returncode}: "
                                         f"{_reason(self.root, name, 'no output')}")
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{name} not ready after {timeout:.0f} s: {_reason(self.root, name, 'no output')}")

    def stop(self) -> None:
        """Stop the cluster (see `stop`) and reap the daemons this process started."""
        try:
            stop(self.root)
        finally:
            for process in self.daemons.values():
                if process.poll() is None:
                    process.kill()
                process.wait(timeout=30)

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
            time.sleep(0.5)
        reason = self.run(["scontrol", "show", "node", self.node], check=False).stdout
        reason = re.search(r"Reason=(.*)", reason)
        raise TimeoutError(f"node {self.node} is {state or 'unknown'} after {timeout:.0f} s, not idle"
                           f"{' (' + reason.group(1).strip() + ')' if reason else ''}; {self.log_tail()}")

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
        """The live processes of a job: its slurmstepd, batch script, srun or mpirun, the ranks."""
        return job_processes(self.conf, job_id)

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


def _daemon_pid(root: Path, name: str) -> int | None:
    """The live process that root/run/NAME.pid names, if it is that daemon started for `root`
    (a stale pid file may name a pid since reused by another program, even another munged)."""
    try:
        pid = int((root / "run" / f"{name}.pid").read_text().split()[0])
        proc = Path(f"/proc/{pid}")
        if ((proc / "comm").read_text().strip() == name and str(root).encode() in (proc / "cmdline").read_bytes()
                and _alive(pid)):
            return pid
    except (OSError, ValueError, IndexError):
        pass
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
        raise ClusterUnavailable(f"slurmd needs root to start jobs; running as {getpass.getuser()}")
    if running(root):
        raise RuntimeError(f"a cluster is already running in {root} ({', '.join(running(root))}): stop it first")
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
    (root / "plugstack.conf").write_text("")
    cluster.conf.write_text(slurm_conf(cluster, munge_socket=munge_socket, user=getpass.getuser()))
    key = munge_dir / "munge.key"
    try:
        if not key.exists():
            made = subprocess.run(["mungekey", "--create", f"--keyfile={key}"], capture_output=True, text=True,
                                  timeout=60, stdin=subprocess.DEVNULL)
            if made.returncode != 0:
                raise ClusterUnavailable(f"mungekey failed: {(made.stderr or made.stdout).strip()}")
        # In the foreground (-F, -D) each daemon is this process's child: an exit during the
        # start is seen at once, with its reason, and the tests reap what they started.
        cluster.launch("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                                  f"--socket={munge_socket}", f"--pid-file={root}/run/munged.pid",
                                  f"--log-file={root}/log/munged.log", f"--seed-file={munge_dir}/munged.seed"],
                       ready=munge_socket.exists, timeout=timeout)
        cluster.launch("slurmctld", ["slurmctld", "-D", "-f", str(cluster.conf)],
                       ready=lambda: cluster.run(["scontrol", "ping"], check=False).returncode == 0,
                       timeout=timeout)
        cluster.launch("slurmd", ["slurmd", "-D", "-f", str(cluster.conf), "-N", cluster.node],
                       ready=lambda: cluster.node_state() == "idle", timeout=timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def running(root: Path | str) -> list[str]:
    """The daemons whose pid file under `root` names a live process."""
    root = Path(root).resolve()
    return [name for name in DAEMONS if _daemon_pid(root, name)]


def _reason(root: Path, daemon: str, fallback: str) -> str:
    """The daemon's own words: the last error or fatal line of its log or its output."""
    lines = []
    for path in (root / "log" / f"{daemon}.log", root / "log" / f"{daemon}.out"):
        with contextlib.suppress(OSError):
            lines += path.read_text(errors="replace").splitlines()
    errors = [line for line in lines if re.search(r"\b(fatal|error)\b", line, re.IGNORECASE)]
    return (errors or lines[-1:] or [fallback])[-1].strip()


def job_processes(conf: Path, job_id: int | None = None) -> list[int]:
    """The live job steps (slurmstepd) and job processes of the cluster at `conf` (of one job,
    or of all), found by their environment (Slurm hands SLURM_CONF to every job) however they
    were reparented. Never this process nor its ancestors, even if they export that SLURM_CONF."""
    spared, pid = set(), os.getpid()
    while pid > 1:
        spared.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    needle = f"SLURM_CONF={conf}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle not in environ:
            continue
        step = re.match(rb"slurmstepd: \[(\d+)[.\]]", cmdline)
        ids = [int(v[13:]) for v in environ if v.startswith(b"SLURM_JOB_ID=") and v[13:].isdigit()]
        job = int(step.group(1)) if step else ids[0] if ids else None
        if job is not None and job_id in (None, job):
            found.append(int(entry.name))
    return [pid for pid in found if _alive(pid)]


def _end(pids: list[int], timeout: float) -> list[int]:
    """SIGTERM, then SIGKILL what is left after `timeout`; returns what outlived both."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        pids = _wait_gone(pids, wait)
        if not pids:
            break
    return pids


def stop(root: Path | str, *, timeout: float = 60) -> None:
    """Cancel every job, stop slurmd, slurmctld and munged by their pid files and wait for
    them to go; then end any job process of this cluster still running."""
    root = Path(root).resolve()
    conf = root / "slurm.conf"
    env = {**os.environ, "SLURM_CONF": str(conf)}
    if "slurmctld" in running(root):
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
    left = []
    for name in reversed(DAEMONS):
        pid = _daemon_pid(root, name)
        if pid:
            left += _end([pid], timeout / 3)
    left += _end(job_processes(conf), 5)
    if left:
        raise RuntimeError(f"processes of the cluster in {root} outlived SIGKILL: {left}")


@contextlib.contextmanager
def local_cluster(root: Path | str, *, timeout: float = 60):
    """A running one-node cluster under `root` for the `with` block; stopped however it ends."""
    cluster = start(root, timeout=timeout)
    try:
        yield cluster
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("dir", type=Path, help="the cluster's folder (created on start)")
    args = parser.parse_args(argv)
    conf = args.dir.resolve() / "slurm.conf"
    if args.action == "start":
        try:
            cluster = start(args.dir)
        except (ClusterUnavailable, RuntimeError, TimeoutError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"node {cluster.node} ({cluster.cpus} CPUs) idle; use it with:\n  export SLURM_CONF={conf}")
    elif args.action == "stop":
        stop(args.dir)
        print(f"stopped the cluster in {args.dir}")
    else:
        alive = running(args.dir)
        print(f"running: {', '.join(alive) or 'nothing'}")
        return 0 if alive else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
