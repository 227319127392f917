"""Network namespaces, veth links and the processes started inside them.

Used by the lab (``ipsecmgr lab``), the integration tests and the benchmarks.
One :class:`NetnsPool` owns everything it creates and removes all of it in
:meth:`NetnsPool.close`, also after a failure: processes are stopped by PID
(never by name), then the namespaces are deleted (which removes their veths).

Names are unique per pool (a short random tag plus a counter), so parallel
runs on one machine never collide. Addresses must come from the documentation
ranges; :func:`check_doc_address` enforces that before anything is configured.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

# The only ranges a test, a benchmark or the lab may put on an interface.
DOC_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)


class NetnsError(RuntimeError):
    """A namespace command failed; the message carries the command and its stderr."""


def check_doc_address(address: str) -> None:
    """Refuse any address outside the documentation ranges (with or without /prefix)."""
    ip = ipaddress.ip_interface(address).ip
    if not any(ip in net for net in DOC_NETWORKS):
        raise ValueError(f"{address}: not in a documentation range (RFC 5737 / RFC 3849)")


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


@dataclass
class Netns:
    """One network namespace. Commands run in it with ``ip netns exec``."""

    name: str
    pool: NetnsPool = field(repr=False)

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(
        self, cmd: Sequence[str], *, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside the namespace."""
        proc = subprocess.run(
            self.argv(cmd), capture_output=True, text=True, check=False, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise NetnsError(
                f"[{self.name}] {' '.join(cmd)}: exit {proc.returncode}: "
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc

    def popen(
        self,
        cmd: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stdout: int | None = subprocess.PIPE,
        stderr: int | None = subprocess.PIPE,
        stdin: int | None = subprocess.DEVNULL,
        text: bool = True,
    ) -> subprocess.Popen[str]:
        """Start a long-running process in the namespace; the pool stops it by PID."""
        # `ip netns exec` execs the command, so the PID we hold is the command's own.
        proc: subprocess.Popen[str] = subprocess.Popen(
            self.argv(cmd),
            env=env,
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
            text=text,
            start_new_session=True,
        )
        self.pool.processes.append(proc)
        return proc

    def wait_link_ready(self, ifname: str, timeout: float = 10.0) -> None:
        """Return once ``ifname`` is up with its queueing discipline attached.

        `ip link set up` returns before the kernel's link watcher has turned the
        carrier on (operstate UP): until then what is sent is dropped (an ARP
        request or a neighbour solicitation, retried only a second later), and
        a first IPv6 ping with a 2 s wait failed about once in 20 runs."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.run(["ip", "-o", "link", "show", "dev", ifname]).stdout
            if "state UP" in line and "qdisc noop" not in line:
                return
            if time.monotonic() > deadline:
                raise NetnsError(f"[{self.name}] {ifname} not up after {timeout:.0f} s: {line}")
            time.sleep(0.01)

    def ip(self, *args: str) -> None:
        _run(["ip", "-n", self.name, *args])

    def add_address(self, ifname: str, address: str) -> None:
        check_doc_address(address)
        extra = ["nodad"] if ":" in address else []
        self.ip("addr", "add", address, "dev", ifname, *extra)

    def add_route(self, prefix: str, via: str | None = None, dev: str | None = None) -> None:
        args = ["route", "add", prefix]
        if via:
            args += ["via", via]
        if dev:
            args += ["dev", dev]
        self.ip(*args)


@dataclass
class Link:
    """A veth pair between two namespaces."""

    a: Netns
    a_if: str
    b: Netns
    b_if: str


class NetnsPool:
    """Creates namespaces and links, and removes all of them (and their processes)."""

    def __init__(self, prefix: str = "ipm") -> None:
        # 15 characters is the kernel's limit for interface names; namespace
        # names share the tag so `ip netns list` shows what belongs together.
        self.tag = f"{prefix}{secrets.token_hex(3)}"
        self.namespaces: list[Netns] = []
        self.processes: list[subprocess.Popen[str]] = []
        self._links = 0

    def __enter__(self) -> NetnsPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, role: str) -> Netns:
        """Create a namespace named ``<tag>-<role>`` with its loopback up."""
        ns = Netns(f"{self.tag}-{role}", self)
        _run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        # IPv6 duplicate address detection would delay the first packets.
        ns.run(["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0"], check=False)
        ns.run(["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"], check=False)
        return ns

    def link(
        self,
        a: Netns,
        b: Netns,
        a_addrs: Sequence[str] = (),
        b_addrs: Sequence[str] = (),
        *,
        mtu: int | None = None,
    ) -> Link:
        """Connect two namespaces with a veth pair and put addresses on both ends."""
        for addr in (*a_addrs, *b_addrs):
            check_doc_address(addr)
        self._links += 1
        a_if = f"v{self._links}{b.name.rsplit('-', 1)[-1]}"[:15]
        b_if = f"v{self._links}{a.name.rsplit('-', 1)[-1]}"[:15]
        if a_if == b_if:
            b_if = (b_if[:14] + "x")[:15]
        _run(
            [
                "ip", "link", "add", a_if, "netns", a.name,
                "type", "veth", "peer", "name", b_if, "netns", b.name,
            ]
        )  # fmt: skip
        for ns, ifname, addrs in ((a, a_if, a_addrs), (b, b_if, b_addrs)):
            if mtu:
                ns.ip("link", "set", ifname, "mtu", str(mtu))
            for addr in addrs:
                ns.add_address(ifname, addr)
            ns.ip("link", "set", ifname, "up")
        for ns, ifname in ((a, a_if), (b, b_if)):
            ns.wait_link_ready(ifname)
        return Link(a, a_if, b, b_if)

    def stop_processes(self, grace: float = 3.0) -> None:
        """SIGTERM every process we started, then SIGKILL what is left, by PID."""
        live = [p for p in self.processes if p.poll() is None]
        for p in live:
            _signal_group(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        for p in self.processes:
            for stream in (p.stdout, p.stderr, p.stdin):
                if stream is not None:
                    stream.close()
        self.processes.clear()

    def close(self) -> None:
        try:
            self.stop_processes()
        finally:
            for ns in reversed(self.namespaces):
                _run(["ip", "netns", "del", ns.name], check=False)
            self.namespaces.clear()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # Each process was started in its own session: signal the group so that
    # children it spawned (e.g. a shell's) go too; fall back to the PID alone.
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def is_root() -> bool:
    return os.geteuid() == 0
