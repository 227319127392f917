"""Differential test: the indexed classifier against a deliberately simple
oracle written here with :mod:`ipaddress`, over random rule sets and packets.

The oracle never sees our parser's output: it works from the structured rule
specification that the test also renders into ACL text, and from the packet
fields the test chose before scapy built the bytes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.packet import Packet, Raw

from npusim import BYPASS, Classifier, CryptoMap, Drop, Protect, parse_acl

V4_POOL = [f"192.0.2.{i}" for i in range(8)] + [f"198.51.100.{i}" for i in (0, 1, 128, 255)]
V6_POOL = [f"2001:db8::{i:x}" for i in range(8)] + ["2001:db8:1::1", "2001:db8:1:0:8000::1"]
PORTS = [0, 1, 48, 49, 50, 500, 65535]


@dataclass(frozen=True)
class Addr:
    kind: str  # any | host | prefix | wildcard
    addr: str = ""
    arg: int = 0  # prefix length, or the wildcard as an int

    def text(self) -> str:
        if self.kind == "any":
            return "any"
        if self.kind == "host":
            return f"host {self.addr}"
        if self.kind == "prefix":
            return f"{self.addr}/{self.arg}"
        return f"{self.addr} {ipaddress.IPv4Address(self.arg)}"

    def matches(self, packet_addr: str) -> bool:
        a = ipaddress.ip_address(packet_addr)
        if self.kind == "any":
            return True
        r = ipaddress.ip_address(self.addr)
        if a.version != r.version:
            return False
        if self.kind == "host":
            return a == r
        if self.kind == "prefix":
            return a in ipaddress.ip_network(f"{self.addr}/{self.arg}", strict=False)
        # Cisco wildcard: every bit outside the wildcard must be equal.
        return all(
            (int(a) >> i) & 1 == (int(r) >> i) & 1 for i in range(32) if not (self.arg >> i) & 1
        )


@dataclass(frozen=True)
class Ports:
    op: str
    a: int
    b: int = 0

    def text(self) -> str:
        return f"range {self.a} {self.b}" if self.op == "range" else f"{self.op} {self.a}"

    def matches(self, p: int) -> bool:
        return {
            "eq": p == self.a,
            "neq": p != self.a,
            "lt": p < self.a,
            "gt": p > self.a,
            "range": self.a <= p <= self.b,
        }[self.op]


@dataclass(frozen=True)
class RuleSpec:
    permit: bool
    proto: str  # ip, ipv6, tcp, udp, icmp, icmpv6 or a number
    family: int | None  # None: both families
    src: Addr
    dst: Addr
    sports: Ports | None
    dports: Ports | None

    def text(self) -> str:
        parts = ["permit" if self.permit else "deny", self.proto, self.src.text()]
        if self.sports:
            parts.append(self.sports.text())
        parts.append(self.dst.text())
        if self.dports:
            parts.append(self.dports.text())
        return " ".join(parts)

    def proto_number(self) -> int | None:
        names = {"ip": None, "ipv6": None, "tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
        return names[self.proto] if self.proto in names else int(self.proto)

    def needs_ports(self) -> bool:
        return self.sports is not None or self.dports is not None

    def matches_no_ports(self, pkt: PacketSpec) -> bool:
        if self.family is not None and self.family != pkt.version:
            return False
        n = self.proto_number()
        if n is not None and n != pkt.proto:
            return False
        return self.src.matches(pkt.src) and self.dst.matches(pkt.dst)


@dataclass(frozen=True)
class PacketSpec:
    version: int
    proto: int
    src: str
    dst: str
    sport: int
    dport: int
    frag: str  # none | first | later | truncated
    ext: bool  # IPv6: add hop-by-hop and destination options headers

    def ports_known(self) -> bool:
        return self.proto in (6, 17) and self.frag in ("none", "first")

    def build(self) -> bytes:
        if self.version == 4:
            ip: Packet = IP(src=self.src, dst=self.dst, proto=self.proto)
            if self.frag == "first":
                ip.flags = "MF"
            elif self.frag == "later":
                ip.frag = 5
        else:
            ip = IPv6(src=self.src, dst=self.dst)
            if self.ext:
                ip = ip / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
            if self.frag in ("first", "later"):
                ip = ip / IPv6ExtHdrFragment(nh=self.proto, offset=5 if self.frag == "later" else 0)
            else:
                ip.lastlayer().nh = self.proto
        if self.frag == "later":
            return bytes(ip / Raw(bytes(range(16))))
        if self.frag == "truncated":
            return bytes(ip / Raw(b"\x9c"))
        if self.proto == 6:
            return bytes(ip / TCP(sport=self.sport, dport=self.dport))
        if self.proto == 17:
            return bytes(ip / UDP(sport=self.sport, dport=self.dport))
        return bytes(ip / Raw(b"\x08\x00\x00\x00\x00\x00\x00\x00"))


def oracle(maps: list[list[RuleSpec]], pkt: PacketSpec) -> tuple[str, int, int]:
    """(kind, map index, 1-based line) with the documented semantics."""
    return oracle_with_denies(maps, pkt)[0]


def oracle_with_denies(
    maps: list[list[RuleSpec]], pkt: PacketSpec
) -> tuple[tuple[str, int, int], list[int]]:
    """The verdict, and the maps whose deny line matched before it was reached
    (each counts one ``deny``)."""
    denied: list[int] = []
    for m, rules in enumerate(maps):
        for line, rule in enumerate(rules, start=1):
            if not rule.matches_no_ports(pkt):
                continue
            if rule.needs_ports():
                if pkt.frag == "truncated" and pkt.proto in (6, 17):
                    return ("drop", -1, -1), denied
                if not pkt.ports_known():
                    continue
                if rule.sports and not rule.sports.matches(pkt.sport):
                    continue
                if rule.dports and not rule.dports.matches(pkt.dport):
                    continue
            if rule.permit:
                return ("protect", m, line), denied
            denied.append(m)
            break  # deny: not via this map, try the next one
    return ("bypass", -1, -1), denied


def verdict_of(v: object) -> tuple[str, int, int]:
    if isinstance(v, Protect):
        return ("protect", int(v.crypto_map.name[1:]), v.rule.line)
    if isinstance(v, Drop):
        assert v.reason == "truncated_l4_header"
        return ("drop", -1, -1)
    assert v is BYPASS
    return ("bypass", -1, -1)


def check_against_oracle(
    maps: list[list[RuleSpec]], pkts: list[PacketSpec], memo_max: int = 65536, bulk: int = 8
) -> None:
    """Every packet twice (the remembered outcomes must agree too), with the memo
    and bulk-count limits given; then the per-map protect and deny counters."""
    clf = Classifier(
        [
            CryptoMap(f"m{i}", parse_acl(f"m{i}", [r.text() for r in rules]))
            for i, rules in enumerate(maps)
        ]
    )
    protect = [0] * len(maps)
    deny = [0] * len(maps)
    for pkt in pkts * 2:
        expected, denied = oracle_with_denies(maps, pkt)
        with (
            mock.patch("npusim.classifier._MEMO_MAX", memo_max),
            mock.patch("npusim.classifier._BULK_DENIES", bulk),
        ):
            got = verdict_of(clf.classify(pkt.build()))
        assert got == expected, ([[r.text() for r in m] for m in maps], pkt)
        if expected[0] == "protect":
            protect[expected[1]] += 1
        for m in denied:
            deny[m] += 1
    counters = clf.counters
    assert [counters[f"m{i}"]["protect"] for i in range(len(maps))] == protect
    assert [counters[f"m{i}"]["deny"] for i in range(len(maps))] == deny


@st.composite
def addresses(draw: st.DrawFn, family: int) -> Addr:
    kind = draw(st.sampled_from(["any", "host", "prefix", "prefix", "wildcard"]))
    if kind == "any":
        return Addr("any")
    if family == 6:
        addr = draw(st.sampled_from(V6_POOL))
        if kind == "wildcard":
            kind = "prefix"
        return Addr(kind, addr, draw(st.sampled_from([32, 64, 120, 125, 126, 127, 128])))
    addr = draw(st.sampled_from(V4_POOL))
    if kind == "prefix":
        return Addr(kind, addr, draw(st.sampled_from([0, 8, 24, 29, 30, 31, 32])))
    if kind == "wildcard":
        # Mostly the low byte, sometimes non-contiguous.
        return Addr(kind, addr, draw(st.sampled_from([0, 1, 3, 6, 0xFE, 0x80, 0xFF01, 0xFF])))
    return Addr(kind, addr)


def port_specs() -> st.SearchStrategy[Ports | None]:
    # Mostly the ports packets use, so that port rules often decide.
    single = st.builds(
        Ports, st.sampled_from(["eq", "eq", "eq", "neq"]), st.sampled_from([49, 49, 500, *PORTS])
    )
    lt = st.builds(Ports, st.just("lt"), st.sampled_from(PORTS[1:]))
    gt = st.builds(Ports, st.just("gt"), st.sampled_from(PORTS[:-1]))
    rng = st.tuples(st.sampled_from(PORTS), st.sampled_from(PORTS)).map(
        lambda ab: Ports("range", min(ab), max(ab))
    )
    return st.one_of(st.none(), single, single, lt, gt, rng)


@st.composite
def rules(draw: st.DrawFn) -> RuleSpec:
    family = draw(st.sampled_from([4, 6, None]))
    if family is None:
        proto = draw(st.sampled_from(["ip", "tcp", "udp", "50"]))
        src = dst = Addr("any")
    else:
        src = draw(addresses(family))
        dst = draw(addresses(family))
        generic = ["ip", "tcp", "udp", "tcp", "50"]
        proto = draw(st.sampled_from([*generic, "icmp" if family == 4 else "icmpv6"]))
        if family == 6 and proto == "ip" and src.kind == dst.kind == "any":
            proto = "ipv6"
        if proto in ("icmp", "icmpv6"):
            pass  # pins the family itself
        elif src.kind == dst.kind == "any":
            family = 6 if proto == "ipv6" else None
    sports = dports = None
    if proto in ("tcp", "udp"):
        # Source-port conditions are rarer in practice (and would make most
        # rules miss); destination ports are the common case.
        sports = draw(st.one_of(st.none(), st.none(), port_specs()))
        dports = draw(port_specs())
    return RuleSpec(draw(st.booleans()), proto, family, src, dst, sports, dports)


@st.composite
def packets(draw: st.DrawFn) -> PacketSpec:
    version = draw(st.sampled_from([4, 6]))
    pool = V4_POOL if version == 4 else V6_POOL
    proto = draw(st.sampled_from([6, 6, 17, 50, 1 if version == 4 else 58]))
    frag = draw(st.sampled_from(["none", "none", "none", "first", "later", "truncated"]))
    return PacketSpec(
        version,
        proto,
        draw(st.sampled_from(pool)),
        draw(st.sampled_from(pool)),
        draw(st.sampled_from([49, 40000, *PORTS])),
        draw(st.sampled_from([49, 49, 500, *PORTS])),
        frag,
        draw(st.booleans()),
    )


@st.composite
def packets_near(draw: st.DrawFn, rule: RuleSpec) -> PacketSpec:
    """A packet built from a rule's own addresses, protocol and ports, so that
    rules (and the ones before them) are exercised where they decide; random
    packets alone rarely hit a host and an exact port at once."""
    base = draw(packets())
    version = rule.family or base.version
    if version != base.version:
        base = draw(packets().filter(lambda p: p.version == version))

    def addr(a: Addr, default: str) -> str:
        return a.addr if a.kind != "any" else default

    proto = rule.proto_number()
    use_rule_ports = draw(st.sampled_from([True, True, True, False]))
    return PacketSpec(
        version,
        base.proto if proto is None else proto,
        addr(rule.src, base.src),
        addr(rule.dst, base.dst),
        rule.sports.a if rule.sports and use_rule_ports else base.sport,
        rule.dports.a if rule.dports and use_rule_ports else base.dport,
        draw(st.sampled_from(["none", "none", "none", "none", "first", "later", "truncated"])),
        base.ext,
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    maps=st.lists(st.lists(rules(), max_size=8), min_size=1, max_size=3),
    data=st.data(),
    # Outcomes remembered before the memo is folded and cleared (1: every
    # packet recomputes), and denying maps counted one by one below the bulk
    # limit (0: every deny count goes through the bulk fold).
    memo_max=st.sampled_from([1, 65536]),
    bulk_denies=st.sampled_from([0, 8]),
)
def test_classifier_agrees_with_the_ipaddress_oracle(
    maps: list[list[RuleSpec]], data: st.DataObject, memo_max: int, bulk_denies: int
) -> None:
    pkts = data.draw(st.lists(packets(), min_size=1, max_size=4))
    all_rules = [r for m in maps for r in m]
    if all_rules:
        near = st.sampled_from(all_rules).flatmap(packets_near)
        pkts += data.draw(st.lists(near, min_size=2, max_size=8))
    check_against_oracle(maps, pkts, memo_max, bulk_denies)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    common=st.lists(rules(), min_size=1, max_size=3),
    own=st.lists(st.lists(rules(), max_size=3), min_size=10, max_size=30),
    data=st.data(),
)
def test_many_maps_with_the_same_first_lines_agree_with_the_oracle(
    common: list[RuleSpec], own: list[list[RuleSpec]], data: st.DataObject
) -> None:
    """Every map starts with the same lines (the adversarial case of #19: a packet
    each map denies), so buckets hold one candidate per map and the deny path and
    the port interval index decide, remembered outcomes included."""
    maps = [common + rest for rest in own]
    pkts = data.draw(st.lists(packets(), min_size=1, max_size=4))
    near = st.sampled_from([r for m in maps for r in m]).flatmap(packets_near)
    pkts += data.draw(st.lists(near, min_size=4, max_size=10))
    check_against_oracle(maps, pkts)


@st.composite
def adversarial_maps(draw: st.DrawFn) -> list[list[RuleSpec]]:
    """10-40 maps in one of the shapes of tools/bench/npusim_adversarial.py (#19),
    small enough for the oracle: every map its own (source, destination) mask
    pair; its own IPv4 wildcards (non-contiguous too); nested prefixes of the same
    addresses; its own overlapping port ranges (source and destination, ``neq``);
    or the same first deny line everywhere."""
    kind = draw(st.sampled_from(["mask-pairs", "wildcards", "nested", "port-ranges", "same-deny"]))
    n = draw(st.integers(10, 40))
    v6_len = st.sampled_from([120, 123, 124, 125, 126, 127, 128])
    wildcard = st.integers(0, 255) | st.sampled_from([0x0100, 0xFF01, 0x8000FF, 0x00FF00FF])
    port = st.sampled_from(PORTS) | st.integers(0, 65535)
    common = draw(st.lists(rules(), min_size=1, max_size=2))
    maps: list[list[RuleSpec]] = []
    for _ in range(n):
        permit = draw(st.booleans())
        if kind == "mask-pairs":
            src = Addr("prefix", draw(st.sampled_from(V6_POOL)), draw(v6_len))
            dst = Addr("prefix", draw(st.sampled_from(V6_POOL)), draw(v6_len))
            lines = [RuleSpec(False, "tcp", 6, src, dst, None, Ports("eq", 23))]
            lines.append(RuleSpec(permit, "tcp", 6, src, dst, None, None))
        elif kind == "wildcards":
            src = Addr("wildcard", draw(st.sampled_from(V4_POOL)), draw(wildcard))
            dst = Addr("wildcard", draw(st.sampled_from(V4_POOL)), draw(wildcard))
            lines = [
                RuleSpec(permit, draw(st.sampled_from(["ip", "tcp"])), 4, src, dst, None, None)
            ]
        elif kind == "nested":
            dst = Addr("prefix", "2001:db8::5", draw(v6_len))
            lines = [
                RuleSpec(False, "tcp", 6, Addr("any"), dst, None, Ports("eq", 23)),
                RuleSpec(permit, "ipv6", 6, Addr("prefix", "2001:db8::1", draw(v6_len)), dst,
                         None, None),
            ]  # fmt: skip
        elif kind == "port-ranges":
            a, b = sorted((draw(port), draw(port)))
            c, d = sorted((draw(port), draw(port)))
            dports = draw(st.sampled_from([Ports("range", c, d), Ports("neq", c), None]))
            lines = [
                RuleSpec(False, "tcp", 6, Addr("host", "2001:db8::1"), Addr("any"),
                         Ports("range", a, b), dports),
                RuleSpec(permit, "tcp", 6, Addr("host", "2001:db8::1"),
                         Addr("host", draw(st.sampled_from(V6_POOL))), None, None),
            ]  # fmt: skip
        else:
            lines = [*common, *draw(st.lists(rules(), max_size=2))]
        maps.append(lines)
    return maps


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(maps=adversarial_maps(), data=st.data(), bulk=st.sampled_from([0, 8]))
def test_adversarial_rule_sets_agree_with_the_oracle(
    maps: list[list[RuleSpec]], data: st.DataObject, bulk: int
) -> None:
    """#19: the rule sets that defeat a tuple-space index (many mask pairs, many
    ranges, one deny everywhere) classify and count like the oracle."""
    pkts = data.draw(st.lists(packets(), min_size=1, max_size=4))
    near = st.sampled_from([r for m in maps for r in m]).flatmap(packets_near)
    pkts += data.draw(st.lists(near, min_size=6, max_size=14))
    check_against_oracle(maps, pkts, bulk=bulk)
