"""``[gateway] offload``: TUN super-packets and UDP GSO/GRO, end to end in the netns lab (root).

A 20 MB TCP stream goes from the client host through our tunnel to the server,
in both data-path modes, with ESP in UDP 4500 (``encapsulation = "always"``) and
raw, with the offloads on and off. The oracles are independent of the daemon:
the receiver's SHA-256 of the stream, and the WAN capture (tcpdump), where a UDP
GSO super-packet shows up as one frame carrying several ESP packets back to back
(a GSO skb crosses the veth intact): those are cut apart by their SPI and
consecutive sequence numbers (RFC 4303 §2.2), which also checks the numbering.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipsecmgr.config import ConfigError, load_config
from ipsecmgr.lab.capture import Capture
from ipsecmgr.lab.gateways import GatewayProcess
from ipsecmgr.lab.topology import LabProcess, python_env
from tests.integration.test_gateway import Env, make_env
from tests.integration.test_workers import _minimal_config

pytestmark = [pytest.mark.root, pytest.mark.slow]

STREAM_BYTES = 20 * 1024 * 1024
PORT = 5002
NATT = 4500

# The receiver: one connection, everything until EOF, then its length and SHA-256.
SINK = """
import hashlib, json, socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
srv.settimeout(60)
print(json.dumps({"event": "listening"}), flush=True)
conn, _ = srv.accept()
conn.settimeout(60)
h, n = hashlib.sha256(), 0
while chunk := conn.recv(1 << 20):
    h.update(chunk)
    n += len(chunk)
print(json.dumps({"event": "done", "bytes": n, "sha256": h.hexdigest()}), flush=True)
"""

# The sender, bound to the tunnel's inner source: a deterministic stream.
SOURCE = """
import hashlib, socket, sys
dst, port, src, total = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.create_connection((dst, port), timeout=60, source_address=(src, 0))
block = hashlib.shake_256(b"offload").digest(1 << 16)
sent = 0
while sent < total:
    n = min(len(block), total - sent)
    s.sendall(block[:n])
    sent += n
s.close()
"""


def stream_digest() -> str:
    block = hashlib.shake_256(b"offload").digest(1 << 16)
    h, left = hashlib.sha256(), STREAM_BYTES
    while left:
        h.update(block[: min(len(block), left)])
        left -= min(len(block), left)
    return h.hexdigest()


def start(env: Env, side: str, datapath: str, encap: str, offload: bool) -> GatewayProcess:
    opts = {"map_options": {"encapsulation": "always"}} if encap == "udp" else {}
    conf = env.gws.write_config(side, **opts)  # type: ignore[arg-type]
    conf.write_text(conf.read_text().replace(
        "[gateway]\n", f'[gateway]\ndatapath = "{datapath}"\noffload = {str(offload).lower()}\n'
    ))  # fmt: skip
    return env.gws.start(side, config=conf)


def bulk_transfer(env: Env) -> dict[str, object]:
    """The stream client -> server through the tunnel; the receiver's summary."""
    a = env.lab.addresses
    sink = LabProcess(env.lab.server.popen([sys.executable, "-c", SINK, a.server4, str(PORT)],
                                           env=python_env()), "sink")  # fmt: skip
    try:
        sink.wait_for(lambda e: e.get("event") == "listening", timeout=10)
        env.lab.client.run(
            [sys.executable, "-c", SOURCE, a.server4, str(PORT), str(a.src_ip4), str(STREAM_BYTES)],
            timeout=90,
        )
        return sink.wait_for(lambda e: e.get("event") == "done", timeout=60)
    finally:
        if sink.proc.poll() is None:
            sink.proc.kill()
        sink.proc.wait(timeout=10)


def _esp_segments(payload: bytes) -> int:
    """ESP packets in one UDP payload: 1, or a GSO super-packet's segments, found by the
    next packet's SPI and sequence number (seq + 1) and checked all the way through."""
    spi, seq = payload[:4], int.from_bytes(payload[4:8], "big")
    size = payload.find(spi + ((seq + 1) & 0xFFFFFFFF).to_bytes(4, "big"), 8)
    if size < 0:
        return 1
    count = -(-len(payload) // size)
    for k in range(count):
        seg = payload[k * size : k * size + 8]
        assert seg[:4] == spi and int.from_bytes(seg[4:8], "big") == seq + k, (k, size)
    return count


def wan_esp(path: Path, src: str, encap: str) -> tuple[int, int, int]:
    """(ESP packets from ``src``, to ``src``, TCP frames) in the WAN capture."""
    from scapy.utils import RawPcapReader

    src_b = bytes(int(x) for x in src.split("."))
    out = inb = tcp = 0
    for frame, _meta in RawPcapReader(str(path)):
        if frame[12:14] != b"\x08\x00":  # IPv4 only (ARP, IPv6 ND are not ours)
            continue
        ip = frame[14:]
        hlen, proto = (ip[0] & 0x0F) * 4, ip[9]
        if proto == 6:
            tcp += 1
            continue
        if encap == "udp":
            if proto != 17 or int.from_bytes(ip[hlen + 2 : hlen + 4], "big") != NATT:
                continue
            payload = ip[hlen + 8 :]
            if len(payload) <= 1 or payload[:4] == b"\0\0\0\0":  # keepalive, IKE
                continue
            n = _esp_segments(payload)
        elif proto == 50:
            n = 1
        else:
            continue
        if ip[12:16] == src_b:
            out += n
        else:
            inb += n
    return out, inb, tcp


def counters(gw: GatewayProcess) -> dict[str, int]:
    stats = gw.snapshot()["statistics"]
    return {**stats["esp"], **stats["tun"]}  # type: ignore[dict-item]


def settled(gw: GatewayProcess, timeout: float = 10.0) -> dict[str, int]:
    """The counters once two reads 0.3 s apart agree (the connection's last FIN/ACKs
    are through): polling a condition with a deadline."""
    deadline = time.monotonic() + timeout
    last = counters(gw)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = counters(gw)
        if now == last:
            return now
        last = now
    raise AssertionError("the counters did not settle")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from make_env(tmp_path, "tunnel", 4)


@pytest.mark.parametrize(
    ("datapath", "encap", "offload"),
    [
        ("single", "udp", True),
        ("single", "raw", True),
        ("split", "udp", True),
        ("split", "raw", True),
        ("single", "udp", False),
        ("split", "udp", False),
    ],
)
def test_bulk_tcp_through_the_tunnel_with_offloads(
    env: Env, tmp_path: Path, datapath: str, encap: str, offload: bool
) -> None:
    from scapy.layers.inet import TCP

    a = env.lab.addresses
    wan = tmp_path / "wan.pcap"
    syn_filter = "tcp[tcpflags] & tcp-syn != 0"
    with Capture(env.lab.client, env.lab.interfaces["client.wan"], wan, buffer_kib=262144):
        # Started inside the capture: every ESP packet the counters count is on the wire.
        for side in ("gw", "client"):
            start(env, side, datapath, encap, offload)
        with Capture(env.lab.client, "ipsm0", tmp_path / "tun.pcap", syn_filter) as syns:
            got = bulk_transfer(env)
        client, gw = env.gws["client"], env.gws["gw"]
        c, g = settled(client), settled(gw)
    assert got == {"event": "done", "bytes": STREAM_BYTES, "sha256": stream_digest()}
    out, inb, tcp = wan_esp(wan, a.client_wan4, encap)
    assert tcp == 0  # nothing in clear: not the stream, not its ACKs
    (child,) = client.snapshot()["child_sas"]
    assert bool(child["encap"]) == (encap == "udp")
    # The daemons counted every ESP packet (segment) that crossed the WAN, no more.
    assert c["esp_out_packets"] == out == g["esp_in_packets"] > STREAM_BYTES // 1400
    assert g["esp_out_packets"] == inb == c["esp_in_packets"] > 0
    for k in ("esp_send_errors", "tun_write_errors", "in_replayed", "in_auth_failed"):
        assert c.get(k, 0) == g.get(k, 0) == 0, k
    # MSS clamping still sees the SYN-ACK (read from the gw's TUN, maybe with a vnet header).
    synacks = [p for p in syns.packets() if p.haslayer(TCP) and p[TCP].flags.A]
    assert synacks
    assert {dict(p[TCP].options)["MSS"] for p in synacks} == {1360}
    assert g["tun_mss_clamped"] == len(synacks)
    if offload:
        # The kernel really used the offloads: TSO super-packets read on the client, GSO
        # super-packets written on the gw; with ESP-in-UDP, GSO sends and GRO batches.
        assert c.get("tun_gso_reads", 0) > 0
        assert g.get("tun_gso_writes", 0) > 0
        if encap == "udp":
            assert c.get("esp_udp_gso_sends", 0) > 0
            assert g.get("esp_udp_gro_batches", 0) > 0
    else:
        for k in ("tun_gso_reads", "tun_gso_writes", "esp_udp_gso_sends", "esp_udp_gro_batches"):
            assert c.get(k, 0) == g.get(k, 0) == 0, k
    assert env.gws.stop() == {"gw": 0, "client": 0}


@pytest.mark.parametrize(("line", "value"), [("", True), ("offload = false", False)])
def test_offload_key(tmp_path: Path, line: str, value: bool) -> None:
    assert load_config(_minimal_config(tmp_path, line)).gateway.offload is value


def test_offload_key_refuses_nonsense(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gateway.offload: expected true or false, got 'yes'"):
        load_config(_minimal_config(tmp_path, 'offload = "yes"'))
