"""A traced flow as a pcap file, and Wireshark's key tables for its SAs.

The pcap (LINKTYPE_RAW, 101: each record is an IP packet) holds, with the
wall-clock time of each event:

* the clear packets as read from the TUN (step 2) and written to it (12);
* ESP as sent (7) and received (8): the outer IP header is rebuilt from the
  addresses (protocol 50, or UDP 4500 when the SA is NAT-T encapsulated);
* IKE datagrams sent and received, in IP/UDP from port 500 or 4500.

``--wireshark-keys DIR`` writes ``esp_sa`` and ``ikev2_decryption_table``
in the formats Wireshark's UAT tables read (verified with tshark 4.0), mode
0600: they hold keys that decrypt the traffic.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ipsecmgr.packets import build_ip_header
from ipsecmgr.trace import Event
from ipsecmgr.trace.io import open_private

LINKTYPE_RAW = 101
ESP_GCM_NAME = "AES-GCM with 16 octet ICV [RFC4106]"
NON_ESP_MARKER_HEX = "00000000"


def _family(addr: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def _ip(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    fam = _family(src)
    return (
        build_ip_header(
            fam, socket.inet_pton(fam, src), socket.inet_pton(fam, dst), proto, len(payload)
        )
        + payload
    )


def _udp(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    # Checksum 0: "none" for IPv4; Wireshark does not verify it by default for IPv6.
    return _ip(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)


def wire_packet(e: Event, natt_maps: set[str]) -> bytes | None:
    """The IP packet an event stands for on the wire or at the TUN, or None."""
    ev = e.get("event")
    try:
        if ev in ("tun_read", "tun_write") and e.get("packet"):
            return bytes.fromhex(e["packet"])
        wire = bytes.fromhex(e["wire"]) if isinstance(e.get("wire"), str) else None
        if wire is None:
            return None
        local = e.get("local")
        if ev == "esp_sent" and local:
            if e.get("peer_port") == 4500:
                return _udp(local, 4500, e["peer"], 4500, wire)
            return _ip(local, e["peer"], 50, wire)
        if ev == "esp_received" and local:
            if e.get("crypto_map") in natt_maps:
                return _udp(e["outer_src"], 4500, local, 4500, wire)
            return _ip(e["outer_src"], local, 50, wire)
        if ev in ("ike_sent", "ike_received") and local:
            port = 4500 if e["wire"].startswith(NON_ESP_MARKER_HEX) else 500
            peer, pport = e["peer"], int(e.get("peer_port") or port)
            if ev == "ike_sent":
                return _udp(local, port, peer, pport, wire)
            return _udp(peer, pport, local, port, wire)
    except (KeyError, ValueError, OSError, struct.error):
        return None
    return None


def write_pcap(path: Path | str, events: Iterable[Event]) -> int:
    """Write the packets of ``events``; returns how many records were written."""
    evs = sorted(events, key=lambda x: float(x.get("wall") or x.get("t") or 0.0))
    natt = {
        str(e.get("crypto_map"))
        for e in evs
        if e.get("event") == "esp_sent" and e.get("peer_port") == 4500
    }
    n = 0
    with open(path, "wb") as f:
        # pcap global header: magic, v2.4, UTC, sigfigs 0, snaplen, link type
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, LINKTYPE_RAW))
        for e in evs:
            pkt = wire_packet(e, natt)
            if pkt is None:
                continue
            ts = float(e.get("wall") or e.get("t") or 0.0)
            sec = int(ts)
            usec = min(round((ts - sec) * 1e6), 999999)
            f.write(struct.pack("<IIII", sec, usec, len(pkt), len(pkt)) + pkt)
            n += 1
    return n


# -- Wireshark key tables --------------------------------------------------------------


def involved_spis(events: Iterable[Event]) -> tuple[set[int], set[str]]:
    """ESP SPIs and IKE SPIi (hex) that appear in ``events``."""
    esp: set[int] = set()
    ike: set[str] = set()
    for e in events:
        for key in ("spi", "spi_in", "spi_out"):
            if isinstance(e.get(key), int):
                esp.add(e[key])
        wire = e.get("wire")
        if e.get("event") in ("esp_sent", "esp_received") and isinstance(wire, str):
            esp.add(int(wire[:8], 16))
        if isinstance(e.get("ike_spi_i"), str):
            ike.add(e["ike_spi_i"])
    return esp, ike


def esp_sa_rows(rows: Sequence[Mapping[str, str]]) -> list[str]:
    out = []
    for r in rows:
        fam = "IPv6" if ":" in r["src"] else "IPv4"
        out.append(
            f'"{fam}","{r["src"]}","{r["dst"]}","0x{r["spi"]}","{ESP_GCM_NAME}",'
            f'"0x{r["key"]}","NULL",""'
        )
    return out


def ikev2_rows(rows: Sequence[Mapping[str, str]]) -> list[str]:
    # SPIs and keys unquoted, algorithm names quoted (Wireshark's UAT format)
    return [
        f'{r["spi_i"]},{r["spi_r"]},{r["sk_ei"]},{r["sk_er"]},"{r["encryption"]}",'
        f'{r["sk_ai"]},{r["sk_ar"]},"{r["integrity"]}"'
        for r in rows
    ]


def write_wireshark_keys(
    directory: Path | str, keys: Mapping[str, Any], events: Iterable[Event]
) -> list[Path]:
    """``esp_sa`` and ``ikev2_decryption_table`` for the SAs in ``events`` (mode 0600)."""
    d = Path(directory)
    if not d.exists():
        d.mkdir(mode=0o700, parents=True)
        os.chmod(d, 0o700)
    esp, ike = involved_spis(events)
    esp_rows = [r for r in keys.get("esp", []) if int(r["spi"], 16) in esp]
    ike_rows = [r for r in keys.get("ike", []) if r["spi_i"] in ike]
    written = []
    for name, lines in (
        ("esp_sa", esp_sa_rows(esp_rows)),
        ("ikev2_decryption_table", ikev2_rows(ike_rows)),
    ):
        path = d / name
        with open_private(path) as f:
            f.write("".join(line + "\n" for line in lines))
        written.append(path)
    return written
