"""A local client floods the daemon's control socket (issue #15 item 3).

3,000 connections that never send a request, plus over-long and deeply nested
requests, against the running gateway: it keeps answering ``show``, keeps
forwarding TACACS+ through the tunnel, and its memory does not grow with the
number of connections (the connection limit evicts the oldest idle ones).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipsecmgr.control import EVICTED, request
from ipsecmgr.lab.gateways import LabGateways
from ipsecmgr.lab.topology import Lab

pytestmark = [pytest.mark.root, pytest.mark.slow]

USER, PASSWORD, SECRET = "alice", "alice-flood-pw", b"flood-tacacs-key"
FLOOD = 3000


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Lab, LabGateways, dict[str, object]]]:
    secret = tmp_path / "tacacs-secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    users = tmp_path / "users.json"
    users.write_text(json.dumps({USER: {"password": PASSWORD}}))
    with Lab("tunnel") as lab, LabGateways(lab) as gws:
        lab.start_tacacs_server("server", secret_file=secret, users_file=users)
        gws.start_both()
        query = {"server": lab.addresses.server4, "secret_file": secret, "user": USER,
                 "password": PASSWORD}  # fmt: skip
        assert lab.tacacs_query("client", **query)["ok"]  # type: ignore[arg-type]
        yield lab, gws, query


def test_flooded_control_socket_keeps_answering_and_forwarding(
    lab: tuple[Lab, LabGateways, dict[str, object]],
) -> None:
    the_lab, gws, query = lab
    gw = gws["gw"]
    path = gw.control
    rss_before = _rss_kib(gw.proc.pid)
    held: list[socket.socket] = []
    abuse: list[bytes] = []
    done = threading.Event()

    def flood() -> None:
        try:
            for i in range(FLOOD):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(path))  # blocking: waits while the backlog is full
                held.append(s)
                if i % 500 == 0:  # an over-long and a deeply nested request, answered
                    for line in (b'{"command": "' + b"x" * 100_000 + b'"}\n',
                                 b'{"command": "show", "a": ' + b"[" * 20000 + b"]" * 20000
                                 + b"}\n"):  # fmt: skip
                        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as a:
                            a.connect(str(path))  # blocking, as above
                            a.settimeout(10)
                            a.sendall(line)
                            abuse.append(a.makefile("rb").readline())
        finally:
            done.set()

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        answered = logins = 0
        deadline = time.monotonic() + 120
        while not done.is_set() or answered < 3 or logins < 1:
            assert time.monotonic() < deadline, (len(held), answered, logins)
            snap = request(path, {"command": "snapshot"}, timeout=10)
            assert snap["ok"], snap
            answered += 1
            if logins < 2:
                login = the_lab.tacacs_query("client", **query)  # type: ignore[arg-type]
                assert login["ok"], login
                logins += 1
        flooder.join(timeout=30)
        assert len(held) == FLOOD
        assert gw.proc.poll() is None
        assert gw.show("crypto statistics").startswith("Uptime")
        # The daemon closed (evicted) all but its newest connections, each with a notice.
        closed = 0
        for s in held:
            s.settimeout(5)
            try:
                notice = s.makefile("rb").read()  # to the end: the daemon closed it
            except (TimeoutError, ConnectionError):
                continue
            closed += not notice or json.loads(notice) == {"ok": False, "error": EVICTED}
        assert closed >= FLOOD - 64, closed
        rss_growth = _rss_kib(gw.proc.pid) - rss_before
        # Before the limits: +13 MB for 3,000 held connections.
        assert rss_growth < 6 * 1024, rss_growth
    finally:
        done.wait(timeout=60)
        for s in held:
            s.close()
    assert len(abuse) == 2 * (FLOOD // 500)
    answers = [json.loads(a) for a in abuse]
    assert {a["error"] for a in answers} == {
        "request longer than 65536 bytes",
        "request nested deeper than 32",
    }
