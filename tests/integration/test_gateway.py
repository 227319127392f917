"""The gateway end to end in the netns lab: our daemon on both sides (root).

Each test builds its own lab (client host + initiator, WAN bridge, responder,
TACACS+ server, bypass server), starts ``ipsecmgr run`` on both gateways and
asserts on what the TACACS+ client got, what the server saw, what crossed the
WAN (tcpdump) and the daemons' counters.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipsecmgr.lab.capture import Capture
from ipsecmgr.lab.gateways import GatewayProcess, LabGateways
from ipsecmgr.lab.topology import Lab, LabProcess

pytestmark = [pytest.mark.root, pytest.mark.slow]

USER, PASSWORD = "alice", "alice-pw-4711"


@dataclass
class Env:
    lab: Lab
    gws: LabGateways
    secret: Path
    users: Path
    family: int

    @property
    def server(self) -> str:
        a = self.lab.addresses
        return a.server6 if self.family == 6 else a.server4

    @property
    def bypass_server(self) -> str:
        a = self.lab.addresses
        return a.bypass6 if self.family == 6 else a.bypass4

    def login(self, server: str | None = None, password: str = PASSWORD) -> dict[str, object]:
        return self.lab.tacacs_query(
            "client", server=server or self.server, secret_file=self.secret, user=USER,
            password=password,
        )  # fmt: skip

    def start_server(self, role: str = "server") -> LabProcess:
        return self.lab.start_tacacs_server(role, secret_file=self.secret, users_file=self.users)


def make_env(tmp_path: Path, mode: str, family: int = 4) -> Iterator[Env]:
    secret = tmp_path / "tacacs-secret"
    secret.write_bytes(b"tacacs-key")
    secret.chmod(0o600)
    users = tmp_path / "users.json"
    users.write_text(json.dumps({USER: {"password": PASSWORD}}))
    with Lab(mode) as lab, LabGateways(lab) as gws:
        yield Env(lab, gws, secret, users, family)


@pytest.fixture
def tunnel4(tmp_path: Path) -> Iterator[Env]:
    yield from make_env(tmp_path, "tunnel", 4)


def tcp_port_49(packets: list[object], addr: str) -> list[object]:
    """Clear-text TACACS+ packets to or from ``addr`` in a capture."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6

    out = []
    for p in packets:
        ip = p.getlayer(IP) or p.getlayer(IPv6)  # type: ignore[attr-defined]
        if ip is None or addr not in (ip.src, ip.dst) or not p.haslayer(TCP):  # type: ignore[attr-defined]
            continue
        tcp = p[TCP]  # type: ignore[index]
        if 49 in (tcp.sport, tcp.dport):
            out.append(p)
    return out


def esp_packets(packets: list[object]) -> list[object]:
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    out = []
    for p in packets:
        if (p.haslayer(IP) and p[IP].proto == 50) or (p.haslayer(IPv6) and p[IPv6].nh == 50):  # type: ignore[attr-defined,index]
            out.append(p)
    return out


def retransmitted_segments(env: Env) -> int:
    out = env.lab.client.run(["nstat", "-az", "TcpRetransSegs"]).stdout
    for line in out.splitlines():
        if line.startswith("TcpRetransSegs"):
            return int(line.split()[1])
    raise AssertionError(f"no TcpRetransSegs in {out!r}")


@pytest.mark.parametrize(
    ("mode", "family"), [("tunnel", 4), ("tunnel", 6), ("transport", 4), ("transport", 6)]
)
def test_tacacs_aaa_through_the_tunnel_and_only_esp_on_the_wire(
    tmp_path: Path, mode: str, family: int
) -> None:
    for env in make_env(tmp_path, mode, family):
        server = env.start_server("server")
        bypass = env.start_server("bypass")
        env.gws.start_both(family=family)
        wan_if = env.lab.interfaces["client.wan"]
        with Capture(env.lab.client, wan_if, tmp_path / "wan.pcap") as cap:
            auth = env.login()
            author = env.lab.tacacs_query("client", server=env.server, secret_file=env.secret,
                                          user=USER, action="authorize",
                                          args=["service=shell", "cmd="])  # fmt: skip
            acct = env.lab.tacacs_query("client", server=env.server, secret_file=env.secret,
                                        user=USER, action="account",
                                        args=["task_id=7", "service=shell"])  # fmt: skip
            by = env.login(server=env.bypass_server)
        assert auth["status"] == "PASS", auth
        assert author["status"] == "PASS_ADD", author
        assert acct["status"] == "SUCCESS", acct
        assert by["status"] == "PASS", by
        # The server saw the three transactions, from the tunnel's inner source.
        a = env.lab.addresses
        if mode == "tunnel":
            inner_src = a.src_ip6 if family == 6 else a.src_ip4
        else:
            inner_src = a.client_wan6 if family == 6 else a.client_wan4
        assert [t["peer"] for t in server.transactions()] == [inner_src] * 3
        assert [t["user"] for t in server.transactions()] == [USER] * 3
        packets = cap.packets()
        # Protected: not one TACACS+ segment in clear, and ESP both ways.
        assert tcp_port_49(packets, env.server) == []
        esp = esp_packets(packets)
        assert len(esp) >= 10
        # Bypassed: the second server's traffic is in clear on the WAN, and works.
        assert len(tcp_port_49(packets, env.bypass_server)) >= 5
        assert bypass.transactions()[0]["peer"] == (a.client_wan6 if family == 6 else a.client_wan4)
        client = env.gws["client"]
        assert client.counter("ike", "tacacs/first_packet_drops") == 1
        assert client.counter("esp", "esp_out_packets") >= 10
        assert client.counter("classifier", "tacacs/policy_violation") == 0
        codes = env.gws.stop()
        assert codes == {"gw": 0, "client": 0}


def test_queue_mode_sends_the_first_syn_without_a_retransmission(tunnel4: Env) -> None:
    env = tunnel4
    env.start_server()
    env.gws.start_both(first_packet="queue")
    before = retransmitted_segments(env)
    assert env.login()["status"] == "PASS"
    client = env.gws["client"]
    assert client.counter("ike", "tacacs/first_packet_drops") == 0
    assert client.counter("ike", "tacacs/first_packet_queued") == 1
    assert client.counter("ike", "tacacs/queued_sent") == 1
    # The SYN went out once the Child SA was installed: the client's TCP never
    # had to retransmit it (in drop mode it does, after ~1 s).
    assert retransmitted_segments(env) == before


def test_drop_mode_costs_the_client_one_syn_retransmission(tunnel4: Env) -> None:
    env = tunnel4
    env.start_server()
    env.gws.start_both(first_packet="drop")
    before = retransmitted_segments(env)
    assert env.login()["status"] == "PASS"
    assert env.gws["client"].counter("ike", "tacacs/first_packet_drops") == 1
    assert retransmitted_segments(env) == before + 1


def test_wrong_psk_no_tunnel_no_leak_clear_error_then_recovers(
    tunnel4: Env, tmp_path: Path
) -> None:
    env = tunnel4
    server = env.start_server()
    wrong = tmp_path / "wrong-psk"
    wrong.write_bytes(b"not-the-same-psk")
    wrong.chmod(0o600)
    gw = env.gws.start("gw", psk_file=wrong)
    client = env.gws.start("client")
    wan_if = env.lab.interfaces["client.wan"]
    with Capture(env.lab.client, wan_if, tmp_path / "wan.pcap") as cap:
        result = env.login()
    assert result.get("status") != "PASS"
    assert server.transactions() == []
    assert tcp_port_49(cap.packets(), env.server) == []  # nothing leaked in clear
    snap = client.snapshot()
    assert snap["crypto_maps"][0]["status"] != "up"
    assert client.counter("ike", "tacacs/auth_failed") >= 1
    assert "AUTHENTICATION_FAILED" in client.log or "authentication failed" in client.log
    assert "authentication failed" in gw.log.lower()
    assert b"not-the-same-psk".decode() not in gw.log + client.log
    # The client daemon is still serving: fix the responder, the next login works.
    gw.terminate()
    env.gws.gateways.pop("gw")
    env.gws.start("gw")
    deadline = time.monotonic() + 30
    while True:
        if env.login().get("status") == "PASS":
            break
        assert time.monotonic() < deadline, client.log[-2000:]
    assert server.transactions()[-1]["user"] == USER


def _send_raw(env: Env, role: str, proto: int, dst: str, payloads: list[bytes]) -> None:
    """Send datagrams from a lab namespace with a small Python one-liner."""
    script = (
        "import socket,sys,json\n"
        f"s=socket.socket(socket.AF_INET,socket.SOCK_RAW,{proto}) if {proto} else "
        "socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "for h in json.loads(sys.argv[1]):\n"
        f"    s.sendto(bytes.fromhex(h),('{dst}',{500 if not proto else 0}))\n"
    )
    env.lab.ns(role).run([sys.executable, "-c", script, json.dumps([p.hex() for p in payloads])])


def test_garbage_from_the_network_is_counted_and_changes_nothing(tunnel4: Env) -> None:
    env = tunnel4
    env.start_server()
    env.gws.start_both()
    assert env.login()["status"] == "PASS"
    gw = env.gws["gw"]
    before = gw.snapshot()
    spi_in = before["child_sas"][0]["spi_in"]
    a = env.lab.addresses
    rnd = os.urandom
    ike_garbage = [
        rnd(1),
        rnd(27),
        rnd(200),
        b"\x00" * 28,
        rnd(8) + bytes(8) + b"\x21\x20\x22\x08" + rnd(40),
    ]
    _send_raw(env, "bypass", 0, a.gw_wan4, ike_garbage)
    esp_garbage = [
        rnd(3),  # truncated
        bytes.fromhex("0000beef") + rnd(40),  # unknown SPI
        bytes.fromhex(spi_in) + (1 << 30).to_bytes(4, "big") + rnd(40),  # known SPI, bad ICV
    ]
    _send_raw(env, "bypass", 50, a.gw_wan4, esp_garbage)

    def counters() -> dict[str, int]:
        stats = gw.snapshot()["statistics"]
        return {**stats["ike"], **stats["esp"], **stats["classifier"]}

    deadline = time.monotonic() + 10
    while True:
        c = counters()
        if (
            c.get("esp_truncated", 0) >= 1
            and c.get("esp_unknown_spi", 0) >= 1
            and c.get("in_icv_failed", 0) >= 1
        ):
            break
        assert time.monotonic() < deadline, c
    assert c.get("malformed", 0) + c.get("unknown_spi", 0) >= 4
    after = gw.snapshot()
    assert [s["spi_in"] for s in after["child_sas"]] == [s["spi_in"] for s in before["child_sas"]]
    assert [s["state"] for s in after["ike_sas"]] == ["ESTABLISHED"]
    # A replayed ESP packet: capture one on the WAN and send it again.
    wan_if = env.lab.interfaces["gw.wan"]
    with Capture(
        env.lab.gw, wan_if, env.gws.dir / "replay.pcap", "ip proto 50 and dst host " + a.gw_wan4
    ) as cap:
        assert env.login()["status"] == "PASS"
    from scapy.layers.inet import IP

    esp = [bytes(p[IP].payload) for p in cap.packets() if p.haslayer(IP)]  # type: ignore[attr-defined,index]
    assert esp
    replayed_before = counters().get("in_replayed", 0)
    _send_raw(env, "bypass", 50, a.gw_wan4, esp[:3])
    deadline = time.monotonic() + 10
    while counters().get("in_replayed", 0) < replayed_before + 3:
        assert time.monotonic() < deadline, counters()
    assert env.login()["status"] == "PASS"  # and the tunnel still works


def _leftovers(env: Env, side: str) -> tuple[list[str], list[str], list[str]]:
    ns = env.lab.ns(side)
    tuns = ns.run(["ip", "-o", "link", "show", "type", "tun"]).stdout.strip().splitlines()
    rules = [r for r in ns.run(["ip", "rule"]).stdout.splitlines() if "0x4950" in r or "18768" in r]
    rules += [
        r for r in ns.run(["ip", "-6", "rule"]).stdout.splitlines() if "0x4950" in r or "18768" in r
    ]
    routes = (
        ns.run(["ip", "route", "show", "table", "18768"], check=False).stdout.strip().splitlines()
    )
    return tuns, rules, routes


def down_after_block(env: Env, side: str) -> tuple[list[str], list[str], list[str]]:
    """After a SIGTERM with ``on_stop = "block"`` (the default): no TUN, the rules and
    one prohibit route per protected prefix stay; ``ipsecmgr down`` removes them.
    Returns what is left after that."""
    tuns, rules, routes = _leftovers(env, side)
    assert tuns == [] and len(rules) == 4, (tuns, rules)
    assert routes and all(r.startswith("prohibit ") for r in routes), routes
    out = env.lab.ns(side).run([sys.executable, "-m", "ipsecmgr.cli", "down"], check=False)
    assert out.returncode == 0, out.stderr
    return _leftovers(env, side)


def test_sigterm_leaves_nothing_and_sigkill_restart_works(tunnel4: Env) -> None:
    env = tunnel4
    env.start_server()
    env.gws.start_both()
    assert env.login()["status"] == "PASS"
    assert _leftovers(env, "client")[0]  # the TUN exists while running
    # SIGKILL the client gateway: a crash leaves its TUN and rules behind ...
    client = env.gws.gateways.pop("client")
    client.kill()
    # ... the next start cleans them up and works (INITIAL_CONTACT replaces the old SAs).
    client = env.gws.start("client")
    assert env.login().get("status") == "PASS", client.log[-3000:]
    gw: GatewayProcess = env.gws["gw"]
    deadline = time.monotonic() + 10
    while len(gw.snapshot()["ike_sas"]) != 1:
        assert time.monotonic() < deadline, gw.snapshot()["ike_sas"]
    # SIGTERM: DELETE sent, then no TUN; only the fail-closed block, until `down`.
    assert client.terminate() == 0
    assert down_after_block(env, "client") == ([], [], [])
    deadline = time.monotonic() + 10
    while gw.snapshot()["ike_sas"]:
        assert time.monotonic() < deadline, "responder kept the SA after DELETE"
    assert gw.terminate() == 0
    env.gws.gateways.clear()
    assert down_after_block(env, "gw") == ([], [], [])


def test_check_config_names_the_bad_key_and_fails(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[crypto_map.foo]\npeer = "198.51.100.300"\n')
    out = subprocess.run([sys.executable, "-m", "ipsecmgr.cli", "check-config", str(bad)],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 1
    assert "crypto_map.foo.peer" in out.stderr


def _two_map_client_config(env: Env) -> str:
    a = env.lab.addresses
    psk = env.gws.psk_file
    return f"""
[access_list.behind-gw]
rules = ["permit ip host {a.src_ip4} host {a.server4}"]
[access_list.second-server]
rules = ["permit tcp host {a.client_wan4} host {a.bypass4}"]
[ike_transform_set.ike]
dh_group = 19
[ipsec_transform_set.tun]
mode = "tunnel"
[ipsec_transform_set.tr]
mode = "transport"
esp = "aes-gcm-128"
[crypto_map.tunnel-map]
peer = "{a.gw_wan4}"
match_address = "behind-gw"
local_psk = {{ file = "{psk}" }}
ike_transform_sets = ["ike"]
ipsec_transform_sets = ["tun"]
src_ip = "{a.src_ip4}"
[crypto_map.transport-map]
peer = "{a.bypass4}"
match_address = "second-server"
local_psk = {{ file = "{psk}" }}
ike_transform_sets = ["ike"]
ipsec_transform_sets = ["tr"]
[tun.ipsm0]
addresses = []
routes = ["{a.server4}/32"]
crypto_maps = ["tunnel-map"]
[tun.ipsm1]
addresses = []
routes = ["{a.bypass4}/32"]
crypto_maps = ["transport-map"]
[gateway]
local_addresses = ["{a.client_wan4}"]
management_interface = "{env.lab.interfaces["client.wan"]}"
control_socket = "{env.gws.dir / "client.sock"}"
"""


def _transport_responder_config(env: Env, psk: Path | None = None) -> str:
    a = env.lab.addresses
    return f"""
[access_list.back]
rules = ["permit tcp host {a.bypass4} host {a.client_wan4}"]
[ike_transform_set.ike]
dh_group = 19
[ipsec_transform_set.tr]
mode = "transport"
esp = "aes-gcm-128"
[crypto_map.from-client]
peer = "{a.client_wan4}"
match_address = "back"
local_psk = {{ file = "{psk or env.gws.psk_file}" }}
ike_transform_sets = ["ike"]
ipsec_transform_sets = ["tr"]
role = "responder"
[tun.ipsm0]
addresses = []
routes = ["{a.client_wan4}/32"]
crypto_maps = ["from-client"]
[gateway]
local_addresses = ["{a.bypass4}"]
management_interface = "{env.lab.interfaces["bypass.wan"]}"
control_socket = "{env.gws.dir / "bypass.sock"}"
"""


def test_two_crypto_maps_two_peers_tunnel_and_transport_in_one_daemon(tunnel4: Env) -> None:
    """Two TACACS+ servers, each behind its own peer: one tunnel-mode map via the
    responder gateway, one transport-mode map straight to the second server."""
    env = tunnel4
    server, second = env.start_server("server"), env.start_server("bypass")
    env.gws.start("gw", dh_group=19)
    conf = env.gws.dir / "bypass.toml"
    conf.write_text(_transport_responder_config(env))
    env.gws.start("bypass", config=conf)
    conf = env.gws.dir / "client-two-maps.toml"
    conf.write_text(_two_map_client_config(env))
    client = env.gws.start("client", config=conf)
    a = env.lab.addresses
    assert env.login()["status"] == "PASS"
    assert env.login(server=a.bypass4)["status"] == "PASS"
    assert server.transactions()[0]["peer"] == a.src_ip4
    assert second.transactions()[0]["peer"] == a.client_wan4
    sas = {s["crypto_map"]: s for s in client.snapshot()["child_sas"]}
    assert sas["tunnel-map"]["mode"] == "tunnel" and sas["transport-map"]["mode"] == "transport"
    assert sas["tunnel-map"]["packets_in"] > 0 and sas["transport-map"]["packets_in"] > 0
    assert client.counter("ike", "tunnel-map/first_packet_drops") == 1
    assert client.counter("ike", "transport-map/first_packet_drops") == 1


def test_sighup_keeps_unchanged_maps_rebuilds_changed_refuses_broken(tunnel4: Env) -> None:
    env = tunnel4
    env.start_server()
    env.gws.start_both()
    assert env.login()["status"] == "PASS"
    client = env.gws["client"]
    spis = [s["spi_in"] for s in client.snapshot()["child_sas"]]
    assert len(spis) == 1

    def hup_and_wait(marker: str) -> None:
        n = client.log.count(marker)
        client.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while client.log.count(marker) == n:
            assert time.monotonic() < deadline, client.log[-2000:]

    hup_and_wait("reloaded:")  # same file: the SA stays
    assert [s["spi_in"] for s in client.snapshot()["child_sas"]] == spis
    original = client.config.read_text()
    client.config.write_text(original + "\n[broken\n")
    hup_and_wait("reload refused")
    assert [s["spi_in"] for s in client.snapshot()["child_sas"]] == spis
    # A changed crypto map: its SAs are deleted (the peer is told) and rebuilt.
    client.config.write_text(original.replace('first_packet = "drop"', 'first_packet = "queue"'))
    hup_and_wait("reloaded:")
    assert client.snapshot()["child_sas"] == []
    assert env.login()["status"] == "PASS"
    new = [s["spi_in"] for s in client.snapshot()["child_sas"]]
    assert len(new) == 1 and new != spis
    assert client.counter("ike", "tacacs/first_packet_queued") == 1


def test_a_wrong_psk_on_one_map_leaves_the_other_map_working(tunnel4: Env, tmp_path: Path) -> None:
    env = tunnel4
    server, second = env.start_server("server"), env.start_server("bypass")
    env.gws.start("gw", dh_group=19)
    wrong = tmp_path / "wrong-psk"
    wrong.write_bytes(b"another-psk-entirely")
    wrong.chmod(0o600)
    conf = env.gws.dir / "bypass.toml"
    conf.write_text(_transport_responder_config(env, psk=wrong))
    env.gws.start("bypass", config=conf)
    conf = env.gws.dir / "client-two-maps.toml"
    conf.write_text(_two_map_client_config(env))
    client = env.gws.start("client", config=conf)
    a = env.lab.addresses
    assert env.login(server=a.bypass4).get("status") != "PASS"
    assert second.transactions() == []
    assert env.login()["status"] == "PASS"  # the other map is unaffected
    assert server.transactions()[0]["peer"] == a.src_ip4
    shown = client.show("crypto map")
    failed = shown[shown.index("Map Name : transport-map") :]
    assert "Last Error" in failed and "AUTHENTICATION_FAILED" in failed, shown
    status = {m["name"]: m["status"] for m in client.snapshot()["crypto_maps"]}
    # The refused map waits (#15.5: 1 s, doubling) before trying again: "hold-down"
    # while that runs, "failed" after it.
    assert status["tunnel-map"] == "up"
    assert status["transport-map"] in ("hold-down", "failed"), status


def test_mss_clamping_is_on_by_default(tunnel4: Env, tmp_path: Path) -> None:
    """The server's SYN-ACK announces MSS 1460 (its 1500-byte LAN); read from the
    responder's TUN it is clamped to the TUN's 1400 - 40, checksum still valid."""
    from scapy.layers.inet import IP, TCP

    env = tunnel4
    env.start_server()
    env.gws.start_both()
    syn_filter = "tcp[tcpflags] & tcp-syn != 0"
    with Capture(env.lab.client, "ipsm0", tmp_path / "tun.pcap", syn_filter) as syns:
        assert env.login()["status"] == "PASS"
    synacks = [p for p in syns.packets() if p.haslayer(TCP) and p[TCP].flags.A]  # type: ignore[attr-defined,index]
    assert synacks
    assert {dict(p[TCP].options)["MSS"] for p in synacks} == {1360}  # type: ignore[index]
    for p in synacks:  # scapy recomputes the checksum of the same bytes: it must agree
        raw = bytes(p[IP])  # type: ignore[index]
        again = IP(raw)
        del again[TCP].chksum
        assert IP(bytes(again))[TCP].chksum == IP(raw)[TCP].chksum
    assert env.gws["gw"].counter("tun", "tun_mss_clamped") == len(synacks)
