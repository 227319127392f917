"""``[gateway] datapath = "split"`` end to end in the netns lab (root), plus its config key.

The key checks of test_gateway.py again with the data path in two worker
processes per gateway: TACACS+ AAA through the tunnel with only ESP on the
wire, the first-packet policy (drop counter 1; queue mode sends the SYN once),
a replayed ESP packet counted by the INBOUND worker, ``show`` answering with
the workers' counters, and SIGTERM / SIGKILL leaving no TUN, rule, route or
worker process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipsecmgr.config import ConfigError, load_config
from ipsecmgr.lab.capture import Capture
from ipsecmgr.lab.gateways import GatewayProcess
from ipsecmgr.mss import clamp_mss, mss_limits
from tests.integration.test_gateway import (
    Env,
    _send_raw,
    down_after_block,
    esp_packets,
    make_env,
    retransmitted_segments,
    tcp_port_49,
)


def start_split(env: Env, side: str, **options: object) -> GatewayProcess:
    conf = env.gws.write_config(side, **options)
    conf.write_text(conf.read_text().replace("[gateway]\n", '[gateway]\ndatapath = "split"\n'))
    return env.gws.start(side, config=conf)


def start_both_split(env: Env, **options: object) -> None:
    for side in ("gw", "client"):
        start_split(env, side, **options)


def children(pid: int) -> list[int]:
    """The PIDs of a process's children (the workers), from /proc."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, [p for p in pids if alive(p)]


@pytest.fixture
def split4(tmp_path: Path) -> Iterator[Env]:
    yield from make_env(tmp_path, "tunnel", 4)


@pytest.mark.parametrize("value", ["single", "split"])
def test_datapath_key_is_parsed(tmp_path: Path, value: str) -> None:
    conf = _minimal_config(tmp_path, f'datapath = "{value}"')
    assert load_config(conf).gateway.datapath == value


def test_datapath_default_is_single_and_bad_values_are_named(tmp_path: Path) -> None:
    assert load_config(_minimal_config(tmp_path, "")).gateway.datapath == "single"
    with pytest.raises(ConfigError) as exc:
        load_config(_minimal_config(tmp_path, 'datapath = "threads"'))
    assert "gateway.datapath: 'threads' is not one of 'single' | 'split'" in str(exc.value)


@pytest.mark.parametrize(
    ("line", "value"), [("", True), ("mss_clamp = false", False), ("mss_clamp = 1200", 1200)]
)
def test_mss_clamp_key(tmp_path: Path, line: str, value: object) -> None:
    assert load_config(_minimal_config(tmp_path, line)).gateway.mss_clamp == value


def test_mss_clamp_key_refuses_nonsense(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gateway.mss_clamp: 100 is not true, false or"):
        load_config(_minimal_config(tmp_path, "mss_clamp = 100"))


def _scapy_checksum_ok(packet: bytes) -> bool:
    """scapy recomputes the TCP checksum of the same bytes: the independent oracle."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6

    p = (IP if packet[0] >> 4 == 4 else IPv6)(packet)
    got = p[TCP].chksum
    del p[TCP].chksum
    return bool(got == (IP if packet[0] >> 4 == 4 else IPv6)(bytes(p))[TCP].chksum)


def _syn(version: int, options: list[tuple[str, object]], flags: str = "S") -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6

    ip = IP(src="192.0.2.1", dst="203.0.113.49") if version == 4 else IPv6(
        src="2001:db8:1::1", dst="2001:db8:113::49")  # fmt: skip
    return bytes(ip / TCP(sport=40000, dport=49, flags=flags, options=options))


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize(
    "options",
    [
        [("MSS", 1460)],
        [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("WScale", 7)],
        # A NOP first puts the MSS value at an odd offset: the byte-swapped update.
        [("NOP", None), ("MSS", 65495), ("WScale", 7), ("NOP", None)],
    ],
)
def test_clamp_mss_lowers_the_option_and_the_checksum_still_verifies(
    version: int, options: list[tuple[str, object]]
) -> None:
    from scapy.layers.inet import TCP

    syn = _syn(version, options)
    limits = mss_limits(1400, True)
    assert limits == (1360, 1340)
    out = clamp_mss(syn, *limits)
    assert len(out) == len(syn)
    mss = dict((_scapy_parse(out))[TCP].options)["MSS"]
    assert mss == (1360 if version == 4 else 1340)
    assert _scapy_checksum_ok(syn) and _scapy_checksum_ok(out)
    # Only the MSS value and the checksum changed.
    diff = [i for i, (a, b) in enumerate(zip(syn, out, strict=True)) if a != b]
    assert len(diff) <= 4


def _scapy_parse(packet: bytes) -> Any:
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    return (IP if packet[0] >> 4 == 4 else IPv6)(packet)


def test_clamp_mss_leaves_small_mss_non_syn_and_configured_limits_alone() -> None:
    small = _syn(4, [("MSS", 1200)])
    assert clamp_mss(small, 1360, 1340) is small
    ack = _syn(4, [("MSS", 1460)], flags="A")
    assert clamp_mss(ack, 1360, 1340) is ack
    synack = _syn(4, [("MSS", 1460)], flags="SA")
    assert clamp_mss(synack, 1360, 1340) != synack and _scapy_checksum_ok(
        clamp_mss(synack, 1360, 1340)
    )
    assert mss_limits(1400, False) is None
    assert mss_limits(1400, 1000) == (1000, 1000)
    assert mss_limits(9000, True) == (8960, 8940)


@given(st.binary(max_size=120))
def test_clamp_mss_never_raises_on_any_bytes(data: bytes) -> None:
    for prefix in (b"", b"\x45\x00\x00\x3c\x00\x00\x00\x00\x40\x06" + bytes(10)):
        out = clamp_mss(prefix + data, 1360, 1340)
        assert len(out) == len(prefix + data)


def _minimal_config(tmp_path: Path, gateway_extra: str) -> Path:
    psk = tmp_path / "psk"
    psk.write_bytes(b"0123456789abcdef")
    psk.chmod(0o600)
    conf = tmp_path / "gw.toml"
    conf.write_text(
        f"""
[access_list.a]
rules = ["permit ip host 192.0.2.1 host 203.0.113.49"]
[ike_transform_set.i]
[ipsec_transform_set.e]
[crypto_map.m]
peer = "198.51.100.2"
match_address = "a"
local_psk = {{ file = "{psk}" }}
ike_transform_sets = ["i"]
ipsec_transform_sets = ["e"]
src_ip = "192.0.2.1"
[tun.t0]
addresses = ["192.0.2.1/32"]
crypto_maps = ["m"]
[gateway]
local_addresses = ["198.51.100.1"]
{gateway_extra}
"""
    )
    return conf


@pytest.mark.root
@pytest.mark.slow
def test_split_tacacs_aaa_only_esp_on_the_wire_and_show_aggregates(
    split4: Env, tmp_path: Path
) -> None:
    env = split4
    server = env.start_server("server")
    start_both_split(env)
    for side in ("client", "gw"):
        assert len(children(env.gws[side].proc.pid)) == 2  # the two workers
    with (
        Capture(env.lab.client, env.lab.interfaces["client.wan"], tmp_path / "wan.pcap") as cap,
        Capture(
            env.lab.client, "ipsm0", tmp_path / "tun.pcap", "tcp[tcpflags] & tcp-syn != 0"
        ) as syns,
    ):
        auth = env.login()
        acct = env.lab.tacacs_query("client", server=env.server, secret_file=env.secret,
                                    user="alice", action="account",
                                    args=["task_id=7", "service=shell"])  # fmt: skip
    assert auth["status"] == "PASS", auth
    assert acct["status"] == "SUCCESS", acct
    assert [t["peer"] for t in server.transactions()] == [env.lab.addresses.src_ip4] * 2
    packets = cap.packets()
    assert tcp_port_49(packets, env.server) == []
    wire = esp_packets(packets)
    client = env.gws["client"]
    # The first packet went to the control process (no SA yet) and was dropped there.
    assert client.counter("ike", "tacacs/first_packet_drops") == 1
    # show: the workers' counters, merged. Out and in each match what crossed the WAN.
    snap = client.snapshot()
    esp = snap["statistics"]["esp"]
    from scapy.layers.inet import IP

    sent = len([p for p in wire if p[IP].src == env.lab.addresses.client_wan4])  # type: ignore[index]
    assert esp["esp_out_packets"] == sent >= 10
    assert esp["esp_in_packets"] == len(wire) - sent >= 5
    (child,) = snap["child_sas"]
    assert (child["packets_out"], child["packets_in"]) == (sent, len(wire) - sent)
    assert child["bytes_out"] > 0 and child["bytes_in"] > 0
    assert snap["statistics"]["classifier"]["tacacs/protect"] >= sent + 1
    assert snap["statistics"]["classifier"]["tacacs/policy_ok"] == len(wire) - sent
    # MSS clamping: the server's SYN-ACK (MSS 1460, its own 1500-byte link) left the
    # gw's OUTBOUND worker with the MSS of the TUN (1400 - 40); the client's own SYN
    # already fitted (its route goes through the TUN).
    from scapy.layers.inet import TCP

    synacks = [p for p in syns.packets() if p.haslayer(TCP) and p[TCP].flags.A]
    assert synacks
    assert {dict(p[TCP].options)["MSS"] for p in synacks} == {1360}
    assert env.gws["gw"].counter("tun", "tun_mss_clamped") == len(synacks)
    assert env.gws.stop() == {"gw": 0, "client": 0}


@pytest.mark.root
@pytest.mark.slow
def test_split_queue_mode_sends_the_first_syn_without_a_retransmission(split4: Env) -> None:
    env = split4
    env.start_server()
    start_both_split(env, first_packet="queue")
    before = retransmitted_segments(env)
    assert env.login()["status"] == "PASS"
    client = env.gws["client"]
    assert client.counter("ike", "tacacs/first_packet_queued") == 1
    # The control process handed the queued SYN to the OUTBOUND worker, which owns
    # the sequence numbers: it went out once, and the peer accepted it.
    assert client.counter("ike", "tacacs/queued_sent") == 1
    assert retransmitted_segments(env) == before
    assert env.gws["gw"].counter("esp", "in_replayed") == 0


@pytest.mark.root
@pytest.mark.slow
def test_split_replayed_esp_is_counted_and_the_tunnel_still_works(split4: Env) -> None:
    env = split4
    env.start_server()
    start_both_split(env)
    a = env.lab.addresses
    gw = env.gws["gw"]
    with Capture(env.lab.gw, env.lab.interfaces["gw.wan"], env.gws.dir / "replay.pcap",
                 "ip proto 50 and dst host " + a.gw_wan4) as cap:  # fmt: skip
        assert env.login()["status"] == "PASS"
    from scapy.layers.inet import IP

    esp = [bytes(p[IP].payload) for p in cap.packets() if p.haslayer(IP)]
    assert len(esp) >= 3
    before = gw.snapshot()
    in_before = before["statistics"]["esp"].get("esp_in_packets", 0)
    _send_raw(env, "bypass", 50, a.gw_wan4, esp[:3])
    deadline = time.monotonic() + 10
    while (stats := gw.snapshot()["statistics"]["esp"]).get("in_replayed", 0) < 3:
        assert time.monotonic() < deadline, stats
    assert stats["in_replayed"] == 3
    assert stats.get("esp_in_packets", 0) == in_before  # none of them delivered
    assert gw.snapshot()["child_sas"][0]["packets_in"] == in_before
    assert env.login()["status"] == "PASS"


@pytest.mark.root
@pytest.mark.slow
def test_split_sigterm_leaves_nothing_and_sigkill_takes_the_workers_along(split4: Env) -> None:
    env = split4
    env.start_server()
    start_both_split(env)
    assert env.login()["status"] == "PASS"
    client = env.gws.gateways.pop("client")
    workers = children(client.proc.pid)
    assert len(workers) == 2
    # SIGKILL the control process: the workers see EOF on their socketpair and exit.
    client.kill()
    wait_gone(workers)
    client = start_split(env, "client")
    assert env.login().get("status") == "PASS", client.log[-3000:]
    gw = env.gws["gw"]
    deadline = time.monotonic() + 10
    while len(gw.snapshot()["ike_sas"]) != 1:
        assert time.monotonic() < deadline, gw.snapshot()["ike_sas"]
    # SIGTERM: DELETE sent, workers stopped first, then no TUN or process; the block until `down`.
    workers = children(client.proc.pid)
    assert client.terminate() == 0
    assert not any(alive(p) for p in workers)
    assert down_after_block(env, "client") == ([], [], [])
    deadline = time.monotonic() + 10
    while gw.snapshot()["ike_sas"]:
        assert time.monotonic() < deadline, "responder kept the SA after DELETE"
    gw_workers = children(gw.proc.pid)
    assert gw.terminate() == 0
    env.gws.gateways.clear()
    assert not any(alive(p) for p in gw_workers)
    assert down_after_block(env, "gw") == ([], [], [])


@pytest.mark.root
@pytest.mark.slow
def test_split_control_plane_answers_under_full_load(split4: Env) -> None:
    """While iperf3 saturates the tunnel, ``show`` (which asks both workers for their
    counters) still answers within 100 ms, and the counters keep moving."""
    env = split4
    start_both_split(env)
    a = env.lab.addresses
    assert a.src_ip4 is not None
    lab = env.lab
    srv = lab.server.popen(["iperf3", "-s", "-1", "-B", a.server4], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not lab.server.run(["ss", "-Hltn", "sport = :5201"]).stdout.strip():
            assert time.monotonic() < deadline, "iperf3 server did not listen"
        # The first packet may be dropped (no SA yet): ping until the tunnel is up.
        deadline = time.monotonic() + 20
        while lab.client.run(["ping", "-c1", "-W1", "-I", a.src_ip4, a.server4],
                             check=False).returncode:  # fmt: skip
            assert time.monotonic() < deadline, "tunnel did not come up"
        cli = lab.client.popen(["iperf3", "-c", a.server4, "-B", a.src_ip4, "-t", "4", "-J"])
        client = env.gws["client"]
        worst, seen = 0.0, []
        try:
            end = time.monotonic() + 2.5
            while time.monotonic() < end:
                t0 = time.monotonic()
                snap = client.snapshot()
                worst = max(worst, time.monotonic() - t0)
                seen.append(snap["statistics"]["esp"].get("esp_out_packets", 0))
        finally:
            out, _ = cli.communicate(timeout=30)
        assert json.loads(out)["end"]["sum_received"]["bits_per_second"] > 1e6
        assert seen[-1] > seen[0]  # counters moved while we asked
        assert worst < 0.1, worst
    finally:
        if srv.poll() is None:
            os.kill(srv.pid, signal.SIGTERM)
        srv.wait(timeout=10)


@pytest.mark.root
@pytest.mark.slow
def test_split_clear_deletes_the_sas_in_the_workers_and_new_ones_carry_traffic(
    split4: Env,
) -> None:
    """``clear crypto sa``: the DELETE removes the Child SA from both workers (its SPI
    is unknown to the INBOUND worker afterwards), the next packet builds new SAs, and
    they reach the workers and carry the next login."""
    env = split4
    env.start_server()
    start_both_split(env)
    assert env.login()["status"] == "PASS"
    client, gw = env.gws["client"], env.gws["gw"]
    (old,) = client.snapshot()["child_sas"]
    assert client.command({"command": "clear", "peer": None})["result"]["cleared"] == 1
    deadline = time.monotonic() + 10
    while client.snapshot()["child_sas"] or gw.snapshot()["child_sas"]:
        assert time.monotonic() < deadline, client.snapshot()["child_sas"]
    # The old inbound SPI is gone from the gw's INBOUND worker: replaying an old
    # packet now counts as an unknown SPI, not as a replay.
    a = env.lab.addresses
    unknown = gw.counter("esp", "esp_unknown_spi")
    _send_raw(env, "bypass", 50, a.gw_wan4, [bytes.fromhex(old["spi_out"]) + bytes(40)])
    deadline = time.monotonic() + 10
    while gw.counter("esp", "esp_unknown_spi") != unknown + 1:
        assert time.monotonic() < deadline
    assert env.login()["status"] == "PASS"
    (new,) = client.snapshot()["child_sas"]
    assert new["spi_in"] != old["spi_in"] and new["spi_out"] != old["spi_out"]
    assert new["packets_out"] > 0 and new["packets_in"] > 0
    assert client.counter("ike", "tacacs/child_sa_installed") == 2
