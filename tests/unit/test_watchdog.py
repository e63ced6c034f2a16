"""The stall watchdog's pure logic (addresses, datagrams, silence on an injected clock) and two
watchdogs talking over loopback in one process."""
import os
import socket
import threading
import time

import pytest

from common import watchdog
from common.config import TrainConfig, parse
from common.errors import ConfigError
from common.watchdog import BEAT, DONE, Endpoint, Silence, Watchdog, decode, destinations, encode, message

TOKEN = b"12345678"


def endpoint(rank, hostname="node1", addresses=("10.0.0.1",), port=5000):
    return Endpoint(rank, hostname, tuple(addresses), port, TOKEN)


# ------------------------------------------------------------------------------ addresses
def test_ranks_on_one_host_talk_over_loopback():
    assert destinations(endpoint(0), endpoint(1, port=6000)) == [("127.0.0.1", 6000)]


def test_network_namespaces_with_one_host_name_are_different_hosts():
    me = endpoint(0, addresses=("10.0.0.1",))
    peer = endpoint(1, addresses=("10.0.0.2", "10.1.0.2"), port=6000)
    assert destinations(me, peer) == [("10.0.0.2", 6000), ("10.1.0.2", 6000)]


def test_the_same_addresses_under_another_host_name_are_sent_to_directly():
    # Containers sharing the host's network under their own host names: sending to the peer's
    # address reaches it as well as loopback would.
    assert destinations(endpoint(0), endpoint(1, hostname="other", port=6000)) == [("10.0.0.1", 6000)]


def test_a_peer_without_other_addresses_is_reached_over_loopback():
    assert destinations(endpoint(0), endpoint(1, hostname="other", addresses=(), port=6000)) == [("127.0.0.1", 6000)]


def test_interface_addresses_leave_loopback_out():
    addresses = watchdog.interface_addresses()
    assert all(not a.startswith("127.") for a in addresses)
    assert all(socket.inet_aton(a) for a in addresses)


# ------------------------------------------------------------------------------ datagrams
def test_datagrams_round_trip_and_other_jobs_are_ignored():
    data = encode(TOKEN, 2, 12, DONE)
    assert decode(data, TOKEN, size=3) == (2, 12, DONE)
    assert decode(data, b"87654321", size=3) is None  # another job
    assert decode(data, TOKEN, size=2) is None  # a rank this job does not have
    assert decode(data[:-1], TOKEN, size=3) is None
    assert decode(b"", TOKEN, size=3) is None


# ------------------------------------------------------------------------------ silence
def test_a_peer_is_silent_only_after_the_timeout():
    silence = Silence([endpoint(1), endpoint(2)], timeout=30, now=100.0)
    assert silence.silent(129.0) == []
    silence.heard(1, 5, BEAT, "127.0.0.1", now=120.0)
    assert [p.endpoint.rank for p in silence.silent(131.0)] == [2]
    assert [p.endpoint.rank for p in silence.silent(151.0)] == [1, 2]
    assert silence.peers[1].step == 5 and silence.peers[1].source == "127.0.0.1"


def test_the_deadline_is_when_the_first_peer_still_running_exceeds_the_timeout():
    silence = Silence([endpoint(1), endpoint(2)], timeout=30, now=0.0)
    silence.heard(1, 1, BEAT, "127.0.0.1", now=10.0)
    assert silence.deadline() == 30.0  # rank 2, never heard since the start
    silence.heard(2, 1, DONE, "127.0.0.1", now=12.0)
    assert silence.deadline() == 40.0
    silence.heard(1, 1, DONE, "127.0.0.1", now=13.0)
    assert silence.deadline() == float("inf")


def test_a_peer_that_said_goodbye_is_never_silent():
    silence = Silence([endpoint(1)], timeout=30, now=0.0)
    silence.heard(1, 20, DONE, "127.0.0.1", now=10.0)
    silence.heard(1, 20, BEAT, "127.0.0.1", now=11.0)  # a late heartbeat does not undo it
    assert silence.silent(1000.0) == []


def test_time_this_rank_did_not_watch_is_not_counted():
    silence = Silence([endpoint(1)], timeout=30, now=0.0)
    silence.unwatched(100.0)
    assert silence.silent(120.0) == []
    assert silence.silent(131.0)


def test_heartbeats_of_unknown_ranks_are_ignored():
    silence = Silence([endpoint(1)], timeout=30, now=0.0)
    silence.heard(7, 3, BEAT, "10.0.0.9", now=1.0)
    assert set(silence.peers) == {1}


def test_the_message_names_the_rank_its_host_its_address_and_the_steps():
    silence = Silence([endpoint(1, hostname="node2", addresses=("10.0.0.2",))], timeout=30, now=0.0)
    silence.heard(1, 12, BEAT, "10.0.0.2", now=5.0)
    text = message(silence.silent(35.5), 35.5, own_step=12, timeout=30)
    assert text == ("rank 1 on host node2 (10.0.0.2) sent no heartbeat for 30 s (its last step 12, this "
                    "rank's 12): it is frozen or cut off; ending the job (--stall_timeout=30)")
    assert "\n" not in text


def test_the_message_names_every_silent_rank():
    peers = [endpoint(1, "node2", ("10.0.0.2",)), endpoint(2, "node3", ("10.0.0.3",))]
    silence = Silence(peers, timeout=30, now=0.0)
    silence.heard(2, 11, BEAT, "10.0.0.3", now=1.0)
    text = message(silence.silent(40.0), 40.0, own_step=12, timeout=30)
    # rank 1 never sent: its address is the one it listed
    assert "rank 1 on host node2 (10.0.0.2), last step 0" in text
    assert "rank 2 on host node3 (10.0.0.3), last step 11" in text
    assert "this rank's step 12" in text and "they are frozen or cut off" in text


# ------------------------------------------------------------------------------ two threads
def pair(timeout=1.0, interval=0.1, **rank0):
    """Two watchdogs (ranks 0 and 1) on loopback; rank 0's stall reports are collected
    (unless `rank0` passes its own `on_stall`)."""
    socks = []
    for _ in range(2):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        socks.append(sock)
    ends = [Endpoint(rank, "node1", ("10.0.0.1",), sock.getsockname()[1], TOKEN) for rank, sock in enumerate(socks)]
    reports = []
    reported = threading.Event()

    def on_stall(text):
        reports.append(text)
        reported.set()

    options = [{"on_stall": on_stall, **rank0}, {"on_stall": lambda text: None}]
    dogs = [Watchdog(socks[rank], ends[rank], [ends[1 - rank]], TOKEN, 2, timeout, interval, **options[rank])
            for rank in range(2)]
    return dogs, reports, reported


def test_a_rank_that_falls_silent_is_reported_within_the_timeout():
    (first, second), reports, reported = pair()
    first.start(), second.start()
    try:
        for step in range(1, 4):
            first.progress(step)
            second.progress(step)
            time.sleep(0.05)
        time.sleep(0.3)
        assert first.silence.peers[1].step == 3
        started = time.monotonic()
        second.stop(goodbye=False)  # as if frozen: no more heartbeats
        assert reported.wait(3)
        assert 0.9 < time.monotonic() - started < 1.5
        assert reports[0].startswith("rank 1 on host node1 (127.0.0.1) sent no heartbeat for 1 s (its last step 3, "
                                     "this rank's 3)")
    finally:
        first.stop(), second.stop()


def test_under_elastic_horovod_a_silent_rank_gets_a_warning_and_this_process_goes_on(capfd):
    # A survivor of a lost worker must live to reset: its own collective may fail only after
    # Gloo's timeout, and later on a busy host.
    (first, second), _, _ = pair(ends_job=False, on_stall=None)
    first.start(), second.start()
    try:
        time.sleep(0.3)
        second.stop(goodbye=False)
        time.sleep(3)  # the report comes after 1 s, and the thread ends
        assert not first._thread.is_alive()
        line = capfd.readouterr().err
        assert line.startswith("warning: rank 1 on host node1 (127.0.0.1) sent no heartbeat for 1 s")
        assert "lost, frozen or cut off; Horovod Elastic goes on without a lost worker" in line
        assert line.count("\n") == 1
        # Where this rank waits (the main thread: here, this test's sleep).
        assert "this rank's main thread is in tests/unit/test_watchdog.py:" in line
    finally:
        first.stop()


def test_a_rank_that_finished_is_not_reported():
    (first, second), reports, reported = pair()
    first.start(), second.start()
    try:
        time.sleep(0.3)
        second.stop(goodbye=True)
        assert not reported.wait(2)
        assert reports == []
    finally:
        first.stop()


def test_stop_returns_at_once_and_ends_the_thread():
    (first, second), _, _ = pair(timeout=10, interval=2)
    first.start(), second.start()
    time.sleep(0.1)
    started = time.monotonic()
    first.stop(), second.stop()
    assert time.monotonic() - started < 0.5
    assert not first._thread.is_alive() and not second._thread.is_alive()


def test_nothing_is_watched_for_one_process_or_timeout_zero():
    def gather(obj):
        raise AssertionError("no exchange needed")
    assert watchdog.start(0, 1, gather, 60) is None
    assert watchdog.start(0, 2, gather, 0) is None
    watchdog.progress(5)  # no watchdog: a no-op


# ------------------------------------------------------------------------------ the flag
def test_the_flag_defaults_to_a_minute_and_takes_zero_but_not_less():
    assert parse(TrainConfig, []).stall_timeout == 60
    assert parse(TrainConfig, ["--stall_timeout=0"]).stall_timeout == 0
    with pytest.raises(ConfigError, match="--stall_timeout must be >= 0"):
        parse(TrainConfig, ["--stall_timeout=-1"])


def test_horovod_limits_follow_the_flag_and_a_users_values_win(monkeypatch):
    from common.dist import _set_stall_limits
    for name in ("HOROVOD_STALL_CHECK_TIME_SECONDS", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS",
                 "HOROVOD_GLOO_TIMEOUT_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "600")
    _set_stall_limits(45)
    assert os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"] == "23"  # checked every half timeout
    assert os.environ["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == "600"
    assert os.environ["HOROVOD_GLOO_TIMEOUT_SECONDS"] == "75"
    monkeypatch.delenv("HOROVOD_STALL_CHECK_TIME_SECONDS")
    _set_stall_limits(0)
    assert "HOROVOD_STALL_CHECK_TIME_SECONDS" not in os.environ
