"""The fail-closed kill loop (issue #14): TACACS+ logins run continuously through
the lab while the client gateway is killed at random moments and restarted; a
capture on the client's WAN lasts the whole run.

Used by tests/integration/test_failclosed.py (30 kills, in ``make test``) and
tools/bench/failclosed.py (200 kills, the figures of docs/security.md), so both
measure the same thing:

* ``clear_protected``: clear-text TCP segments to or from the protected server
  on the WAN (the property: 0);
* ``clear_bypass``: the same for the bypass server, to which every fifth login
  goes (the capture's positive control: it must see those);
* per restart, ``recovery``: from the restarted daemon's "ready" to the end of
  the first successful login after it, and ``handshake``: that
  daemon's own IKE handshake (log: IKE_SA_INIT sent -> Child SA installed).
  For each restart whose recovery is measured, a probe login starts at
  "ready": the two threads may both be inside logins that began before the
  kill, whose TCP retransmissions back off while the daemon is gone (RFC 6298
  §5.5) and whose client gives up after 3 s; what they measure then is the
  client's TCP timers, not the restarted gateway.

Kill moments are random: half the cycles kill 0-0.4 s after "ready" (while the
first login's handshake runs), the others wait for a successful login (their
recovery is measured) and then 0-2.5 s more (with a Child SA lifetime of 2 s and
an IKE SA lifetime of 3 s, rekeys are often in flight).
"""

from __future__ import annotations

import random
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from ipsecmgr.lab.capture import Capture
from ipsecmgr.lab.gateways import GatewayProcess, LabGateways
from ipsecmgr.lab.topology import Lab

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
OPTIONS: dict[str, Any] = {
    "first_packet": "queue",
    "ike_options": {"lifetime": 3},
    "ipsec_options": {"lifetime_seconds": 2},
}


class Login(Protocol):
    def __call__(self, server: str, timeout: float) -> dict[str, Any]: ...


@dataclass
class Cycle:
    kill_after: float  # seconds after "ready" (early) or after the first success
    early: bool
    recovery: float | None = None
    handshake: float | None = None
    rekey_in_flight: bool = False
    rekeyed: bool = False  # that daemon had completed a rekey before the kill


@dataclass
class KillLoopResult:
    cycles: list[Cycle] = field(default_factory=list)
    clear_protected: int = 0
    clear_bypass: int = 0
    logins: int = 0
    passed: int = 0
    #: (start, end, PASS) of every login to the protected server
    logins_done: list[tuple[float, float, bool]] = field(default_factory=list, repr=False)
    wall: float = 0.0

    def recoveries(self) -> list[float]:
        return [c.recovery for c in self.cycles if c.recovery is not None]


def _log_time(line: str) -> float | None:
    m = _STAMP.match(line)
    return datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


def handshake_time(gw: GatewayProcess) -> float | None:
    """IKE_SA_INIT sent -> first Child SA installed, from the daemon's log."""
    init = done = None
    for line in list(gw.log_lines):
        if init is None and "sending IKE_SA_INIT request" in line:
            init = _log_time(line)
        elif init is not None and re.search(r"Child SA \d+ installed", line):
            done = _log_time(line)
            break
    return done - init if init is not None and done is not None else None


class _Logins:
    """Two threads logging in back to back (a login stuck in a retransmission does
    not stop the stream); every fifth login of each goes to the bypass server.
    :meth:`probe` adds one login in a thread of its own."""

    def __init__(self, login: Login, server: str, bypass: str) -> None:
        self.login, self.server, self.bypass = login, server, bypass
        self.done: list[tuple[float, float, bool]] = []  # start, end, PASS (protected only)
        self.count = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def __enter__(self) -> _Logins:
        for t in self._threads:
            t.start()
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            self._one(self.bypass if n % 5 == 0 else self.server)

    def _one(self, server: str) -> None:
        with self._lock:
            self.count += 1
        t0 = time.monotonic()
        try:
            res = self.login(server, 3.0)
        except Exception:  # a failed client process: counted as a failed login
            res = {}
        if server == self.server:
            with self._lock:
                self.done.append((t0, time.monotonic(), res.get("status") == "PASS"))

    def probe(self) -> None:
        """One more login to the protected server, started now in its own thread."""
        t = threading.Thread(target=self._one, args=(self.server,), daemon=True)
        self._threads.append(t)
        t.start()

    def first_pass_after(self, t: float) -> float | None:
        """The end of the first successful login that ended after ``t`` (a login whose
        SYN was refused or lost while the daemon was gone and that got through on
        a retransmission after the restart counts: the logins resumed)."""
        with self._lock:
            ends = [end for _, end, ok in self.done if ok and end >= t]
        return min(ends) if ends else None


def kill_loop(
    lab: Lab,
    gws: LabGateways,
    login: Login,
    *,
    kills: int,
    pcap: Path,
    seed: int | None = None,
    recovery_limit: float = 20.0,
) -> KillLoopResult:
    """Run ``kills`` SIGKILL/restart cycles of the client gateway (the gw side and the
    TACACS+ servers must run). Returns the figures; raises if a restart never logs in
    again within ``recovery_limit``."""
    rng = random.Random(seed)
    a = lab.addresses
    result = KillLoopResult()
    t_start = time.monotonic()
    # The gateway runs before the first login: until it first started, nothing is
    # protected (no block yet), and that is not what this loop measures.
    client = gws.gateways.get("client") or gws.start("client", **OPTIONS)
    ready = time.monotonic()
    # Only clear TACACS+ is captured (ESP is not): small files for 200 kills.
    with (
        Capture(lab.client, lab.interfaces["client.wan"], pcap, "tcp port 49") as cap,
        _Logins(login, a.server4, a.bypass4) as logins,
    ):
        for _ in range(kills):
            # This cycle kills the daemon that became ready at `ready`.
            early = rng.random() < 0.5
            cycle = Cycle(kill_after=rng.uniform(0, 0.4) if early else rng.uniform(0, 2.5),
                          early=early)  # fmt: skip
            if not early:  # let it recover first: that restart's figures
                logins.probe()
                cycle.recovery = _wait_recovery(logins, ready, recovery_limit, client) - ready
                cycle.handshake = handshake_time(client)
            time.sleep(cycle.kill_after)  # the random moment is the test's input
            cycle.rekey_in_flight, cycle.rekeyed = _rekey_state(client)
            gws.gateways.pop("client").kill()
            result.cycles.append(cycle)
            client = gws.start("client", **OPTIONS)
            ready = time.monotonic()
        # The last restart recovers too.
        logins.probe()
        _wait_recovery(logins, ready, recovery_limit, client)
        result.logins = logins.count
    result.logins_done = list(logins.done)
    result.passed = sum(1 for _, _, ok in logins.done if ok)
    result.clear_protected, result.clear_bypass = _count_clear(cap, a.server4, a.bypass4)
    result.wall = time.monotonic() - t_start
    return result


def _wait_recovery(logins: _Logins, ready: float, limit: float, gw: GatewayProcess) -> float:
    deadline = time.monotonic() + limit
    while True:
        end = logins.first_pass_after(ready)
        if end is not None:
            return end
        if time.monotonic() > deadline:
            raise RuntimeError(f"no successful login {limit} s after a restart:\n{gw.log[-3000:]}")
        time.sleep(0.01)


def _rekey_state(gw: GatewayProcess) -> tuple[bool, bool]:
    """(a rekey started and not finished, a rekey done) on this daemon, just before
    the kill; (False, False) when the control socket does not answer."""
    try:
        ike = gw.snapshot()["statistics"]["ike"]
    except Exception:  # the control socket is not up yet or the daemon is busy: unknown
        return False, False
    started = ike.get("tacacs/child_rekey_started", 0) + ike.get("tacacs/ike_rekey_started", 0)
    done = ike.get("tacacs/child_rekeyed", 0) + ike.get("tacacs/ike_rekeyed", 0)
    return started > done, done > 0


def _count_clear(cap: Capture, protected: str, bypass: str) -> tuple[int, int]:
    """Clear TCP segments on port 49 with the protected / the bypass server's address."""
    from scapy.layers.inet import IP, TCP

    counts = {protected: 0, bypass: 0}
    for p in cap.packets():
        if not (p.haslayer(IP) and p.haslayer(TCP)):
            continue
        if 49 not in (p[TCP].sport, p[TCP].dport):
            continue
        for host in (p[IP].src, p[IP].dst):
            if host in counts:
                counts[host] += 1
    return counts[protected], counts[bypass]
