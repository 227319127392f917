"""Fail fast to the client: the answer written back into the TUN when a protected
packet has no peer to go to (issue #20, docs/recovery.md "Failover").

Pure: bytes in, bytes out, ``now`` passed in. The daemon writes the answer into
the TUN the packet came from, so it reaches the local TCP stack as if the
server's side had said it; nothing here is ever sent on the network (in clear
or otherwise).

Two answers (``on_unreachable`` of a crypto map):

* ``"icmp"``: ICMP destination unreachable, communication administratively
  prohibited (RFC 1812 §5.2.7.1: type 3 code 13), or for IPv6 ICMPv6
  destination unreachable, "communication with destination administratively
  prohibited" (RFC 4443 §3.1: type 1 code 1). Linux fails a connect() in
  SYN-SENT at once on either (EHOSTUNREACH / EACCES: tcp_v4_err, tcp_v6_err).
* ``"rst"``: a TCP RST for a SYN (RFC 9293 §3.10.7.1, CLOSED state: the SYN
  carries no ACK, so the RST has SEQ 0 and acknowledges SEG.SEQ + SEG.LEN);
  connect() fails with ECONNREFUSED. Only a SYN is answered with a RST.

Never answered (RFC 1812 §4.3.2.7): an ICMP error, a non-initial fragment, a
packet to or from a multicast, broadcast or unspecified address; and with
``"rst"`` anything but a TCP SYN without ACK. Answers are rate-limited by
:class:`RateLimit` (RFC 1812 §4.3.2.8).
"""

from __future__ import annotations

import ipaddress
import struct

from ipsecmgr.offload import internet_checksum

#: RFC 1812 §5.2.7.1
ICMP_UNREACH, ICMP_ADMIN_PROHIBITED = 3, 13
#: RFC 4443 §3.1
ICMP6_UNREACH, ICMP6_ADMIN_PROHIBITED = 1, 1
#: RFC 1812 §4.3.2.3: an ICMP error carries as much of the packet as fits in 576
#: bytes; RFC 4443 §2.4 (c): an ICMPv6 error as much as fits in the minimum MTU.
ICMP4_MAX, ICMP6_MAX = 576, 1280
TTL = 64
_TCP_SYN, _TCP_RST, _TCP_ACK = 0x02, 0x04, 0x10
# ICMP types that are errors (never answered): RFC 792 / RFC 4443 §2.1 (types < 128)
_ICMP4_ERRORS = frozenset((3, 4, 5, 11, 12))
ANSWERS = ("icmp", "rst", "drop")


def _ipv4_header(src: bytes, dst: bytes, proto: int, payload_len: int) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, 0, 0x4000, TTL, proto, 0,
                      src, dst)  # fmt: skip
    return hdr[:10] + internet_checksum(hdr).to_bytes(2, "big") + hdr[12:]


def _ipv6_header(src: bytes, dst: bytes, proto: int, payload_len: int) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, payload_len, proto, TTL, src, dst)


def _pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """The pseudo-header's contribution to a TCP/ICMPv6 checksum (RFC 9293 §3.1,
    RFC 8200 §8.1), as the integer :func:`internet_checksum` adds first."""
    pseudo = (
        src
        + dst
        + (
            struct.pack("!HBBH", 0, 0, proto, length)
            if len(src) == 4
            else struct.pack("!IHBB", length, 0, 0, proto)
        )
    )
    return int.from_bytes(pseudo, "big")


def _addresses(packet: bytes) -> tuple[int, bytes, bytes, int, int] | None:
    """(version, src, dst, header length, protocol) of a packet that may be answered."""
    if len(packet) < 20:
        return None
    version = packet[0] >> 4
    if version == 4:
        hlen = (packet[0] & 0x0F) * 4
        if hlen < 20 or len(packet) < hlen:
            return None
        if struct.unpack_from("!H", packet, 6)[0] & 0x1FFF:
            return None  # a non-initial fragment (RFC 1812 §4.3.2.7)
        src, dst, proto = packet[12:16], packet[16:20], packet[9]
    elif version == 6 and len(packet) >= 40:
        hlen, src, dst, proto = 40, packet[8:24], packet[24:40], packet[6]
    else:
        return None
    for raw in (src, dst):
        ip = ipaddress.ip_address(raw)
        if ip.is_multicast or ip.is_unspecified or raw == b"\xff\xff\xff\xff":
            return None
    return version, src, dst, hlen, proto


def icmp_unreachable(packet: bytes) -> bytes | None:
    """ICMP(v6) destination unreachable, administratively prohibited, from the
    packet's destination to its source, quoting the packet; None if it must not
    be answered (RFC 1812 §4.3.2.7)."""
    addr = _addresses(packet)
    if addr is None:
        return None
    version, src, dst, hlen, proto = addr
    if version == 4:
        if proto == 1 and (len(packet) <= hlen or packet[hlen] in _ICMP4_ERRORS):
            return None
        quoted = packet[: ICMP4_MAX - 20 - 8]
        body = struct.pack("!BBHI", ICMP_UNREACH, ICMP_ADMIN_PROHIBITED, 0, 0) + quoted
        body = body[:2] + internet_checksum(body).to_bytes(2, "big") + body[4:]
        return _ipv4_header(dst, src, 1, len(body)) + body
    if proto == 58 and (len(packet) <= hlen or packet[hlen] < 128):
        return None  # RFC 4443 §2.4 (e.1): never in answer to an ICMPv6 error
    quoted = packet[: ICMP6_MAX - 40 - 8]
    body = struct.pack("!BBHI", ICMP6_UNREACH, ICMP6_ADMIN_PROHIBITED, 0, 0) + quoted
    csum = internet_checksum(body, _pseudo_sum(dst, src, 58, len(body)))
    body = body[:2] + csum.to_bytes(2, "big") + body[4:]
    return _ipv6_header(dst, src, 58, len(body)) + body


def tcp_rst_for_syn(packet: bytes) -> bytes | None:
    """The RST a closed port sends for a SYN (RFC 9293 §3.10.7.1): from the SYN's
    destination address and port, SEQ 0, ACK = SEG.SEQ + SEG.LEN; None for
    anything but a TCP SYN without ACK."""
    addr = _addresses(packet)
    if addr is None:
        return None
    version, src, dst, hlen, proto = addr
    if proto != 6 or len(packet) < hlen + 20:
        return None
    sport, dport, seq = struct.unpack_from("!HHI", packet, hlen)
    flags = packet[hlen + 13]
    if flags & (_TCP_SYN | _TCP_ACK | _TCP_RST) != _TCP_SYN:
        return None
    if version == 4:
        total = struct.unpack_from("!H", packet, 2)[0]
        ip_payload = min(total, len(packet)) - hlen
    else:
        ip_payload = min(struct.unpack_from("!H", packet, 4)[0], len(packet) - 40)
    data_len = max(0, ip_payload - (packet[hlen + 12] >> 4) * 4)
    ack = (seq + 1 + data_len) & 0xFFFFFFFF  # SEG.LEN counts the SYN (RFC 9293 §3.4)
    tcp = struct.pack("!HHIIBBHHH", dport, sport, 0, ack, 5 << 4, _TCP_RST | _TCP_ACK, 0, 0, 0)
    csum = internet_checksum(tcp, _pseudo_sum(dst, src, 6, len(tcp)))
    tcp = tcp[:16] + csum.to_bytes(2, "big") + tcp[18:]
    header = _ipv4_header if version == 4 else _ipv6_header
    return header(dst, src, 6, len(tcp)) + tcp


def answer_for(packet: bytes, how: str) -> bytes | None:
    """What ``on_unreachable = how`` answers to ``packet`` (None: nothing)."""
    if how == "icmp":
        return icmp_unreachable(packet)
    if how == "rst":
        return tcp_rst_for_syn(packet)
    return None


class RateLimit:
    """A token bucket (RFC 1812 §4.3.2.8: a router SHOULD limit the rate of the ICMP
    errors it sends): ``rate`` answers per second on average, at most ``burst`` at once."""

    def __init__(self, rate: float = 10.0, burst: int = 10) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.at: float | None = None

    def allow(self, now: float) -> bool:
        if self.at is not None and now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now if self.at is None else max(self.at, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
