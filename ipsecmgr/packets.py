"""What the data path reads and writes besides the ESP itself: the outbound
binding step 7 sends on, and the IP and virtio_net_hdr header helpers.

Imported by name by :mod:`ipsecmgr.datapath` (a module global like any other: no
call layer in the per-packet path), :mod:`ipsecmgr.split_worker`,
:mod:`ipsecmgr.invalid_spi` and :mod:`ipsecmgr.trace.pcap`.
"""

from __future__ import annotations

import socket
import struct
import sys
from dataclasses import dataclass

import esp
from ipsecmgr.offload import VNET_HDR_LEN, internet_checksum

_NATIVE = sys.byteorder

_IPV4_HDR = struct.Struct("!BBHHHBBH4s4s")


@dataclass(slots=True)  # one per crypto map with a Child SA
class OutboundBinding:
    """What step 7 needs for one crypto map: the SA, the socket and the peer.

    ``sock`` is the raw protocol-50 socket (``peer`` port 0) or, with NAT
    traversal, the UDP 4500 socket (``peer`` port 4500; RFC 3948 framing is
    just the ESP packet as the UDP payload)."""

    sa: esp.OutboundSA
    sock: socket.socket
    peer: tuple[str, int]
    mode: str  # "tunnel" | "transport"
    # The crypto map to report the next ESP sent on this binding for (Datapath.
    # on_esp_out, RFC 7296 §2.4 "only outgoing traffic", ipsecmgr.invalid_spi); None
    # after that until the manager asks again (watch_outbound): one compare per packet.
    watch: str | None = None


def tun_write_segments(buf: bytes) -> int:
    """How many packets one TUN write (virtio_net_hdr + packet) carries: 1, or for a
    TCP GSO super-packet its payload cut into gso_size pieces (the kernel's rule,
    net/core/gso.c); read from the IP and TCP headers, not trusted from hdr_len."""
    if not buf[1]:  # gso_type VIRTIO_NET_HDR_GSO_NONE
        return 1
    gso_size = int.from_bytes(buf[4:6], _NATIVE)
    ip = VNET_HDR_LEN
    hlen = (buf[ip] & 0x0F) * 4 if buf[ip] >> 4 == 4 else 40
    payload = len(buf) - ip - hlen - (buf[ip + hlen + 12] >> 4) * 4
    return max(1, -(-payload // gso_size)) if gso_size else 1


def build_ip_header(family: int, src: bytes, dst: bytes, proto: int, payload_len: int) -> bytes:
    """The IP header put back in front of a transport-mode payload (RFC 4303 §3.1.1)."""
    if family == socket.AF_INET:
        hdr = _IPV4_HDR.pack(0x45, 0, 20 + payload_len, 0, 0x4000, 64, proto, 0, src, dst)
        return hdr[:10] + internet_checksum(hdr).to_bytes(2, "big") + hdr[12:]
    return struct.pack("!IHBB16s16s", 6 << 28, payload_len, proto, 64, src, dst)


def ip_header_length(packet: bytes) -> tuple[int, int]:
    """(header length, protocol) of an IPv4/IPv6 packet (no extension headers walked)."""
    if packet[0] >> 4 == 4:
        return (packet[0] & 0x0F) * 4, packet[9]
    return 40, packet[6]
