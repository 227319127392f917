"""Access lists in the reference's configuration language.

Grammar of one line (tokens separated by white space, keywords case-insensitive)::

    line    := ACTION PROTO ADDR [PORTS] ADDR [PORTS]
             | "remark" ... | "!" ... | empty   (ignored, as in Cisco)
    ACTION  := "permit" | "deny"
    PROTO   := "ip" | "ipv6" | "tcp" | "udp" | "icmp" | "icmpv6" | "esp"
             | "ahp" | "gre" | "sctp" | NUMBER (0-255)
    ADDR    := "any" | "host" A | A4 WILDCARD4 | A "/" LEN
    PORTS   := ("eq" | "neq" | "lt" | "gt") PORT | "range" PORT PORT
    PORT    := NUMBER (0-65535) | a service name from PORT_NAMES

``permit`` means "protect this traffic", ``deny`` "do not protect it".  A
WILDCARD is a Cisco wildcard mask (1 bits are "don't care") and may be
non-contiguous.  IPv6 addresses are written as prefixes (``2001:db8::/64``),
``host 2001:db8::1`` or ``any``.  Port conditions are only valid with tcp and
udp (by name or number).  ``ip`` matches every protocol; ``icmp`` is IPv4's
protocol 1, ``icmpv6`` IPv6's 58.

Address family of a rule: IPv4 or IPv6 when an address or the protocol
(``icmp``, ``icmpv6``, ``ipv6``) says so; a rule with ``any`` on both sides
and a family-neutral protocol (``permit tcp any any eq 49``) matches both
families.

Input that is not canonical (host bits set under a wildcard or prefix, as in
``192.0.2.5 0.0.0.255``) is accepted, normalised and reported in
``Acl.warnings``.  Anything else that does not parse raises
:class:`AclSyntaxError` naming the list, the line, the token and what was
expected.  The reference's own first example
(``permit ip 209.165.200.225 1 0.0.0.0 209.165.201.1 0.0.0.0``) is such a
line: its stray ``1`` is reported where a wildcard mask was expected, rather
than guessed at, since a guess would decide what traffic goes out in clear.

Each line is compiled once into integers: the address masks are "care" masks
(the complement of the wildcard), so matching is ``addr & mask == value``, with
no string work and no ``ipaddress`` object per packet.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from npusim.packet import PORTS_OK, PROTO_TCP, PROTO_UDP

ANY_PROTOCOL: Final = -1
ANY_FAMILY: Final = 0

_V4_ALL: Final = 0xFFFFFFFF
_V6_ALL: Final = (1 << 128) - 1

# (protocol number, address family it pins or ANY_FAMILY)
PROTOCOL_NAMES: Final[dict[str, tuple[int, int]]] = {
    "ip": (ANY_PROTOCOL, ANY_FAMILY),
    "ipv6": (ANY_PROTOCOL, 6),
    "tcp": (PROTO_TCP, ANY_FAMILY),
    "udp": (PROTO_UDP, ANY_FAMILY),
    "icmp": (1, 4),
    "icmpv6": (58, 6),
    "esp": (50, ANY_FAMILY),
    "ahp": (51, ANY_FAMILY),
    "gre": (47, ANY_FAMILY),
    "sctp": (132, ANY_FAMILY),
}

# A few service names as Cisco accepts them after "eq" (tacacs is the point).
PORT_NAMES: Final[dict[str, int]] = {
    "tacacs": 49,
    "domain": 53,
    "www": 80,
    "http": 80,
    "https": 443,
    "isakmp": 500,
    "non500-isakmp": 4500,
    "ntp": 123,
    "snmp": 161,
    "syslog": 514,
    "ssh": 22,
    "telnet": 23,
}

_PORT_OPERATORS: Final = ("eq", "neq", "lt", "gt", "range")

PortRanges = tuple[tuple[int, int], ...]


class AclSyntaxError(ValueError):
    """A line of an access list does not parse.

    Attributes name the access list, the 1-based line number, the offending
    token (``""`` at end of line) and what the parser expected there.
    """

    def __init__(self, acl: str, line: int, token: str, expected: str, text: str) -> None:
        self.acl = acl
        self.line = line
        self.token = token
        self.expected = expected
        self.text = text
        where = f"'{token}'" if token else "end of line"
        super().__init__(
            f"ACL {acl} line {line}: unexpected {where}: expected {expected} (in: {text.strip()!r})"
        )


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled ACL line.

    ``src``/``dst`` are already masked with ``src_mask``/``dst_mask`` ("care"
    bits, the complement of the wildcard).  ``protocol`` is ``ANY_PROTOCOL``
    for ``ip``/``ipv6``.  ``src_ports``/``dst_ports`` are inclusive ranges, any
    of which may match, or ``None`` for no condition.
    """

    acl: str
    line: int
    text: str
    permit: bool
    version: int
    protocol: int
    src: int
    src_mask: int
    dst: int
    dst_mask: int
    src_ports: PortRanges | None
    dst_ports: PortRanges | None

    @property
    def where(self) -> str:
        """Trace label, e.g. ``ACL foo line 1``."""
        return f"ACL {self.acl} line {self.line}"

    @property
    def needs_ports(self) -> bool:
        return self.src_ports is not None or self.dst_ports is not None

    def matches(
        self,
        version: int,
        protocol: int,
        src: int,
        dst: int,
        sport: int,
        dport: int,
        port_state: int,
    ) -> bool:
        """Whether a packet's selectors match this rule (the slow, linear path).

        A packet whose ports are unknown (``port_state != PORTS_OK``) never
        matches a rule with a port condition.
        """
        if not self.matches_addresses(version, protocol, src, dst):
            return False
        if self.src_ports is not None and (
            port_state != PORTS_OK or not in_ranges(sport, self.src_ports)
        ):
            return False
        return self.dst_ports is None or (
            port_state == PORTS_OK and in_ranges(dport, self.dst_ports)
        )

    def matches_addresses(self, version: int, protocol: int, src: int, dst: int) -> bool:
        """Whether family, protocol and both addresses match (ports not looked at)."""
        if self.version and self.version != version:
            return False
        if self.protocol >= 0 and self.protocol != protocol:
            return False
        return src & self.src_mask == self.src and dst & self.dst_mask == self.dst


def in_ranges(port: int, ranges: PortRanges) -> bool:
    # A plain loop: any() over a generator costs ~3x more per packet.
    for lo, hi in ranges:  # noqa: SIM110
        if lo <= port <= hi:
            return True
    return False


@dataclass(frozen=True, slots=True)
class Acl:
    """A parsed access list: rules in order, first match wins.

    ``warnings`` holds one human-readable line per non-canonical input that
    was accepted and normalised (host bits set under a wildcard or prefix).
    """

    name: str
    rules: tuple[Rule, ...]
    warnings: list[str] = field(default_factory=list)

    def first_match(
        self,
        version: int,
        protocol: int,
        src: int,
        dst: int,
        sport: int,
        dport: int,
        port_state: int,
    ) -> Rule | None:
        """Linear first-match over this list; the classifier indexes instead."""
        for rule in self.rules:
            if rule.matches(version, protocol, src, dst, sport, dport, port_state):
                return rule
        return None


def parse_acl(name: str, lines: Sequence[str]) -> Acl:
    """Parse and compile an access list; raise :class:`AclSyntaxError` on bad input."""
    rules: list[Rule] = []
    warnings: list[str] = []
    for number, text in enumerate(lines, start=1):
        rule = _LineParser(name, number, text, warnings).parse()
        if rule is not None:
            rules.append(rule)
    return Acl(name, tuple(rules), warnings)


class _LineParser:
    def __init__(self, acl: str, line: int, text: str, warnings: list[str]) -> None:
        self.acl = acl
        self.line = line
        self.text = text
        self.tokens = text.split()
        self.pos = 0
        self.warnings = warnings
        self.addr_tok = ""

    def error(self, expected: str, token: str | None = None) -> AclSyntaxError:
        if token is None:
            token = self.tokens[self.pos] if self.pos < len(self.tokens) else ""
        return AclSyntaxError(self.acl, self.line, token, expected, self.text)

    def peek(self) -> str:
        return self.tokens[self.pos].lower() if self.pos < len(self.tokens) else ""

    def take(self, expected: str) -> str:
        if self.pos >= len(self.tokens):
            raise self.error(expected)
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def parse(self) -> Rule | None:
        if not self.tokens or self.tokens[0].startswith("!") or self.peek() == "remark":
            return None
        action = self.take("'permit' or 'deny'").lower()
        if action not in ("permit", "deny"):
            raise self.error("'permit' or 'deny'", self.tokens[self.pos - 1])
        protocol, proto_family = self.protocol()
        src_family, src, src_mask = self.address("a source address ('any', 'host A', 'A W')")
        src_ports = self.ports(protocol)
        src_tok = self.addr_tok
        dst_family, dst, dst_mask = self.address("a destination address ('any', 'host A', 'A W')")
        dst_tok = self.addr_tok
        dst_ports = self.ports(protocol)
        if self.pos < len(self.tokens):
            raise self.error(
                "a port condition (eq, neq, lt, gt, range) or end of line"
                if dst_ports is None and protocol in (PROTO_TCP, PROTO_UDP)
                else "end of line"
            )
        version = self._family(
            (proto_family, self.tokens[1]), (src_family, src_tok), (dst_family, dst_tok)
        )
        if version == ANY_FAMILY:
            # Both addresses are "any": masks are 0 in both families.
            src_mask = dst_mask = 0
        return Rule(
            acl=self.acl,
            line=self.line,
            text=self.text.strip(),
            permit=action == "permit",
            version=version,
            protocol=protocol,
            src=src,
            src_mask=src_mask,
            dst=dst,
            dst_mask=dst_mask,
            src_ports=src_ports,
            dst_ports=dst_ports,
        )

    def _family(self, *parts: tuple[int, str]) -> int:
        """The one address family that the protocol and both addresses agree on."""
        version = ANY_FAMILY
        for fam, tok in parts:
            if fam == ANY_FAMILY:
                continue
            if version not in (ANY_FAMILY, fam):
                raise self.error(f"an IPv{version} protocol or address, as before", tok)
            version = fam
        return version

    def protocol(self) -> tuple[int, int]:
        expected = "a protocol (ip, ipv6, tcp, udp, icmp, icmpv6, ... or 0-255)"
        tok = self.take(expected)
        known = PROTOCOL_NAMES.get(tok.lower())
        if known is not None:
            return known
        if tok.isdigit() and int(tok) <= 255:
            return int(tok), ANY_FAMILY
        raise self.error(expected, tok)

    def address(self, expected: str) -> tuple[int, int, int]:
        """(family, value, care-mask); family ANY_FAMILY for 'any'."""
        tok = self.take(expected)
        self.addr_tok = tok
        low = tok.lower()
        if low == "any":
            return ANY_FAMILY, 0, 0
        if low == "host":
            a = self.take("an IPv4 or IPv6 address after 'host'")
            self.addr_tok = a
            try:
                ip = ipaddress.ip_address(a)
            except ValueError:
                raise self.error("an IPv4 or IPv6 address after 'host'", a) from None
            full = _V4_ALL if ip.version == 4 else _V6_ALL
            return ip.version, int(ip), full
        if "/" in tok:
            try:
                net = ipaddress.ip_network(tok, strict=False)
            except ValueError:
                raise self.error("a prefix such as 192.0.2.0/24 or 2001:db8::/64", tok) from None
            value = int(ipaddress.ip_address(tok.split("/", 1)[0]))
            mask = int(net.netmask)
            if value & ~mask:
                self.warn(f"{tok} has host bits set; using {net}")
            return net.version, value & mask, mask
        try:
            ip = ipaddress.ip_address(tok)
        except ValueError:
            raise self.error(expected, tok) from None
        if ip.version == 6:
            raise self.error("an IPv6 prefix ('2001:db8::/64'), 'host A' or 'any'", tok)
        wtok = self.take(f"a wildcard mask (dotted quad such as 0.0.0.255) after {tok}")
        try:
            wild = int(ipaddress.IPv4Address(wtok))
        except ValueError:
            raise self.error(
                f"a wildcard mask (dotted quad such as 0.0.0.255) after {tok}", wtok
            ) from None
        mask = ~wild & _V4_ALL
        value = int(ip)
        if value & wild:
            canon = ipaddress.IPv4Address(value & mask)
            self.warn(f"{tok} {wtok} has bits set under the wildcard; using {canon} {wtok}")
        return 4, value & mask, mask

    def ports(self, protocol: int) -> PortRanges | None:
        op = self.peek()
        if op not in _PORT_OPERATORS:
            return None
        if protocol not in (PROTO_TCP, PROTO_UDP):
            raise self.error("an address or end of line (port conditions need tcp or udp)")
        self.pos += 1
        if op == "range":
            lo = self.port()
            hi = self.port()
            if lo > hi:
                raise self.error(f"a range end >= {lo}", self.tokens[self.pos - 1])
            return ((lo, hi),)
        p = self.port()
        if op == "eq":
            return ((p, p),)
        if op == "lt":
            if p == 0:
                raise self.error("a port above 0 after 'lt'", self.tokens[self.pos - 1])
            return ((0, p - 1),)
        if op == "gt":
            if p == 65535:
                raise self.error("a port below 65535 after 'gt'", self.tokens[self.pos - 1])
            return ((p + 1, 65535),)
        # neq
        return tuple(r for r in ((0, p - 1), (p + 1, 65535)) if r[0] <= r[1])

    def port(self) -> int:
        expected = "a port number (0-65535) or service name"
        tok = self.take(expected)
        named = PORT_NAMES.get(tok.lower())
        if named is not None:
            return named
        if tok.isdigit() and int(tok) <= 65535:
            return int(tok)
        raise self.error(expected, tok)

    def warn(self, what: str) -> None:
        self.warnings.append(f"ACL {self.acl} line {self.line}: {what}")
