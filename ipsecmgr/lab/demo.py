"""``ipsecmgr lab demo`` (and ``make demo``): the reference's packet flow, live.

Builds the lab in network namespaces, starts our gateway on both sides, runs
a TACACS+ authentication, authorization and accounting from the client host
through the tunnel, a login against the bypass server in clear, and prints
what happened in the reference's 13 steps with the counters that prove it,
then the ``show`` commands. Everything is torn down at the end, also on
Ctrl-C or failure.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from ipsecmgr.lab.gateways import GatewayProcess, LabGateways
from ipsecmgr.lab.topology import Lab
from ipsecmgr.show import Snapshot
from ipsecmgr.trace import Event
from ipsecmgr.trace.io import TraceClient
from ipsecmgr.trace.render import group_flows, pick_flow, render_timelines, with_inferred

USER, PASSWORD = "alice", "alice-demo-pw"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _counter(snap: Snapshot, group: str, name: str) -> int:
    counters: dict[str, int] = snap["statistics"][group]  # type: ignore[literal-required]
    return int(counters.get(name, 0))


def write_tacacs_files(
    directory: Path, secret: bytes, user: str, password: str
) -> tuple[Path, Path]:
    """``tacacs-secret`` (mode 0600) and ``users.json`` (one user) in ``directory``,
    for the lab's TACACS+ server and client; returns both paths."""
    secret_file = directory / "tacacs-secret"
    # created 0600: the secret is never readable by others, not even for a moment
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    secret_file.chmod(0o600)  # (an existing file keeps its mode through O_CREAT)
    users = directory / "users.json"
    users.write_text(json.dumps({user: {"password": password}}))
    return secret_file, users


def run_lab_demo(mode: str = "tunnel", first_packet: str = "drop") -> int:
    with tempfile.TemporaryDirectory(prefix="ipsecmgr-demo-") as tmp:
        work = Path(tmp)
        secret, users = write_tacacs_files(work, b"demo-tacacs-key", USER, PASSWORD)
        try:
            with Lab(mode) as lab, LabGateways(lab) as gws:
                return _demo(lab, gws, secret, users, first_packet)
        except KeyboardInterrupt:
            _say("\ninterrupted: everything torn down")
            return 130


def _demo(lab: Lab, gws: LabGateways, secret: Path, users: Path, first_packet: str) -> int:
    a = lab.addresses
    _say(f"== lab ({lab.mode} mode): namespaces {', '.join(lab.describe()['namespaces'].values())}")
    _say(f"   client {a.client_wan4} (TACACS+ client + initiator gateway), src_ip {a.src_ip4}")
    _say(f"   responder gateway {a.gw_wan4}, TACACS+ server {a.server4}, bypass server {a.bypass4}")
    server = lab.start_tacacs_server("server", secret_file=secret, users_file=users)
    bypass = lab.start_tacacs_server("bypass", secret_file=secret, users_file=users)
    gws.start_both(first_packet=first_packet)
    client, gw = gws["client"], gws["gw"]
    _say(f"== both gateways up (first_packet = {first_packet!r})\n")

    # The real trace of the client gateway (ipsecmgr trace), attached before the first login.
    tracer = TraceClient(client.control)
    traced: list[Event] = []
    reader = threading.Thread(target=lambda: traced.extend(tracer), daemon=True)
    reader.start()
    failures = _logins(lab, secret)
    seen = [t.get("peer") for t in server.transactions()]
    _say(f"the TACACS+ server saw {len(seen)} transaction(s) from {sorted(set(map(str, seen)))}")
    _say(f"the bypass server saw its client as {[t.get('peer') for t in bypass.transactions()]}\n")

    cs = client.snapshot()
    tracer.close()
    reader.join(timeout=5)
    _say_trace(traced)
    drops = _say_steps(cs, lab, first_packet)
    _say_shows(client, gw)
    if first_packet == "drop" and drops != 1:
        failures += 1
        _say(f"unexpected: {drops} first-packet drops (expected 1)")
    codes = gws.stop()
    _say(f"== gateways stopped (exit codes {codes}); lab torn down")
    if failures:
        _say(f"demo FAILED: {failures} problem(s)")
        return 1
    _say("demo OK")
    return 0


def _logins(lab: Lab, secret: Path) -> int:
    """Authentication, authorization, accounting through the tunnel and a bypassed
    login; prints each result; returns how many failed."""
    a = lab.addresses
    failures = 0
    t0 = time.monotonic()
    auth = lab.tacacs_query("client", server=a.server4, secret_file=secret, user=USER,
                            password=PASSWORD)  # fmt: skip
    login_time = time.monotonic() - t0
    author = lab.tacacs_query("client", server=a.server4, secret_file=secret, user=USER,
                              action="authorize", args=["service=shell", "cmd="])  # fmt: skip
    acct = lab.tacacs_query("client", server=a.server4, secret_file=secret, user=USER,
                            action="account", args=["task_id=1", "service=shell"])  # fmt: skip
    by = lab.tacacs_query("client", server=a.bypass4, secret_file=secret, user=USER,
                          password=PASSWORD)  # fmt: skip
    for what, result in (("authentication", auth), ("authorization", author),
                         ("accounting", acct), ("bypass authentication", by)):  # fmt: skip
        ok = result.get("ok")
        failures += not ok
        _say(f"TACACS+ {what:<22} {result.get('status', '?'):<6} {'ok' if ok else 'FAILED'}")
    _say(f"first login took {login_time:.2f} s (IKE, and with 'drop' the SYN retransmission)")
    return failures


def _say_trace(traced: list[Event]) -> None:
    """The traced cold login step by step, and the bypassed one (step 3b)."""
    flows = group_flows(with_inferred(traced))
    cold = pick_flow(flows)
    bypassed = next((f for f, evs in flows.items() if any(e["step"] == "3b" and e.get(
        "dport") == 49 for e in evs)), None)  # fmt: skip
    _say("== ipsecmgr trace on the client gateway: the first login (cold start), step by step")
    _say(render_timelines(flows[cold]) if cold else "(no events traced)")
    if bypassed:
        _say("\n== ... and the bypassed login (no crypto ACL matches: step 3b)")
        _say(render_timelines(flows[bypassed][:6]) + "\n  ...")
    _say(f"\n({len(flows)} flows traced in all; 'ipsecmgr trace --help' for the tool)\n")


def _say_steps(cs: Snapshot, lab: Lab, first_packet: str) -> int:
    """The reference's 13 steps with the counters that prove them; returns the
    first-packet drops."""
    a = lab.addresses
    drops = _counter(cs, "ike", "tacacs/first_packet_drops")
    queued = _counter(cs, "ike", "tacacs/first_packet_queued")
    protect = _counter(cs, "classifier", "tacacs/protect")
    out_pkts = _counter(cs, "esp", "esp_out_packets")
    in_pkts = _counter(cs, "esp", "esp_in_packets")
    policy_ok = _counter(cs, "classifier", "tacacs/policy_ok")
    steps = [
        ("1", "TACACS+ client opens TCP to the server: first SYN", f"to {a.server4}:49"),
        ("2", "the kernel routes it into the TUN; IpsecMgr reads it", "TUN ipsm0"),
        ("3", "NPUSIM matches it against the crypto ACLs", f"{protect} packets matched"),
        ("3a", "ACL 'tacacs' line 1 matched → back to IpsecMgr to encrypt", "crypto map tacacs"),
        ("3b", "the bypass server matches no ACL → sent in clear",
         f"{_counter(cs, 'tun', 'bypass_packets')} packets bypassed"),
        ("4", "no SA yet → IKE_SA_INIT + IKE_AUTH with the peer",
         f"{_counter(cs, 'ike', 'tacacs/ike_initiated')} IKE initiation(s)"),
        ("5", "the first SYN is dropped while the tunnel forms" if first_packet == "drop"
         else "the first SYN is queued while the tunnel forms",
         f"dropped {drops}, queued {queued}"),
        ("6", "the client retransmits the SYN; steps 2-3 again",
         "after ~1 s" if first_packet == "drop" else "not needed"),
        ("7", "the SA is up: the SYN is encrypted and sent as ESP", f"{out_pkts} ESP packets out"),
        ("8", "ESP arrives on the raw protocol-50 socket", f"{in_pkts} ESP packets in"),
        ("9", "NPUSIM finds the SA flow by SPI",
         f"{_counter(cs, 'classifier', '*/unknown_spi')} unknown SPIs"),
        ("10", "decrypted and checked against the SA's selectors", f"{policy_ok} passed"),
        ("11", "it is the SYN-ACK (and later the replies)", ""),
        ("12", "written back to the TUN, to the client", f"{in_pkts} packets"),
        ("13", "the client ACKs; every later packet repeats 2-12", ""),
    ]  # fmt: skip
    _say("== the reference's 13 steps, in the client gateway's counters")
    for num, what, evidence in steps:
        _say(f"  [{num:>3}] {what:<62} {evidence}")
    _say()
    return drops


def _say_shows(client: GatewayProcess, gw: GatewayProcess) -> None:
    for side, g in (("client", client), ("responder", gw)):
        for cmd in ("crypto map", "crypto ikev2-ikesa security-associations summary",
                    "crypto ipsec security-associations summary"):  # fmt: skip
            _say(f"== {side}# show {cmd}")
            _say(g.show(cmd))
            _say()
    _say("== client# show crypto statistics")
    _say(client.show("crypto statistics"))


if __name__ == "__main__":
    sys.exit(run_lab_demo())
