"""ipsecmgr.sdnotify against a real NOTIFY_SOCKET listener (an AF_UNIX datagram
socket, as systemd's), path and abstract addresses."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipsecmgr.sdnotify import Notifier, monotonic_usec, status_line


class Listener:
    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)

    def recv(self, timeout: float = 5.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def pending(self) -> list[dict[str, str]]:
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(4096).decode()
                out.append(dict(line.split("=", 1) for line in data.split("\n")))
        except BlockingIOError:
            return out


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    lst = Listener(str(tmp_path / "notify"))
    yield lst
    lst.sock.close()


def test_ready_status_reloading_stopping(listener: Listener) -> None:
    n = Notifier(listener.address)
    n.ready("crypto maps up 0/1; IKE SAs 0; Child SAs 0")
    assert listener.recv() == {
        "READY": "1",
        "STATUS": "crypto maps up 0/1; IKE SAs 0; Child SAs 0",
    }
    before = monotonic_usec()
    n.reloading()
    after = monotonic_usec()
    msg = listener.recv()
    assert msg["RELOADING"] == "1"
    # systemd matches the reload by CLOCK_MONOTONIC in µs (sd_notify(3))
    assert before <= int(msg["MONOTONIC_USEC"]) <= after
    n.stopping()
    assert listener.recv() == {"STOPPING": "1"}
    n.close()


def test_status_is_one_line_and_sent_only_when_it_changes(listener: Listener) -> None:
    n = Notifier(listener.address)
    n.status("a\nb")
    assert listener.recv() == {"STATUS": "a b"}
    n.status("a\nb")
    n.status("c")
    assert listener.recv() == {"STATUS": "c"}
    assert listener.pending() == []


def test_abstract_socket_address() -> None:
    name = f"@ipsecmgr-test-{os.getpid()}-{time.monotonic_ns()}"
    lst = Listener(name)
    try:
        Notifier(name).ready()
        assert lst.recv() == {"READY": "1"}
    finally:
        lst.sock.close()


def test_without_notify_socket_nothing_is_sent_and_no_watchdog() -> None:
    n = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog_usec == 0
    assert n.send("READY=1") is False


def test_watchdog_pid_of_another_process_disables_the_watchdog(listener: Listener) -> None:
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "2000000"}
    assert Notifier.from_environ(env).watchdog_usec == 2_000_000
    env["WATCHDOG_PID"] = str(os.getpid())
    assert Notifier.from_environ(env).watchdog_usec == 2_000_000
    env["WATCHDOG_PID"] = str(os.getpid() + 1)
    assert Notifier.from_environ(env).watchdog_usec == 0
    assert Notifier.from_environ({**env, "WATCHDOG_USEC": "x"}).watchdog_usec == 0


def test_a_vanished_listener_does_not_raise(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "gone"))
    assert n.send("READY=1") is False
    assert n.send("READY=1") is False


def test_watchdog_pings_from_the_loop_at_half_the_timeout(listener: Listener) -> None:
    """WATCHDOG_USEC=0.4 s: a ping every 0.2 s, from the event loop; a loop that
    is blocked sends none (so systemd would restart it)."""
    n = Notifier(listener.address, watchdog_usec=400_000)
    assert n.period == pytest.approx(0.2)
    current = {"s": "crypto maps up 0/1"}
    ticks: list[float] = []  # loop time of each periodic run (the status callback)

    def status() -> str:
        ticks.append(asyncio.get_running_loop().time())
        return current["s"]

    async def main() -> list[dict[str, str]]:
        loop = asyncio.get_running_loop()
        n.start_periodic(loop, status)
        got: list[dict[str, str]] = []
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            got += listener.pending()
            if len(got) >= 3:
                current["s"] = "crypto maps up 1/1"
        # blocked loop: no ping while it is blocked
        got += listener.pending()
        time.sleep(0.8)
        blocked = listener.pending()
        assert blocked == [], blocked
        n.stop_periodic()
        return got

    got = asyncio.run(main())
    assert all(m["WATCHDOG"] == "1" for m in got)
    assert len(got) == len(ticks)  # one datagram per run
    # ~1.5 s / 0.2 s = 7-8 pings; a loaded machine delays some, never adds any
    assert 4 <= len(got) <= 9, ticks
    # never more often than every 0.2 s of loop time (call_later waits at least that)
    assert min(b - a for a, b in itertools.pairwise(ticks)) >= 0.2 - 1e-3, ticks
    statuses = [m["STATUS"] for m in got if "STATUS" in m]
    assert statuses == ["crypto maps up 0/1", "crypto maps up 1/1"]
    n.close()


def test_status_line() -> None:
    assert (
        status_line({"a": "up", "b": "down", "c": "connecting"}, 2, 3)
        == "crypto maps up 1/3; IKE SAs 2; Child SAs 3"
    )
