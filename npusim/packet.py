"""Bounds-checked extraction of the selector fields of an IP packet.

One function, :func:`parse_selectors`, turns the first bytes of an IPv4 or
IPv6 packet into the RFC 4301 §4.4.1.1 selector fields: IP version, next-layer
protocol, source and destination address (as ints) and the two ports.  It is
shared by the outbound classifier and the inbound SA-flow policy check, so that
both sides read a packet the same way.

It returns either a :data:`Selectors` tuple or, for a packet it cannot read, a
reason string (one of the ``DROP_*`` constants).  A string and not an
exception, because the caller is a per-packet loop and a malformed packet is an
expected input there, not an error.

Ports are only defined for protocols that carry them at offset 0 of the
upper-layer header (TCP, UDP, SCTP).  ``port_state`` says whether they could be
read:

* ``PORTS_OK``: both ports are valid.
* ``PORTS_NONE``: the protocol has no ports (ICMP, ESP, ...). For ICMP and
  ICMPv6 ``sport == dport == type << 8 | code`` (RFC 7296 §3.13.1), which the
  SA-flow check uses; the ACL language has no ICMP type matching.
* ``PORTS_OPAQUE``: a non-first fragment; its ports are in another fragment
  (RFC 4301 §7, "OPAQUE").
* ``PORTS_TRUNCATED``: the packet ends before the ports; the caller decides
  whether it needs them.
"""

from __future__ import annotations

import struct
from typing import Final

PORTS_OK: Final = 0
PORTS_NONE: Final = 1
PORTS_OPAQUE: Final = 2
PORTS_TRUNCATED: Final = 3

# Drop reasons: constant strings, also used as counter names.
DROP_EMPTY: Final = "empty_packet"
DROP_NOT_IP: Final = "not_ip"
DROP_TRUNCATED_IP: Final = "truncated_ip_header"
DROP_BAD_IHL: Final = "bad_ihl"
DROP_BAD_LENGTH: Final = "bad_total_length"
DROP_BAD_EXT: Final = "bad_ipv6_extension_header"
DROP_TRUNCATED_L4: Final = "truncated_l4_header"

ALL_DROP_REASONS: Final = (
    DROP_EMPTY,
    DROP_NOT_IP,
    DROP_TRUNCATED_IP,
    DROP_BAD_IHL,
    DROP_BAD_LENGTH,
    DROP_BAD_EXT,
    DROP_TRUNCATED_L4,
)

PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_ESP: Final = 50
PROTO_ICMPV6: Final = 58
PROTO_SCTP: Final = 132

# Protocols whose first four upper-layer bytes are source and destination port.
PORT_PROTOCOLS: Final = frozenset((PROTO_TCP, PROTO_UDP, PROTO_SCTP))
_ICMP_PROTOCOLS: Final = frozenset((PROTO_ICMP, PROTO_ICMPV6))

# IPv6 extension headers walked to reach the upper-layer protocol
# (RFC 8200 §4; RFC 4301 §4.4.1.1 "next layer protocol" is the one after them).
_HOP_BY_HOP: Final = 0
_ROUTING: Final = 43
_FRAGMENT: Final = 44
_DEST_OPTS: Final = 60

# version, protocol, src, dst, sport, dport, port_state
Selectors = tuple[int, int, int, int, int, int, int]

# First 20 bytes of IPv4: version/IHL, total length, flags/fragment offset,
# protocol, source, destination.
_V4 = struct.Struct("!B1xH2xH1xB2xII")
_PORTS = struct.Struct("!HH")
_V4_PORTS = struct.Struct("!B1xH2xH1xB2xIIHH")
# IPv6: payload length, next header, source and destination as 64-bit halves
# (one unpack is cheaper than two slices and int.from_bytes).
_V6 = struct.Struct("!4xHB1xQQQQ")


def parse_selectors(packet: bytes | bytearray | memoryview) -> Selectors | str:
    """Selector fields of an IPv4/IPv6 packet, or a ``DROP_*`` reason string."""
    n = len(packet)
    if n >= 24 and packet[0] == 0x45:
        # Fast path, one unpack: IPv4 without options, header and ports
        # (the same checks as below, specialised to IHL 5).
        _, total, frag, proto, src, dst, sport, dport = _V4_PORTS.unpack_from(packet)
        if 24 <= total <= n and not frag & 0x1FFF and proto in PORT_PROTOCOLS:
            return (4, proto, src, dst, sport, dport, PORTS_OK)
    if n == 0:
        return DROP_EMPTY
    version = packet[0] >> 4
    if version == 4:
        if n < 20:
            return DROP_TRUNCATED_IP
        vihl, total, frag, proto, src, dst = _V4.unpack_from(packet)
        ihl = (vihl & 0x0F) << 2
        if ihl < 20:
            return DROP_BAD_IHL
        # RFC 791: total length covers header and data; a buffer shorter than it
        # is a truncated packet, a total shorter than the header is nonsense.
        if total > n or total < ihl:
            return DROP_BAD_LENGTH
        if frag & 0x1FFF:
            # RFC 4301 §7: a non-first fragment carries no ports.
            return (4, proto, src, dst, -1, -1, PORTS_OPAQUE)
        if proto in PORT_PROTOCOLS and ihl + 4 <= total:
            # Ports right after a header with options.
            sport, dport = _PORTS.unpack_from(packet, ihl)
            return (4, proto, src, dst, sport, dport, PORTS_OK)
        return _upper(4, proto, src, dst, packet, ihl, total)
    if version == 6:
        if n < 40:
            return DROP_TRUNCATED_IP
        plen, nh, s_hi, s_lo, d_hi, d_lo = _V6.unpack_from(packet)
        end = 40 + plen
        if end > n:
            return DROP_BAD_LENGTH
        src = s_hi << 64 | s_lo
        dst = d_hi << 64 | d_lo
        off = 40
        first = True
        while nh in (_HOP_BY_HOP, _ROUTING, _DEST_OPTS, _FRAGMENT):
            if off + 8 > end:
                return DROP_BAD_EXT
            if nh == _FRAGMENT:
                frag_off = (packet[off + 2] << 8 | packet[off + 3]) >> 3
                if frag_off:
                    # RFC 4301 §7: the headers after a non-first fragment's
                    # Fragment header are not visible; its Next Header is the
                    # best protocol we have, and its ports are opaque.
                    return (6, packet[off], src, dst, -1, -1, PORTS_OPAQUE)
                hlen = 8
            elif nh == _HOP_BY_HOP and not first:
                # RFC 8200 §4.3: Hop-by-Hop only immediately after the header.
                return DROP_BAD_EXT
            else:
                hlen = (packet[off + 1] + 1) << 3
            nh = packet[off]
            off += hlen
            first = False
        if off > end:
            return DROP_BAD_EXT
        return _upper(6, nh, src, dst, packet, off, end)
    return DROP_NOT_IP


def _upper(
    version: int,
    proto: int,
    src: int,
    dst: int,
    packet: bytes | bytearray | memoryview,
    off: int,
    end: int,
) -> Selectors:
    if proto in PORT_PROTOCOLS:
        if off + 4 > end:
            return (version, proto, src, dst, -1, -1, PORTS_TRUNCATED)
        sport, dport = _PORTS.unpack_from(packet, off)
        return (version, proto, src, dst, sport, dport, PORTS_OK)
    if proto in _ICMP_PROTOCOLS and off + 2 <= end:
        tc = packet[off] << 8 | packet[off + 1]
        return (version, proto, src, dst, tc, tc, PORTS_NONE)
    return (version, proto, src, dst, -1, -1, PORTS_NONE)
