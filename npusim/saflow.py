"""Inbound SA-flow table: SPI → SA, and the policy check after decryption.

Reference steps 9-10: every inbound ESP packet is first matched against the
SA flows by its SPI (``lookup``/``lookup_esp``); only a known SPI goes on to
decryption.  After decryption the inner packet must fall inside the traffic
selectors negotiated for that SA, or it is dropped and counted (RFC 4301 §5.2:
"check that the packet ... matches the selectors of the SA").

Orientation.  For an inbound SA the peer is the sender, so the inner source
must lie in the *remote* selectors (the peer's side; TSi when the peer
initiated, TSr when we did) and the inner destination in the *local* ones.
``add`` takes them as ``src_selectors`` (remote) and ``dst_selectors``
(local), named for the inner header field they constrain.  The packet is
accepted when its source is in any source selector and its destination in
any destination selector, each with a matching protocol and port (IKEv2
selector sets are the cross product, RFC 7296 §2.9).

Transport mode (RFC 4301 §4.1): the decrypted payload is the upper-layer
segment, not an IP packet.  The addresses to check are then the outer
header's, the protocol is ESP's Next Header, and the ports come from the
first bytes of the payload: ``check_inbound_transport(flow, outer_src,
outer_dst, protocol, l4_header)`` takes exactly those (addresses as the raw
4- or 16-byte fields of the outer header).

Ports.  A selector whose port range is 0-65535 needs no port.  Otherwise the
packet's port must be known and in range: a non-first fragment (ports OPAQUE,
RFC 4301 §7) or a truncated header fails such a selector.  For ICMP and ICMPv6
the "port" is ``type << 8 | code`` (RFC 7296 §3.13.1) on both sides.

The table holds the caller's SA object (``flow.sa``) without knowing its type:
npusim imports nothing from esp.

Drop reasons.  :meth:`SaFlowTable.inbound_drop` and
:meth:`SaFlowTable.inbound_drop_transport` say why a packet is refused, one of
:data:`POLICY_REASONS`: ``protocol`` (no selector pair carries its protocol),
``address`` (the protocol is allowed, an address is outside), ``port`` (the
addresses are inside, a port is not), ``acl`` (inside the selectors, but the
map's ACL, read in the reply direction, does not permit it: a deny line, or a
combination of two permit lines that the selector cross product admits) and
``inner_malformed``.  The ACL check is the classifier's own index
(:meth:`npusim.Classifier.permits_reply`), so it costs one lookup, not one test
per rule; and none when the SA's selectors lie wholly inside what the map
permits (:meth:`npusim.Classifier.covers_reply`): then the selectors alone
decide. That is decided once per SA and classifier, on the SA's first packet
checked against that classifier (a reconfiguration brings a new classifier,
and the SA is judged again against it).

Counters: ``counters[GLOBAL]`` has ``unknown_spi`` and ``malformed_esp``;
``counters[crypto_map]`` has ``policy_ok``, ``policy_violation`` and
``inner_malformed`` (the decrypted packet is not a readable IP packet; it is
also refused), and, once one happened, ``policy_<reason>`` per drop reason.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from npusim.classifier import Box, Classifier
from npusim.counters import GLOBAL, zero
from npusim.packet import (
    PORT_PROTOCOLS,
    PORTS_NONE,
    PORTS_OK,
    PORTS_TRUNCATED,
    PROTO_ICMP,
    PROTO_ICMPV6,
    parse_selectors,
)

_FAMILY_MAX: Final = {4: (1 << 32) - 1, 6: (1 << 128) - 1}

POLICY_PROTOCOL: Final = "protocol"
POLICY_ADDRESS: Final = "address"
POLICY_PORT: Final = "port"
POLICY_ACL: Final = "acl"
POLICY_MALFORMED: Final = "inner_malformed"
POLICY_REASONS: Final = (POLICY_PROTOCOL, POLICY_ADDRESS, POLICY_PORT, POLICY_ACL, POLICY_MALFORMED)


@dataclass(frozen=True, slots=True)
class TrafficSelector:
    """One IKEv2-style traffic selector (RFC 7296 §3.13.1): an address range,
    an IP protocol (0 = any) and an inclusive port range."""

    version: int
    protocol: int = 0
    start: int = 0
    end: int = -1  # -1: the top of the family's address space
    start_port: int = 0
    end_port: int = 65535

    def __post_init__(self) -> None:
        if self.version not in _FAMILY_MAX:
            raise ValueError(f"traffic selector version must be 4 or 6, not {self.version}")
        top = _FAMILY_MAX[self.version]
        if self.end == -1:
            object.__setattr__(self, "end", top)
        if not 0 <= self.start <= self.end <= top:
            raise ValueError(f"bad IPv{self.version} address range {self.start}..{self.end}")
        if not 0 <= self.start_port <= self.end_port <= 65535:
            raise ValueError(f"bad port range {self.start_port}..{self.end_port}")
        if not 0 <= self.protocol <= 255:
            raise ValueError(f"bad protocol {self.protocol}")

    @classmethod
    def from_prefix(
        cls, prefix: str, protocol: int = 0, ports: tuple[int, int] = (0, 65535)
    ) -> TrafficSelector:
        """From ``192.0.2.0/24``, ``2001:db8::/64`` or a bare address (a /32 or /128)."""
        net = ipaddress.ip_network(prefix, strict=False)
        return cls(
            net.version,
            protocol,
            int(net.network_address),
            int(net.broadcast_address),
            ports[0],
            ports[1],
        )

    @classmethod
    def from_range(
        cls, start: str, end: str, protocol: int = 0, ports: tuple[int, int] = (0, 65535)
    ) -> TrafficSelector:
        """From an address range, as IKEv2 carries it."""
        a = ipaddress.ip_address(start)
        b = ipaddress.ip_address(end)
        if a.version != b.version:
            raise ValueError(f"address range {start}..{end} mixes families")
        return cls(a.version, protocol, int(a), int(b), ports[0], ports[1])

    @classmethod
    def any(cls, version: int) -> TrafficSelector:
        """Everything of one family (0.0.0.0-255.255.255.255 or ::-ffff:...)."""
        return cls(version)

    def contains(self, version: int, protocol: int, addr: int, port: int) -> bool:
        """Whether one side of a packet (its address and port) is inside.

        ``port`` is -1 when the packet has none or it is not visible.
        """
        return (
            self.version == version
            and (self.protocol == 0 or self.protocol == protocol)
            and self.start <= addr <= self.end
            and (
                (self.start_port == 0 and self.end_port == 65535)
                or self.start_port <= port <= self.end_port
            )
        )


@dataclass(slots=True, eq=False)
class SaFlow:
    """One inbound SA as NPUSIM knows it."""

    spi: int
    sa: object
    src_selectors: tuple[TrafficSelector, ...]
    dst_selectors: tuple[TrafficSelector, ...]
    crypto_map: str
    counters: dict[str, int] = field(repr=False)
    # The classifier the selectors were last judged against, and whether that
    # map permits everything they admit (Classifier.covers_reply).
    acl: Classifier | None = field(default=None, repr=False)
    acl_covered: bool = False

    def boxes(self) -> list[Box]:
        """The selector cross product (RFC 7296 §2.9) as covers_reply takes it:
        pairs of one family and compatible protocols (0 is any)."""
        out: list[Box] = []
        for s in self.src_selectors:
            for d in self.dst_selectors:
                if s.version != d.version or (
                    s.protocol and d.protocol and s.protocol != d.protocol
                ):
                    continue
                out.append(
                    (
                        s.version,
                        s.protocol or d.protocol,
                        s.start,
                        s.end,
                        d.start,
                        d.end,
                        s.start_port,
                        s.end_port,
                        d.start_port,
                        d.end_port,
                    )
                )
        return out


class SaFlowTable:
    """Inbound SPI → :class:`SaFlow`, with the post-decryption policy check."""

    def __init__(self) -> None:
        self._flows: dict[int, SaFlow] = {}
        self._global = {"unknown_spi": 0, "malformed_esp": 0}
        self.counters: dict[str, dict[str, int]] = {GLOBAL: self._global}

    def add(
        self,
        spi: int,
        sa: object,
        src_selectors: Sequence[TrafficSelector],
        dst_selectors: Sequence[TrafficSelector],
        crypto_map: str,
    ) -> SaFlow:
        """Install an inbound SA.

        ``src_selectors`` constrain the inner source (the peer's side),
        ``dst_selectors`` the inner destination (ours).
        """
        # RFC 4303 §2.1: SPI 0 is reserved for local use, 1-255 by IANA.
        if not 256 <= spi <= 0xFFFFFFFF:
            raise ValueError(f"SPI {spi:#x} is outside 256..2^32-1")
        if spi in self._flows:
            raise ValueError(f"SPI {spi:#010x} is already installed")
        if crypto_map == GLOBAL:
            raise ValueError(f"crypto map name {GLOBAL!r} is reserved for global counters")
        if not src_selectors or not dst_selectors:
            raise ValueError("an SA needs at least one source and one destination selector")
        counters = self.counters.setdefault(
            crypto_map, {"policy_ok": 0, "policy_violation": 0, "inner_malformed": 0}
        )
        flow = SaFlow(spi, sa, tuple(src_selectors), tuple(dst_selectors), crypto_map, counters)
        self._flows[spi] = flow
        return flow

    def remove(self, spi: int) -> SaFlow | None:
        """Uninstall; returns the flow, or None if the SPI was not installed."""
        return self._flows.pop(spi, None)

    def lookup(self, spi: int) -> SaFlow | None:
        """The flow for an inbound SPI; an unknown SPI is counted (step 9)."""
        flow = self._flows.get(spi)
        if flow is None:
            self._global["unknown_spi"] += 1
        return flow

    def lookup_esp(self, esp: bytes | bytearray | memoryview) -> SaFlow | None:
        """Like :meth:`lookup`, reading the SPI from an ESP packet (after the IP
        header or the UDP encapsulation).  Shorter than SPI + sequence number:
        counted as ``malformed_esp`` (RFC 4303 §2)."""
        if len(esp) < 8:
            self._global["malformed_esp"] += 1
            return None
        return self.lookup(int.from_bytes(esp[:4], "big"))

    def check_inbound(self, flow: SaFlow, inner_packet: bytes | bytearray | memoryview) -> bool:
        """Tunnel mode: whether the decrypted inner IP packet may be delivered."""
        return self.inbound_drop(flow, inner_packet) is None

    def check_inbound_transport(
        self,
        flow: SaFlow,
        outer_src: bytes | bytearray | memoryview,
        outer_dst: bytes | bytearray | memoryview,
        protocol: int,
        l4_header: bytes | bytearray | memoryview,
    ) -> bool:
        """Transport mode: check the outer addresses, ESP's Next Header and the
        first bytes of the decrypted payload (for the ports)."""
        return self.inbound_drop_transport(flow, outer_src, outer_dst, protocol, l4_header) is None

    def inbound_drop(
        self,
        flow: SaFlow,
        inner_packet: bytes | bytearray | memoryview,
        acl: Classifier | None = None,
    ) -> str | None:
        """Tunnel mode: None to deliver the decrypted inner IP packet, or why not
        (one of :data:`POLICY_REASONS`). With ``acl``, the map's ACL must also
        permit the packet's reply (RFC 4301 §5.2: the SPD entry, not only the SA)."""
        sel = parse_selectors(inner_packet)
        if isinstance(sel, str):
            flow.counters["inner_malformed"] += 1
            return POLICY_MALFORMED
        version, proto, src, dst, sport, dport, pstate = sel
        return self._drop(flow, version, proto, src, dst, sport, dport, pstate, acl)

    def inbound_drop_transport(
        self,
        flow: SaFlow,
        outer_src: bytes | bytearray | memoryview,
        outer_dst: bytes | bytearray | memoryview,
        protocol: int,
        l4_header: bytes | bytearray | memoryview,
        acl: Classifier | None = None,
    ) -> str | None:
        """Transport mode (RFC 4301 §5.2 applies in both modes): the outer
        addresses, ESP's Next Header and the payload's first bytes (the ports)
        against the SA's selectors and, with ``acl``, the map's ACL."""
        n = len(outer_src)
        if n != len(outer_dst) or n not in (4, 16):
            flow.counters["inner_malformed"] += 1
            return POLICY_MALFORMED
        version = 4 if n == 4 else 6
        src = int.from_bytes(outer_src, "big")
        dst = int.from_bytes(outer_dst, "big")
        sport = dport = -1
        pstate = PORTS_NONE
        if protocol in PORT_PROTOCOLS:
            pstate = PORTS_TRUNCATED
            if len(l4_header) >= 4:
                sport = l4_header[0] << 8 | l4_header[1]
                dport = l4_header[2] << 8 | l4_header[3]
                pstate = PORTS_OK
        elif protocol in (PROTO_ICMP, PROTO_ICMPV6) and len(l4_header) >= 2:
            sport = dport = l4_header[0] << 8 | l4_header[1]
        return self._drop(flow, version, protocol, src, dst, sport, dport, pstate, acl)

    @staticmethod
    def _drop(
        flow: SaFlow,
        version: int,
        proto: int,
        src: int,
        dst: int,
        sport: int,
        dport: int,
        pstate: int,
        acl: Classifier | None,
    ) -> str | None:
        c = flow.counters
        if _inside(flow.src_selectors, version, proto, src, sport) and _inside(
            flow.dst_selectors, version, proto, dst, dport
        ):
            if acl is not None and flow.acl is not acl:
                flow.acl = acl
                flow.acl_covered = acl.covers_reply(flow.crypto_map, flow.boxes())
            if (
                acl is None
                or flow.acl_covered
                or acl.permits_reply(
                    flow.crypto_map, version, proto, src, dst, sport, dport, pstate
                )
            ):
                c["policy_ok"] += 1
                return None
            reason = POLICY_ACL
        else:
            reason = _reason(flow, version, proto, src, dst)
        c["policy_violation"] += 1
        key = "policy_" + reason
        c[key] = c.get(key, 0) + 1
        return reason

    def clear_counters(self) -> None:
        """Zero every counter (the dicts stay the same objects)."""
        zero(self.counters)

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[SaFlow]:
        return iter(list(self._flows.values()))

    def __contains__(self, spi: object) -> bool:
        return spi in self._flows


def _inside(
    selectors: tuple[TrafficSelector, ...], version: int, proto: int, addr: int, port: int
) -> bool:
    for ts in selectors:  # noqa: SIM110 - a plain loop, per packet
        if ts.contains(version, proto, addr, port):
            return True
    return False


def _reason(flow: SaFlow, version: int, proto: int, src: int, dst: int) -> str:
    """Why a packet is outside the selectors (the drop path only): the first of
    protocol, address, port that no selector pair admits."""
    pairs = [(s, d) for s in flow.src_selectors for d in flow.dst_selectors]
    pairs = [
        (s, d)
        for s, d in pairs
        if s.version == d.version == version
        and s.protocol in (0, proto)
        and d.protocol in (0, proto)
    ]
    if not pairs:
        return POLICY_PROTOCOL
    if not any(s.start <= src <= s.end and d.start <= dst <= d.end for s, d in pairs):
        return POLICY_ADDRESS
    return POLICY_PORT
