"""The processes of a parameter-server cluster, and the checks that keep a bad one from hanging.

A cluster is TensorFlow's: a chief (the coordinator, the recipe's process), workers and
parameter servers, each task one `tf.distribute.Server` at a host:port. Every server process
runs `python -m common.plans.ps serve`, which reads its place from `TF_CONFIG`
(hostfiles/ps.md). Without `TF_CONFIG`, `open_cluster` starts the workers and servers as
children on loopback, on free ports; it restarts a worker that dies (same port, so the
coordinator's own recovery finds it again) unless it keeps dying at start, never a parameter
server (their variables die with them), and kills every child on each way out. A child whose parent is gone exits by itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from common.errors import ConfigError, RecipeError

REACH_SECONDS = 15  # how long the chief waits for every task of a TF_CONFIG cluster to listen
START_SECONDS = 120  # how long it waits for its own children to start (TensorFlow's import is slow on a busy host)
QUICK_EXIT_SECONDS = 60  # a local worker that exits this soon after its start...
QUICK_EXITS = 3  # ...this many times in a row is not started again: the run ends, naming it
TF_CONFIG_FIX = "set TF_CONFIG as in hostfiles/tf_config.chief.json (hostfiles/ps.md)"
JOBS = ("worker", "ps")


@dataclasses.dataclass
class Cluster:
    """The cluster's tasks by job ({"chief": [...], "worker": [...], "ps": [...]}), and, for a
    local one, its children (`LocalProcesses`)."""

    spec: dict[str, list[str]]
    processes: "LocalProcesses | None" = None

    def check_servers(self) -> None:
        """RecipeError if a local parameter server has exited, or a local worker keeps exiting
        (a TF_CONFIG cluster's are not ours to watch: TensorFlow's error names them)."""
        if self.processes:
            self.processes.check_servers()

    def servers_gone(self) -> RecipeError | None:
        """The error naming a parameter server that is gone (exited, for a local cluster; not
        answering, for TF_CONFIG's), or None while all are there."""
        if self.processes:
            try:
                self.processes.check_servers()
            except RecipeError as gone:
                return gone
            return None
        for index, address in enumerate(self.spec["ps"]):
            if not _listening(address, timeout=2.0):
                return RecipeError(f"parameter server ps:{index} ({address}) does not answer, and the variables it "
                                   "held are gone: restart it and the run (--resume goes on from the last checkpoint)")
        return None

    def failure(self, error: Exception) -> RecipeError:
        """The one line for a TensorFlow error that ended the run: the server that is gone, if
        one is, else TensorFlow's first line."""
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return self.servers_gone() or RecipeError(
            f"the parameter-server cluster failed ({type(error).__name__}: {first_line}): check the servers' logs, "
            "then restart the run (--resume goes on from the last checkpoint)")

    @property
    def worker_restarts(self) -> int:
        return self.processes.restarts if self.processes else 0


# ------------------------------------------------------------------ TF_CONFIG (a cluster on real hosts)
def parse_tf_config(text: str, role: str = "chief") -> tuple[dict[str, list[str]], str, int]:
    """(cluster spec, task type, task index) of a TF_CONFIG; ConfigError naming the fix. `role`
    is the task type the caller must be ("chief" for the recipe, None for any: `serve`)."""
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        spec = {job: [str(address) for address in cluster[job]] for job in cluster}
        task_type, task_index = str(task["type"]), int(task["index"])
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"TF_CONFIG does not parse ({type(error).__name__}: {error}): {TF_CONFIG_FIX}") from None
    for job in ("chief", *JOBS):
        if not spec.get(job):
            raise ConfigError(f"TF_CONFIG names no {job} task in its cluster: {TF_CONFIG_FIX}")
    for address in (a for addresses in spec.values() for a in addresses):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"TF_CONFIG: {address!r} is not host:port: {TF_CONFIG_FIX}")
    if task_type not in spec or not 0 <= task_index < len(spec[task_type]):
        raise ConfigError(f"TF_CONFIG's task {task_type}:{task_index} is not in its cluster: {TF_CONFIG_FIX}")
    if role and task_type != role:
        raise ConfigError(f"TF_CONFIG makes this process {task_type}:{task_index}, but the recipe runs as the chief: "
                          "start workers and parameter servers with `python -m common.plans.ps serve`")
    return spec, task_type, task_index


def wait_listening(spec: dict[str, list[str]], seconds: float = REACH_SECONDS, check=lambda: None) -> None:
    """RecipeError naming the first worker or parameter server that does not accept a TCP
    connection within `seconds` (TensorFlow itself would wait for it forever); `check()`
    raises sooner if a task can no longer come."""
    deadline = time.monotonic() + seconds
    for job in JOBS:
        for index, address in enumerate(spec[job]):
            while not _listening(address, timeout=1.0):
                check()
                if time.monotonic() > deadline:
                    raise RecipeError(f"no server answers at {address} ({job}:{index} in TF_CONFIG) after "
                                      f"{seconds:.0f} s: start `python -m common.plans.ps serve` there with its "
                                      "TF_CONFIG, or fix the address")
                time.sleep(0.5)


def _listening(address: str, timeout: float) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------ a local cluster on loopback
class LocalProcesses:
    """The worker and parameter-server children of a local cluster, their logs in `log_dir`."""

    def __init__(self, spec: dict[str, list[str]], log_dir: Path, threads: int):
        self.spec, self.log_dir, self.threads = spec, log_dir, threads
        self.children: dict[tuple[str, int], subprocess.Popen] = {}
        self.restarts = 0
        self.started_at: dict[tuple[str, int], float] = {}
        self.quick_exits = [0] * len(spec["worker"])
        self.failure: RecipeError | None = None  # set by the watcher when it gives up; the chief raises it
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        log_dir.mkdir(parents=True, exist_ok=True)
        for job in JOBS:
            for index in range(len(spec[job])):
                self._start(job, index)
        self._watch = threading.Thread(target=self._restart_dead_workers, name="ps-local-watch", daemon=True)
        self._watch.start()

    def _start(self, job: str, index: int) -> None:
        tf_config = json.dumps({"cluster": self.spec, "task": {"type": job, "index": index}})
        env = {**os.environ, "TF_CONFIG": tf_config, "PS_PARENT_PID": str(os.getpid()),
               "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        with open(self._log_path(job, index), "ab") as log:
            self.children[job, index] = subprocess.Popen(
                [sys.executable, "-m", "common.plans.ps", "serve", f"--intra_op_threads={self.threads}"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=Path(__file__).resolve().parents[2])
        self.started_at[job, index] = time.monotonic()

    def _log_path(self, job: str, index: int) -> Path:
        return self.log_dir / f"{job}-{index}.log"

    def _restart_dead_workers(self) -> None:
        """The watcher thread: every half second, `_restart_exited_workers`, until the cluster
        stops or the watcher gives up (`failure`). An error of its own ends it the same way:
        a watcher that died silently would leave the chief waiting for its workers for ever."""
        while self.failure is None and not self._stopping.wait(0.5):
            try:
                with self._lock:
                    self._restart_exited_workers()
            except Exception as error:  # any error: the chief must hear of it
                self.failure = RecipeError(
                    f"the local cluster's watcher failed ({type(error).__name__}: {error}): see the logs in "
                    f"{self.log_dir}, then restart the run (--resume goes on from the last checkpoint)")

    def _restart_exited_workers(self) -> None:
        """A worker that exits is started again on its port: TensorFlow's coordinator, which has
        moved its steps to the other workers, finds it there and gives it steps again. One that
        keeps exiting right after its start (QUICK_EXITS times) would never run a step: that
        is the run's `failure`."""
        for index, address in enumerate(self.spec["worker"]):
            code = self.children["worker", index].poll()
            if code is None or self._stopping.is_set():
                continue
            quick = time.monotonic() - self.started_at["worker", index] < QUICK_EXIT_SECONDS
            self.quick_exits[index] = self.quick_exits[index] + 1 if quick else 0
            if self.quick_exits[index] >= QUICK_EXITS:
                self.failure = RecipeError(
                    f"worker:{index} ({address}) exited {QUICK_EXITS} times within {QUICK_EXIT_SECONDS} s of "
                    f"starting (the last: {_exit_text(code)}): see {self._log_path('worker', index)}, fix what it "
                    "says, then restart the run (--resume goes on from the last checkpoint)")
                return
            print(f"ps: worker:{index} ({address}) exited ({_exit_text(code)}); starting it again",
                  file=sys.stderr, flush=True)
            self._start("worker", index)
            self.restarts += 1

    def check_servers(self) -> None:
        """RecipeError if the watcher gave up on a worker, or a parameter server has exited."""
        if self.failure is not None:
            raise self.failure
        for index in range(len(self.spec["ps"])):
            code = self.children["ps", index].poll()
            if code is not None:
                raise RecipeError(f"parameter server ps:{index} ({self.spec['ps'][index]}) exited "
                                  f"({_exit_text(code)}), "
                                  "and the variables it held with it: restart the run (with --resume to go on "
                                  "from the last checkpoint)")

    def check_started(self) -> None:
        """RecipeError if a child exited before it listened (a bad environment: its log says why)."""
        for (job, index), child in self.children.items():
            if child.poll() is not None:
                raise RecipeError(f"{job}:{index} of the local cluster exited at start "
                                  f"({_exit_text(child.returncode)}): see {self._log_path(job, index)}")

    def stop(self) -> None:
        """Kill every child and reap it (idempotent)."""
        self._stopping.set()
        with self._lock:
            for child in self.children.values():
                if child.poll() is None:
                    child.kill()
            for child in self.children.values():
                child.wait()


def _exit_text(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit code {code}"


def _free_ports(count: int) -> list[int]:
    import portpicker
    return [portpicker.pick_unused_port() for _ in range(count)]


@contextlib.contextmanager
def open_cluster(plan, log_dir: Path, threads: int):
    """The cluster of TF_CONFIG (this process its chief) if it is set, else a local one of the
    plan's workers and servers (`ps.PSPlan`), children with `threads` threads each; yields a
    `Cluster`. The children are killed on every way out of the block, errors included."""
    text = os.environ.get("TF_CONFIG")
    if text is not None:
        spec, _, _ = parse_tf_config(text)
        for key, job in (("workers", "worker"), ("servers", "ps")):
            if key in plan.named and getattr(plan, key) != len(spec[job]):
                raise ConfigError(f"--plan names {key}={getattr(plan, key)} but TF_CONFIG's cluster has "
                                  f"{len(spec[job])} {job} tasks: pass --plan=ps (TF_CONFIG then decides) or make "
                                  "them agree")
        wait_listening(spec)
        yield Cluster(spec)
        return
    ports = iter(_free_ports(1 + plan.workers + plan.servers))
    spec = {"chief": [f"localhost:{next(ports)}"],
            "worker": [f"localhost:{next(ports)}" for _ in range(plan.workers)],
            "ps": [f"localhost:{next(ports)}" for _ in range(plan.servers)]}
    processes = LocalProcesses(spec, log_dir, threads)
    try:
        wait_listening(spec, START_SECONDS, processes.check_started)
        yield Cluster(spec, processes)
    finally:
        processes.stop()


# ------------------------------------------------------------------ one server process
def serve(argv: list[str]) -> None:
    """`python -m common.plans.ps serve [--intra_op_threads=N]`: this host's task of the
    TF_CONFIG cluster, until killed (or, when a local cluster started it, until its parent
    exits)."""
    threads = 0
    for arg in argv:
        name, _, value = arg.partition("=")
        if name != "--intra_op_threads" or not value.isdigit():
            raise ConfigError(f"serve takes only --intra_op_threads=N, got {arg!r}")
        threads = int(value)
    text = os.environ.get("TF_CONFIG")
    if text is None:
        raise ConfigError("serve reads its task from TF_CONFIG, which is not set: set it as in "
                          "hostfiles/tf_config.worker0.json or tf_config.ps0.json (hostfiles/ps.md)")
    spec, task_type, task_index = parse_tf_config(text, role=None)
    if task_type not in JOBS:
        raise ConfigError(f"TF_CONFIG makes this process {task_type}:{task_index}: serve runs workers and ps tasks; "
                          "run the recipe itself as the chief")
    parent = os.environ.get("PS_PARENT_PID")
    if parent:
        threading.Thread(target=_exit_with_parent, args=(int(parent),), daemon=True).start()
    import tensorflow as tf
    from common.dist import configure_threads
    configure_threads(threads)
    server = tf.distribute.Server(tf.train.ClusterSpec(spec), job_name=task_type, task_index=task_index,
                                  protocol="grpc", start=True)
    print(f"ps: {task_type}:{task_index} serving at {spec[task_type][task_index]}", flush=True)
    server.join()


def _exit_with_parent(parent_pid: int) -> None:
    """End this process once its parent is gone (it is then re-parented): an orphaned server
    of a local cluster must not keep its port and cores."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(0)
