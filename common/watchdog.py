"""No silent hang when a rank stalls: every process of a job hears from every other one, and a
rank that goes quiet for longer than `--stall_timeout` ends the job with one line naming it.

Why heartbeats, and why on their own thread and socket. A rank that is stopped (a frozen node,
a stuck driver, a lost link) leaves the others waiting forever: in a collective, Horovod's
coordinator itself waits for the frozen rank in the negotiation, so its stall inspector never
runs and prints nothing; Open MPI neither notices nor times out; only Gloo's own operation
timeout ends a Gloo job, with a traceback that does not say which rank froze. A rank that is
killed is a different case: its launcher sees it die and stops the others at once. So what
needs checking is liveness, not speed: each process runs a daemon thread that sends a small UDP
datagram (the job's token, its rank and the last step it completed) to every peer every couple
of seconds and right after each step (rate-limited), and reads theirs. The thread runs whatever
the main thread does (tracing, building data, decoding, writing a checkpoint, waiting in a
collective), so a long step never trips it; a process that is stopped or cut off falls silent,
and each survivor, after `--stall_timeout` seconds without a datagram from it, prints `error:
rank N on host NAME (ADDRESS) sent no heartbeat ...` (ADDRESS: where its datagrams came from)
and exits non-zero from the thread (`os._exit`: the main thread is stuck in a collective and
cannot be unwound). The launcher then stops what is left. UDP because it needs no connection
set-up, cannot block the sender, and a lost datagram only matters if every one in the timeout
window is lost.

Addresses are exchanged once, right after Horovod starts, through the host-side gather every
rank takes part in (`common.dist` calls `start`). Traffic only ever goes to loopback or to a
peer's own addresses: ranks on one host (the same host name and the same set of interface
IPv4 addresses: network namespaces on one machine share a host name but not their addresses)
talk over 127.0.0.1, ranks on different hosts send to every non-loopback IPv4 address the peer
listed. Datagrams carrying another job's token are ignored.

A process that ends normally says goodbye (a final "done" datagram, at interpreter exit), so
peers finishing a little apart are never reported; a peer still evaluating keeps sending. If
this process's own thread did not run for a while, that time is not counted against its peers.

Horovod's stall inspector covers the other stall, a live rank that never joins a collective
(its process runs, so its heartbeats keep coming): `common.dist` sets
HOROVOD_STALL_SHUTDOWN_TIME_SECONDS to the timeout and HOROVOD_STALL_CHECK_TIME_SECONDS to half
of it (a user's values win), which makes the coordinator name the missing ranks and shut
Horovod down, ending the job; it works with Horovod's MPI controller, not under Gloo. It also
means that chief-only work that keeps the others waiting (writing a checkpoint of a large
model) must fit in `--stall_timeout`. Outside elastic runs Gloo's own operation timeout is
raised above the timeout (a user's value wins), so that this module's message, which names the
rank, comes first.

Every rank sends to every other one: a job of N processes sends N - 1 datagrams per rank and
interval, a few dozen bytes each.

Under elastic Horovod (`common.dist.run_elastic`) a dead worker is replaced, not fatal: the
watchdog is stopped when a reset begins and started again over the new ring once it is formed,
and a silent peer gets a warning line, not the end of the job. A survivor reaches its reset
only once a collective fails, which for one whose pending receive was from another survivor
is Gloo's operation timeout, and later still on a busy host: ending it there would take a
second worker out of the job (under `--min-np`, the whole job then waits for hosts). A frozen
worker ends nothing either way: Horovod Elastic's driver waits for every worker of the old
ring to re-register or exit, and a frozen one does neither.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import secrets
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

INTERVAL = 2.0  # seconds between heartbeats (shorter for timeouts under 5 intervals)
# A completed step is sent at once unless a heartbeat left less than this long ago, per
# destination: sending (microseconds per datagram) then costs the main thread about 1% of its time.
PROMPT_PER_DESTINATION = 0.001
LOOPBACK = "127.0.0.1"

_DATAGRAM = struct.Struct("!4s8sIqB")  # magic, job token, sender's rank, its last step, kind
_MAGIC = b"hvdw"
BEAT, DONE = 0, 1


# ----------------------------------------------------------------------------- pure logic
@dataclasses.dataclass(frozen=True)
class Endpoint:
    """What a rank tells the others at start-up: where its heartbeats can reach it."""

    rank: int
    hostname: str
    addresses: tuple[str, ...]  # its non-loopback interface IPv4 addresses
    port: int
    token: bytes

    def as_dict(self) -> dict[str, Any]:  # plain values for the gather
        return dataclasses.asdict(self)


def same_host(a: Endpoint, b: Endpoint) -> bool:
    """One host: the same host name and the same interface addresses (network namespaces on
    one machine share a host name, not their addresses)."""
    return a.hostname == b.hostname and set(a.addresses) == set(b.addresses)


def destinations(me: Endpoint, peer: Endpoint) -> list[tuple[str, int]]:
    """Where this rank sends `peer` its heartbeats: loopback on the same host (or if the peer
    listed no other address), else each of the peer's own addresses."""
    if same_host(me, peer) or not peer.addresses:
        return [(LOOPBACK, peer.port)]
    return [(address, peer.port) for address in peer.addresses]


def encode(token: bytes, rank: int, step: int, kind: int = BEAT) -> bytes:
    return _DATAGRAM.pack(_MAGIC, token, rank, step, kind)


def decode(data: bytes, token: bytes, size: int) -> tuple[int, int, int] | None:
    """(rank, step, kind) of a heartbeat of this job; None for anything else."""
    if len(data) != _DATAGRAM.size:
        return None
    magic, sender_token, rank, step, kind = _DATAGRAM.unpack(data)
    if magic != _MAGIC or sender_token != token or rank >= size or kind not in (BEAT, DONE):
        return None
    return rank, step, kind


@dataclasses.dataclass
class Peer:
    endpoint: Endpoint
    last_heard: float
    step: int = 0
    source: str | None = None  # the address its heartbeats came from
    done: bool = False

    @property
    def address(self) -> str:
        return self.source or (self.endpoint.addresses[0] if self.endpoint.addresses else LOOPBACK)


class Silence:
    """Who has been quiet for how long, on a clock the caller passes in (seconds)."""

    def __init__(self, peers: Sequence[Endpoint], timeout: float, now: float):
        self.timeout = timeout
        self.peers = {p.rank: Peer(p, now) for p in peers}

    def heard(self, rank: int, step: int, kind: int, source: str, now: float) -> None:
        peer = self.peers.get(rank)
        if peer is None:
            return
        peer.last_heard, peer.step, peer.source = now, step, source
        peer.done = peer.done or kind == DONE

    def unwatched(self, seconds: float) -> None:
        """This process did not watch for `seconds` (its thread did not run): not the peers' silence."""
        for peer in self.peers.values():
            peer.last_heard += seconds

    def deadline(self) -> float:
        """When the first peer not finished will have been silent for longer than the timeout."""
        return min((peer.last_heard + self.timeout for peer in self.peers.values() if not peer.done),
                   default=float("inf"))

    def silent(self, now: float) -> list[Peer]:
        """The peers, not finished, that sent nothing for longer than the timeout."""
        return [peer for rank, peer in sorted(self.peers.items())
                if not peer.done and now - peer.last_heard > self.timeout]


def message(silent: Sequence[Peer], now: float, own_step: int, timeout: float, ends_job: bool = True) -> str:
    """The one line a survivor prints (without the `error: ` or `warning: ` prefix)."""
    seconds = int(max(now - peer.last_heard for peer in silent))
    where = [f"rank {p.endpoint.rank} on host {p.endpoint.hostname} ({p.address})" for p in silent]
    if len(silent) == 1:
        who = f"{where[0]} sent no heartbeat for {seconds} s (its last step {silent[0].step}, this rank's {own_step})"
        what = "it is"
    else:
        listed = ", ".join(f"{w}, last step {p.step}," for w, p in zip(where, silent))
        who = f"{listed} sent no heartbeat for {seconds} s (this rank's step {own_step})"
        what = "they are"
    if ends_job:
        return f"{who}: {what} frozen or cut off; ending the job (--stall_timeout={timeout:g})"
    return (f"{who}: {what} lost, frozen or cut off; Horovod Elastic goes on without a lost worker once a "
            f"collective times out, and waits for a frozen one (--stall_timeout={timeout:g})")


def interface_addresses() -> tuple[str, ...]:
    """This host's IPv4 interface addresses, loopback left out."""
    import psutil
    found = {address.address for addresses in psutil.net_if_addrs().values() for address in addresses
             if address.family == socket.AF_INET and not address.address.startswith("127.")}
    return tuple(sorted(found))


# ----------------------------------------------------------------------------- the thread
class Watchdog:
    """Heartbeats to and from the peers of one job, on a daemon thread."""

    def __init__(self, sock: socket.socket, me: Endpoint, peers: Sequence[Endpoint], token: bytes,
                 size: int, timeout: float, interval: float, clock: Callable[[], float] = time.monotonic,
                 ends_job: bool = True, on_stall: Callable[[str], None] | None = None):
        self.sock, self.me, self.token, self.size = sock, me, token, size
        self.timeout, self.interval, self.clock, self.ends_job = timeout, interval, clock, ends_job
        # Given the message: by default ends the process, or (elastic) warns.
        self.on_stall = on_stall or (_end_job if ends_job else _warn)
        self.targets = [address for peer in peers for address in destinations(me, peer)]
        self.prompt = PROMPT_PER_DESTINATION * len(self.targets)
        self.silence = Silence(peers, timeout, clock())
        self.step = 0
        self._sent_at = -float("inf")
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def progress(self, step: int) -> None:
        """Called by the main thread after each step: a heartbeat right away (at most one per
        `prompt` seconds), so that the step a peer last heard is this rank's last one."""
        self.step = step
        now = self.clock()
        if now - self._sent_at >= self.prompt and not self._stopped.is_set():
            self._beat(now)

    def _beat(self, now: float) -> None:
        self._sent_at = now
        self._send(BEAT)

    def stop(self, goodbye: bool = True) -> None:
        """End the thread; with `goodbye`, tell the peers this rank finished (not stalled)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            try:  # wake the thread from its wait: an empty datagram to this rank's own socket
                self.sock.sendto(b"", (LOOPBACK, self.me.port))
            except OSError:
                pass
            self._thread.join(timeout=1)
        if goodbye:
            for _ in range(3):  # a lost datagram must not leave a finished rank looking stalled
                self._send(DONE)
        self.sock.close()

    def _send(self, kind: int) -> None:
        data = encode(self.token, self.me.rank, self.step, kind)
        for address in self.targets:
            try:
                self.sock.sendto(data, address)
            except OSError:  # an unreachable address of a peer that has others
                pass

    def _receive(self, wait: float) -> None:
        """Wait up to `wait` seconds for datagrams, then read all that are queued."""
        try:
            ready, _, _ = select.select([self.sock], [], [], max(wait, 0.0))
        except (OSError, ValueError):  # closed by stop()
            return
        while ready and not self._stopped.is_set():
            try:
                data, (source, _) = self.sock.recvfrom(64)
            except OSError:  # nothing more queued (a non-blocking socket), or closed
                return
            heard = decode(data, self.token, self.size)
            if heard and heard[0] != self.me.rank:
                self.silence.heard(*heard, source, self.clock())

    def _run(self) -> None:
        last = self.clock()
        while not self._stopped.is_set():
            now = self.clock()
            if now - last > 3 * self.interval:  # this thread did not run meanwhile
                self.silence.unwatched(now - last - self.interval)
            last = now
            if now >= self._sent_at + self.interval:
                self._beat(now)
            # Wake for the next heartbeat, or just after a peer's silence exceeds the timeout.
            self._receive(min(self._sent_at + self.interval, self.silence.deadline() + 0.01) - now)
            silent = self.silence.silent(self.clock())
            if silent and not self._stopped.is_set():
                self.on_stall(message(silent, self.clock(), self.step, self.timeout, self.ends_job))
                return


def _end_job(text: str) -> None:
    """Print the line and end the process, from this thread, whatever the main thread holds:
    the line goes straight to the file descriptor (no lock a stuck thread may hold), and an
    alarm ends the process should even that block."""
    signal.alarm(10)
    try:
        os.write(2, f"error: {text}\n".encode())
    finally:
        os._exit(1)


def _warn(text: str) -> None:
    os.write(2, f"warning: {text}; this rank's main thread is in {main_thread_place()}\n".encode())


def main_thread_place() -> str:
    """Where the main thread is: its innermost frame in this project, then its innermost."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "no frame"
    stack = traceback.extract_stack(frame)
    project = Path(__file__).resolve().parents[1]
    ours = [f for f in stack if Path(f.filename).is_relative_to(project)]
    places = ours[-1:]
    if stack[-1] not in places:
        places.append(stack[-1])
    return ", at ".join(f"{_short(f.filename, project)}:{f.lineno} {f.name}" for f in places)


def _short(filename: str, project: Path) -> str:
    path = Path(filename)
    if path.is_relative_to(project):
        return str(path.relative_to(project))
    parts = path.parts  # a library's file: from its package (or the standard library's) on
    start = parts.index("site-packages") + 1 if "site-packages" in parts else -2
    return str(Path(*parts[start:]))


# ----------------------------------------------------------------------------- the process's one
_active: Watchdog | None = None


def start(rank: int, size: int, gather: Callable[[Any], list], timeout: float,
          elastic: bool = False) -> Watchdog | None:
    """Start watching the job's other processes (call on every rank: `gather(obj)` must return
    every rank's `obj` in rank order). Nothing to watch for one process or `timeout` 0. Under
    elastic Horovod a silent peer is reported, not fatal (the module's docstring says why)."""
    global _active
    stop()
    if size <= 1 or timeout <= 0:
        return None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))  # peers send to 127.0.0.1 or to one of this host's addresses
    sock.setblocking(False)
    me = Endpoint(rank, socket.gethostname(), interface_addresses(), sock.getsockname()[1], secrets.token_bytes(8))
    endpoints = [Endpoint(**parts) for parts in gather(me.as_dict())]
    peers = [endpoint for endpoint in endpoints if endpoint.rank != rank]
    _active = Watchdog(sock, me, peers, endpoints[0].token, size, timeout,
                       interval=min(INTERVAL, timeout / 5), ends_job=not elastic).start()
    return _active


def progress(step: int) -> None:
    """The step this rank just completed (what its heartbeats report)."""
    if _active is not None:
        _active.progress(step)


def stop(goodbye: bool = True) -> None:
    """Stop this process's watchdog, if any (at exit; elastic: before watching a new set of peers)."""
    global _active
    if _active is not None:
        _active.stop(goodbye)
        _active = None


atexit.register(stop)
