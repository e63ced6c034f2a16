"""Several "hosts" on one machine: Linux network namespaces, each with its own address on a veth
link to one bridge (a "switch" namespace), and its own sshd that takes root logins by a key made
for the run. Multi-host launches (`horovodrun -H`, `mpirun --hostfile`) and link failures can
then be tried for real, as root, without a cluster.

    python scripts/netns_hosts.py up DIR --hosts 2     # make them; DIR gets keys, configs, hostfiles
    python scripts/netns_hosts.py run DIR 1 -- horovodrun -np 2 -H ADDR1:1,ADDR2:1 python ...
    python scripts/netns_hosts.py cut DIR 2            # pull host 2's cable (mend DIR 2 puts it back)
    python scripts/netns_hosts.py down DIR             # remove every namespace, link and sshd

and in tests:

    with virtual_hosts(tmp_dir, count=2) as hosts:
        hosts[0].run([...], env=hosts.env())          # a command "on" host 1

Only the namespaces see the addresses (a documentation range by default, RFC 5737): the hosts
have no route but their own subnet and loopback, nothing is forwarded or translated, and
nothing touches the machine's own interfaces. The namespaces share the machine's hostname and
filesystem: the repository and its virtual environment are at the same paths on every host.

ssh between the hosts needs no prompt and leaves the user's ~/.ssh alone: `DIR/ssh_config` holds
the key, the hosts' public keys and keep-alives, and `DIR/bin/ssh` runs ssh with it. Launchers
that call `ssh` from PATH (horovodrun, Open MPI's `plm_rsh_agent` default) use it when
`DIR/bin` comes first on PATH (`VirtualHosts.env`).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

PREFIX = "hvdnet"  # every namespace this module makes is named "hvdnet-..."
SWITCH = f"{PREFIX}-sw"
SUBNET = "198.51.100.0/24"  # TEST-NET-2: a documentation range, never routed anywhere
IFACE = "net0"  # each host's end of its link (the same name on every host, as launchers expect)
BRIDGE = "br0"
SSHD = "/usr/sbin/sshd"
SSH = shutil.which("ssh") or "/usr/bin/ssh"
LOCK = Path(tempfile.gettempdir()) / f"{PREFIX}.lock"
STATE = "hosts.json"
# ssh gives a silent peer up after 10 s x 3: later than a job's own stall detection with a
# shorter timeout, sooner than TCP's retransmissions (minutes).
KEEPALIVE = (10, 3)
ETC_NETNS = Path("/etc/netns")  # `ip netns exec NAME` mounts ETC_NETNS/NAME/hosts over /etc/hosts


class Unavailable(RuntimeError):
    """Namespaces, veths or sshd cannot be made here (not root, no CAP_NET_ADMIN, no binary)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def _netns_names() -> list[str]:
    done = _ip("-j", "netns", "list", check=False)
    if done.returncode != 0 or not done.stdout.strip():
        return []
    return [entry["name"] for entry in json.loads(done.stdout)]


def netns_pids(netns: str) -> list[int]:
    """Every process whose network namespace is `netns`."""
    done = _ip("netns", "pids", netns, check=False)
    return [int(pid) for pid in done.stdout.split()] if done.returncode == 0 else []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pids(pids: Sequence[int], grace: float = 3.0) -> None:
    """SIGTERM the processes, then SIGKILL those still running after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = [pid for pid in pids if _alive(pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)


def _remove_netns(names: Sequence[str]) -> None:
    """Stop every process inside the namespaces, then delete them (which deletes their veths)
    and their /etc files."""
    stop_pids([pid for name in names for pid in netns_pids(name)])
    for name in names:
        _ip("netns", "del", name, check=False)
        shutil.rmtree(ETC_NETNS / name, ignore_errors=True)


def clean_leftovers() -> list[str]:
    """Remove every namespace of this module still present (from a run that crashed or a
    `up` without `down`), and their /etc files; returns their names."""
    names = [name for name in _netns_names() if name.startswith(f"{PREFIX}-")]
    _remove_netns(names)
    for folder in ETC_NETNS.glob(f"{PREFIX}-*"):
        shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        ETC_NETNS.rmdir()  # only if empty: made by `up` when no other namespace had files
    return names


@contextlib.contextmanager
def _exclusive(wait: float = 0.0) -> Iterator[None]:
    """Only one user of the namespaces at a time, waiting up to `wait` s for another to finish:
    a second one fails instead of tearing the first one's hosts down as leftovers."""
    with open(LOCK, "a") as lock:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"another process holds {LOCK}: its virtual hosts are in use") from None
                time.sleep(1.0)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def unavailable_reason() -> str | None:
    """Why virtual hosts cannot be made here, or None when they can (checked by making and
    removing one empty namespace)."""
    for tool in ("ip", "ssh-keygen", SSHD, SSH):
        if not shutil.which(tool):
            return f"{tool} not found (Debian packages iproute2, openssh-client, openssh-server)"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    probe = f"{PREFIX}-probe{os.getpid()}"
    done = _ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"cannot make a network namespace: {done.stderr.strip()}"
    try:
        done = _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1", check=False)
        if done.returncode != 0:
            return f"cannot make a veth link in a namespace: {done.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _check_subnet(subnet: ipaddress.IPv4Network) -> None:
    """Refuse a subnet that the machine itself uses: the hosts' traffic must stay theirs."""
    used = []
    for entry in json.loads(_ip("-j", "-4", "addr", "show").stdout or "[]"):
        for info in entry.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for route in json.loads(_ip("-j", "-4", "route", "show").stdout or "[]"):
        if route.get("dst") not in (None, "default"):
            used.append(ipaddress.ip_network(route["dst"], strict=False))
    clashes = [str(net) for net in used if net.overlaps(subnet)]
    if clashes:
        raise RuntimeError(f"subnet {subnet} overlaps this machine's own {', '.join(clashes)}: pick another")


def _private_dir(path: Path) -> Path:
    """`path`, made if need be, owned by this user and closed to everyone else (the private
    keys live there, and sshd is told not to check the world-writable folders above it)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    info = path.stat()
    if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise RuntimeError(f"{path} must be owned by this user and closed to others")
    return path


@dataclass
class Host:
    """One virtual host: a namespace with one link to the switch."""

    index: int  # 1-based, as in the names
    netns: str
    address: str
    iface: str = IFACE
    port: str = ""  # the switch's end of this host's link
    switch: str = SWITCH

    def argv(self, command: Sequence[str]) -> list[str]:
        """`command` as run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *command]

    def run(self, command: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.argv(command), **kwargs)

    def popen(self, command: Sequence[str], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.argv(command), **kwargs)

    def cut(self) -> None:
        """Pull the cable at the switch: the host's port goes down, its own interface loses
        carrier, and packets either way vanish without an error."""
        _ip("-n", self.switch, "link", "set", self.port, "down")

    def mend(self) -> None:
        _ip("-n", self.switch, "link", "set", self.port, "up")

    def link_counters(self) -> dict[str, int]:
        """The packets and bytes this host's interface has received and sent."""
        entry = json.loads(_ip("-n", self.netns, "-j", "-s", "link", "show", "dev", self.iface).stdout)[0]
        stats = entry["stats64"]
        return {"rx_bytes": stats["rx"]["bytes"], "rx_packets": stats["rx"]["packets"],
                "tx_bytes": stats["tx"]["bytes"], "tx_packets": stats["tx"]["packets"]}

    def pids(self) -> list[int]:
        return netns_pids(self.netns)


@dataclass
class VirtualHosts:
    """The hosts of one run and the files that let ssh reach them."""

    directory: Path
    hosts: list[Host]
    sshd_pids: dict[str, int] = field(default_factory=dict)  # namespace -> its sshd daemon

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    @property
    def addresses(self) -> list[str]:
        return [host.address for host in self.hosts]

    @property
    def ssh_config(self) -> Path:
        return self.directory / "ssh_config"

    @property
    def bin_dir(self) -> Path:
        """Holds `ssh`, which runs the real ssh with `ssh_config`."""
        return self.directory / "bin"

    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        """`base` (this process's environment by default) with `bin_dir` first on PATH."""
        env = dict(os.environ if base is None else base, **extra)
        env["PATH"] = f"{self.bin_dir}:{env.get('PATH', os.defpath)}"
        return env

    def ssh_argv(self, host: Host, command: Sequence[str]) -> list[str]:
        return [SSH, "-F", str(self.ssh_config), host.address, shlex.join(command)]

    def horovodrun_hosts(self, slots: int = 1) -> str:
        """The `horovodrun -H` value: "ADDR1:1,ADDR2:1"."""
        return ",".join(f"{address}:{slots}" for address in self.addresses)

    def write_hostfile(self, path: Path, slots: int = 1) -> Path:
        """A hostfile, "ADDRESS slots=N" per line, the form both horovodrun and mpirun read."""
        path.write_text("".join(f"{address} slots={slots}\n" for address in self.addresses))
        return path

    def job_pids(self) -> list[int]:
        """Every process in the hosts' namespaces but their sshd daemons: what is left of jobs."""
        daemons = set(self.sshd_pids.values())
        return [pid for host in self.hosts for pid in host.pids() if pid not in daemons]

    def stop_jobs(self, grace: float = 3.0) -> list[int]:
        """Mend every link, then stop whatever jobs left behind; returns their pids."""
        for host in self.hosts:
            host.mend()
        left = self.job_pids()
        stop_pids(left, grace)
        return left

    def save(self) -> None:
        state = {"hosts": [vars(host) for host in self.hosts], "sshd_pids": self.sshd_pids}
        (self.directory / STATE).write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, directory: Path) -> VirtualHosts:
        state = json.loads((directory / STATE).read_text())
        return cls(directory, [Host(**host) for host in state["hosts"]], state["sshd_pids"])


SSHD_CONFIG = """\
# One sshd per virtual host (ListenAddress, HostKey, PidFile given on its command line).
Port 22
AddressFamily inet
AuthorizedKeysFile {directory}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# The keys sit in a folder closed to others, below /tmp, which StrictModes would refuse.
StrictModes no
AllowTcpForwarding no
AllowAgentForwarding no
X11Forwarding no
PermitTunnel no
PrintMotd no
MaxStartups 64
# A client gone silent (its link cut) is dropped after {alive_interval} s x {alive_count}.
ClientAliveInterval {alive_interval}
ClientAliveCountMax {alive_count}
LogLevel VERBOSE
"""

SSH_CONFIG = """\
# ssh to the virtual hosts: this key, these host keys, no prompt, nothing in ~/.ssh.
Host *
  User root
  IdentityFile {directory}/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile {directory}/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  UpdateHostKeys no
  BatchMode yes
  PasswordAuthentication no
  ConnectTimeout 10
  # A server gone silent (its link cut) is given up after {alive_interval} s x {alive_count}: a
  # launcher then ends instead of waiting out TCP's minutes on a dead link.
  ServerAliveInterval {alive_interval}
  ServerAliveCountMax {alive_count}
  LogLevel ERROR
"""


def _keygen(path: Path, comment: str) -> str:
    """A new ed25519 key pair at `path`; returns the public key ("type base64")."""
    for old in (path, path.with_name(path.name + ".pub")):
        old.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return " ".join(path.with_name(path.name + ".pub").read_text().split()[:2])


def _write_ssh_files(directory: Path, hosts: Sequence[Host], keepalive: tuple[int, int]) -> None:
    client_key = _keygen(directory / "id_ed25519", "virtual-hosts-client")
    (directory / "authorized_keys").write_text(client_key + "\n")
    known = []
    for host in hosts:
        host_dir = _private_dir(directory / host.netns)
        known.append(f"{host.address} {_keygen(host_dir / 'ssh_host_ed25519_key', host.netns)}\n")
    (directory / "known_hosts").write_text("".join(known))
    alive = {"alive_interval": keepalive[0], "alive_count": keepalive[1]}
    (directory / "sshd_config").write_text(SSHD_CONFIG.format(directory=directory, **alive))
    (directory / "ssh_config").write_text(SSH_CONFIG.format(directory=directory, **alive))
    wrapper = _private_dir(directory / "bin") / "ssh"
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(SSH)} -F {shlex.quote(str(directory / 'ssh_config'))} \"$@\"\n")
    wrapper.chmod(0o700)


def _write_hosts_file(host: Host, hosts: Sequence[Host]) -> None:
    """Inside a host, the machine's hostname (which every host shares) names that host's own
    address, as on a cluster; the other hosts' namespace names resolve too. Without this the
    hostname would resolve to loopback, and whatever binds to "this host's address" (Gloo
    contexts of Horovod's process sets) would bind there."""
    folder = ETC_NETNS / host.netns
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["127.0.0.1 localhost", f"{host.address} {socket.gethostname()} {host.netns}"]
    lines += [f"{other.address} {other.netns}" for other in hosts if other is not host]
    (folder / "hosts").write_text("\n".join(lines) + "\n")


def _start_sshd(directory: Path, host: Host, timeout: float = 10.0) -> int:
    host_dir = directory / host.netns
    pid_file = host_dir / "sshd.pid"
    pid_file.unlink(missing_ok=True)
    # sshd's privilege-separation folder (made by the ssh service where one runs).
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    host.run([SSHD, "-f", str(directory / "sshd_config"), "-E", str(host_dir / "sshd.log"),
              "-o", f"ListenAddress={host.address}", "-o", f"PidFile={pid_file}",
              "-o", f"HostKey={host_dir / 'ssh_host_ed25519_key'}"], check=True, capture_output=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(pid_file.read_text())
        time.sleep(0.05)
    raise RuntimeError(f"sshd on {host.netns} wrote no pid file; see {host_dir / 'sshd.log'}")


def _wait_for_ssh(hosts: VirtualHosts, timeout: float = 20.0) -> None:
    """Every host reaches every host (itself too) by ssh, with no prompt."""
    deadline = time.monotonic() + timeout
    for source in hosts:
        for target in hosts:
            while True:
                done = source.run(hosts.ssh_argv(target, ["true"]), capture_output=True, text=True)
                if done.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ssh from {source.address} to {target.address} failed: "
                                       f"{done.stderr.strip()}")
                time.sleep(0.2)


def up(directory: Path | str, count: int = 2, subnet: str = SUBNET,
       keepalive: tuple[int, int] = KEEPALIVE, tcp_retries2: int | None = None) -> VirtualHosts:
    """Make `count` hosts (after removing any left over), their links, keys and sshds; their
    files go to `directory`. ssh on both ends gives a silent peer up after `keepalive`
    (seconds between probes, probes). `tcp_retries2`, if given, is the hosts' own
    net.ipv4.tcp_retries2: how many retransmissions TCP sends to a silent peer before the
    connection fails (Linux's 15 take about 15 minutes; each one more doubles the wait, from
    0.2 s on these links, up to 2 minutes apiece). Undone by `down`, also halfway."""
    if not 1 <= count <= 3:
        raise ValueError("1 to 3 hosts")
    reason = unavailable_reason()
    if reason:
        raise Unavailable(reason)
    network = ipaddress.ip_network(subnet)
    _check_subnet(network)
    directory = _private_dir(Path(directory).resolve())
    clean_leftovers()
    addresses = list(network.hosts())[:count]
    hosts = VirtualHosts(directory, [Host(i, f"{PREFIX}-h{i}", str(addresses[i - 1]), port=f"port{i}")
                                     for i in range(1, count + 1)])
    hosts.save()
    try:
        for netns in [SWITCH] + [host.netns for host in hosts]:
            _ip("netns", "add", netns)
            # IPv4 only: no link-local IPv6 chatter; loopback up for local connections.
            subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w",
                            "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
                           capture_output=True, check=False)
            _ip("-n", netns, "link", "set", "lo", "up")
        if tcp_retries2 is not None:
            for host in hosts:
                host.run(["sysctl", "-q", "-w", f"net.ipv4.tcp_retries2={int(tcp_retries2)}"],
                         check=True, capture_output=True)
        _ip("-n", SWITCH, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", SWITCH, "link", "set", BRIDGE, "up")
        for host in hosts:
            # Both ends are made inside their namespaces: nothing appears beside the machine's
            # own interfaces, not even for a moment.
            _ip("-n", host.netns, "link", "add", host.iface, "type", "veth",
                "peer", "name", host.port, "netns", SWITCH)
            _ip("-n", SWITCH, "link", "set", host.port, "master", BRIDGE, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/{network.prefixlen}", "dev", host.iface)
            _ip("-n", host.netns, "link", "set", host.iface, "up")
        _write_ssh_files(directory, hosts.hosts, keepalive)
        for host in hosts:
            _write_hosts_file(host, hosts.hosts)
        for host in hosts:
            hosts.sshd_pids[host.netns] = _start_sshd(directory, host)
            hosts.save()
        _wait_for_ssh(hosts)
    except BaseException:
        down(directory)
        raise
    return hosts


def down(directory: Path | str | None = None) -> list[str]:
    """Stop every process in the namespaces (sshds, jobs), delete them with their links;
    returns the namespaces removed. Any namespace of this module goes, not only `directory`'s."""
    names = []
    if directory is not None and (Path(directory) / STATE).exists():
        hosts = VirtualHosts.load(Path(directory))
        names = [SWITCH] + [host.netns for host in hosts]
        _remove_netns([name for name in names if name in _netns_names()])
    return names + clean_leftovers()


@contextlib.contextmanager
def virtual_hosts(directory: Path | str, count: int = 2, subnet: str = SUBNET,
                  keepalive: tuple[int, int] = KEEPALIVE, tcp_retries2: int | None = None,
                  wait: float = 600.0) -> Iterator[VirtualHosts]:
    """`count` hosts for the duration of the block (`up`), removed on the way out whatever
    happened; another process's block is waited for up to `wait` s. Raises `Unavailable` where
    they cannot be made (tests skip on it)."""
    with _exclusive(wait):
        hosts = up(directory, count, subnet, keepalive, tcp_retries2)
        try:
            yield hosts
        finally:
            down(directory)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("up", help="make the hosts (removing any left over)")
    make.add_argument("directory", type=Path, help="where keys, configs and hostfiles go")
    make.add_argument("--hosts", type=int, default=2, help="how many (1-3)")
    make.add_argument("--subnet", default=SUBNET, help="their IPv4 subnet, unused on this machine")
    make.add_argument("--tcp-retries2", type=int, default=None,
                      help="the hosts' net.ipv4.tcp_retries2 (default: the machine's)")
    remove = commands.add_parser("down", help="remove the hosts, their links and sshds")
    remove.add_argument("directory", type=Path)
    run = commands.add_parser("run", help="run a command on host N (ssh to the others works from it)")
    run.add_argument("directory", type=Path)
    run.add_argument("host", type=int)
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    for name, text in (("cut", "pull host N's cable"), ("mend", "plug host N's cable back")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("directory", type=Path)
        sub.add_argument("host", type=int)
    args = parser.parse_args(argv)

    try:
        if args.command == "up":
            with _exclusive():
                hosts = up(args.directory, args.hosts, args.subnet, tcp_retries2=args.tcp_retries2)
            horovod_file = hosts.write_hostfile(hosts.directory / "hosts.horovodrun")
            mpirun_file = hosts.write_hostfile(hosts.directory / "hosts.mpirun")
            for host in hosts:
                print(f"host {host.index}: {host.address} (namespace {host.netns}, interface {host.iface})")
            here = Path(sys.argv[0]).as_posix()
            print(f"hostfiles: {horovod_file} {mpirun_file}\n"
                  f"run on host 1: python {here} run {hosts.directory} 1 -- horovodrun -np {len(hosts)} "
                  f"-H {hosts.horovodrun_hosts()} --network-interface {IFACE} python recipes/translate.py\n"
                  f"remove them:   python {here} down {hosts.directory}")
        elif args.command == "down":
            with _exclusive():
                print("removed:", " ".join(down(args.directory)) or "nothing")
        else:
            hosts = VirtualHosts.load(args.directory.resolve())
            host = hosts[args.host - 1]
            if args.command == "cut":
                host.cut()
            elif args.command == "mend":
                host.mend()
            else:
                command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
                return host.run(command or ["bash"], env=hosts.env(), stdin=None).returncode
    except (Unavailable, RuntimeError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
