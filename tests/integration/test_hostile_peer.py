"""A hostile peer that holds valid SA keys (issue #15 item 1, RFC 4301 §5.2).

The peer encrypts, with the gateway's own inbound SA (keys taken from the
``trace-keys`` command, the way ``trace --wireshark-keys`` gets them), packets
that the SA's traffic selectors and the crypto map's ACL do not allow: a port
the ACL does not permit, a source address outside the selectors, a different
protocol. In tunnel mode and in transport mode each one is dropped after
decryption, counted under its own reason in ``show crypto statistics`` and
shown as a ``policy_drop`` trace step; nothing reaches the TUN.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP

import esp
from ipsecmgr.lab.gateways import LabGateways
from ipsecmgr.lab.topology import Lab, python_env
from ipsecmgr.trace.io import read_events

pytestmark = [pytest.mark.root, pytest.mark.slow]

USER, PASSWORD, SECRET = "alice", "alice-hostile-pw", b"hostile-tacacs-key"
REASONS = ("port", "address", "protocol")


def _start_trace(control: Path, record: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipsecmgr.cli", "trace", "--socket", str(control),
         "--record", str(record)],
        env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    if not select.select([proc.stderr], [], [], 10)[0]:
        proc.kill()
        proc.wait()
        raise AssertionError("ipsecmgr trace did not attach")
    assert proc.stderr.readline().startswith("tracing ")
    return proc


def _send_esp(lab: Lab, role: str, dst: str, wires: list[bytes]) -> None:
    code = (
        "import socket,sys,json; s=socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)\n"
        "for h in json.loads(sys.argv[1]): s.sendto(bytes.fromhex(h), (sys.argv[2], 0))"
    )
    lab.ns(role).run([sys.executable, "-c", code, json.dumps([w.hex() for w in wires]), dst])


def _tacacs_only(conf: Path, rule: str) -> Path:
    """The lab config with the ACL narrowed to TACACS+ (TCP port 49) only."""
    lines = conf.read_text().splitlines()
    out = [f"rules = [{json.dumps(rule)}]" if ln.startswith("rules = [") else ln for ln in lines]
    conf.write_text("\n".join(out) + "\n")
    return conf


@pytest.fixture(params=["tunnel", "transport"])
def hostile(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Lab, LabGateways]]:
    mode: str = request.param
    secret = tmp_path / "tacacs-secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    users = tmp_path / "users.json"
    users.write_text(json.dumps({USER: {"password": PASSWORD}}))
    with Lab(mode) as lab, LabGateways(lab) as gws:
        a = lab.addresses
        src = a.src_ip4 if mode == "tunnel" else a.client_wan4
        gw_rule = f"permit tcp host {a.server4} eq 49 host {src}"
        client_rule = f"permit tcp host {src} host {a.server4} eq 49"
        gws.start("gw", config=_tacacs_only(gws.write_config("gw"), gw_rule))
        gws.start("client", config=_tacacs_only(gws.write_config("client"), client_rule))
        lab.start_tacacs_server("server", secret_file=secret, users_file=users)
        login = lab.tacacs_query("client", server=a.server4, secret_file=secret, user=USER,
                                 password=PASSWORD)  # fmt: skip
        assert login["ok"], login
        yield lab, gws


def test_hostile_peer_with_valid_keys_is_held_to_the_selectors_and_acl(
    hostile: tuple[Lab, LabGateways], tmp_path: Path
) -> None:
    lab, gws = hostile
    a = lab.addresses
    gw = gws["gw"]
    mode = lab.mode
    spi_in = int(gw.snapshot()["child_sas"][0]["spi_in"], 16)
    keys = gw.command({"command": "trace-keys"})["result"]["esp"]
    key = bytes.fromhex(next(r["key"] for r in keys if int(r["spi"], 16) == spi_in))
    # Far ahead of the peer's own sequence numbers: the replay window lets them in.
    sa = esp.OutboundSA(spi_in, key, seq=1 << 20, mode=mode)
    server, src = a.server4, (a.src_ip4 if mode == "tunnel" else a.client_wan4)
    assert src is not None
    if mode == "tunnel":
        inner = {
            "port": IP(src=src, dst=server) / TCP(sport=40000, dport=22, flags="S"),
            "address": IP(src="192.0.2.99", dst=server) / TCP(sport=40000, dport=49, flags="S"),
            "protocol": IP(src=src, dst=server) / UDP(sport=40000, dport=49),
        }
        sends = [("client", [sa.encapsulate(bytes(inner[r]), 4) for r in REASONS])]
    else:
        # Transport mode: the outer header gives the addresses; the bypass host is
        # outside the selectors.
        seg = {
            "port": (bytes(TCP(sport=40000, dport=22, flags="S")), 6),
            "protocol": (bytes(UDP(sport=40000, dport=49)), 17),
            "address": (bytes(TCP(sport=40000, dport=49, flags="S")), 6),
        }
        wires = {r: sa.encapsulate(*seg[r]) for r in REASONS}
        sends = [("client", [wires["port"], wires["protocol"]]), ("bypass", [wires["address"]])]
    before = gw.snapshot()["statistics"]["esp"]
    record = tmp_path / "trace.jsonl"
    tracer = _start_trace(gw.control, record)
    try:
        for role, batch in sends:
            _send_esp(lab, role, a.gw_wan4, batch)
        deadline = time.monotonic() + 15
        while True:
            stats = gw.snapshot()["statistics"]
            drops = {r: stats["esp"].get(f"policy_drop_{r}", 0) for r in REASONS}
            evs = read_events(record) if record.exists() else []
            traced = [e for e in evs if e["event"] == "policy_drop"]
            if all(drops.values()) and len(traced) >= 3:
                break
            assert time.monotonic() < deadline, (drops, traced, gw.log[-2000:])
            time.sleep(0.05)  # polling the daemon and the trace file, with a deadline
    finally:
        tracer.terminate()
        tracer.wait(timeout=10)
    assert drops == dict.fromkeys(REASONS, 1)
    assert stats["esp"]["policy_drops"] == before.get("policy_drops", 0) + 3
    # Nothing decrypted reached the TUN (the tunnel is idle after the login).
    assert stats["esp"].get("esp_in_packets", 0) == before.get("esp_in_packets", 0)
    # Per crypto map, in the NPUSIM counters too.
    assert stats["classifier"]["tacacs/policy_violation"] >= 3
    text = gw.show("crypto statistics")
    for r in REASONS:
        assert f"policy_drop_{r}" in text
    assert sorted(e["reason"] for e in traced) == sorted(REASONS)
    assert {(e["step"], e["spi"]) for e in traced} == {("10", spi_in)}
    ports = {e["reason"]: e.get("dport") for e in traced}
    assert ports["port"] == 22 and ports["protocol"] == 49
    assert next(e for e in traced if e["reason"] == "address")["src"] in ("192.0.2.99", a.bypass4)
