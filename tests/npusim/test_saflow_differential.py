"""Differential test of the inbound policy check against an ipaddress oracle.

Selectors are drawn as (network or address range, protocol, port range); the
oracle decides with ``ipaddress`` objects and the packet fields the test chose
before scapy built the bytes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.packet import Packet, Raw

from npusim import Classifier, CryptoMap, SaFlowTable, TrafficSelector, parse_acl
from npusim.packet import parse_selectors

NETS = {
    4: ["192.0.2.0/24", "192.0.2.0/30", "192.0.2.4/31", "198.51.100.7/32", "0.0.0.0/0"],
    6: ["2001:db8::/32", "2001:db8::/126", "2001:db8::4/127", "2001:db8:1::7/128"],
}
ADDRS = {
    4: ["192.0.2.0", "192.0.2.3", "192.0.2.4", "192.0.2.200", "198.51.100.7", "203.0.113.1"],
    6: ["2001:db8::", "2001:db8::3", "2001:db8::5", "2001:db8:1::7", "2001:db9::1"],
}
PORTS = [0, 1, 49, 500, 2048, 65535]


@dataclass(frozen=True)
class Sel:
    version: int
    net: str  # a network, or "A-B" for a range
    protocol: int
    ports: tuple[int, int]

    def build(self) -> TrafficSelector:
        if "-" in self.net:
            a, b = self.net.split("-")
            return TrafficSelector.from_range(a, b, self.protocol, self.ports)
        return TrafficSelector.from_prefix(self.net, self.protocol, self.ports)

    def admits(self, version: int, protocol: int, addr: str, port: int | None) -> bool:
        if version != self.version or self.protocol not in (0, protocol):
            return False
        a = ipaddress.ip_address(addr)
        if "-" in self.net:
            lo, hi = (ipaddress.ip_address(x) for x in self.net.split("-"))
            if not lo <= a <= hi:  # type: ignore[operator]
                return False
        elif a not in ipaddress.ip_network(self.net):
            return False
        if self.ports == (0, 65535):
            return True
        return port is not None and self.ports[0] <= port <= self.ports[1]


@st.composite
def selectors(draw: st.DrawFn) -> Sel:
    v = draw(st.sampled_from([4, 6]))
    if draw(st.booleans()):
        net = draw(st.sampled_from(NETS[v]))
    else:
        a, b = sorted(
            (draw(st.sampled_from(ADDRS[v])), draw(st.sampled_from(ADDRS[v]))),
            key=lambda x: int(ipaddress.ip_address(x)),
        )
        net = f"{a}-{b}"
    proto = draw(st.sampled_from([0, 0, 6, 17, 1 if v == 4 else 58]))
    lo, hi = sorted((draw(st.sampled_from(PORTS)), draw(st.sampled_from(PORTS))))
    ports = draw(st.sampled_from([(0, 65535), (lo, hi)]))
    return Sel(v, net, proto, ports)


@dataclass(frozen=True)
class Pkt:
    version: int
    proto: int
    src: str
    dst: str
    sport: int
    dport: int
    later_fragment: bool

    def build(self) -> bytes:
        if self.version == 4:
            ip: Packet = IP(src=self.src, dst=self.dst, proto=self.proto)
            if self.later_fragment:
                ip.frag = 4
        else:
            ip = IPv6(src=self.src, dst=self.dst)
            if self.later_fragment:
                ip = ip / IPv6ExtHdrFragment(nh=self.proto, offset=4)
            else:
                ip.nh = self.proto
        if self.later_fragment:
            return bytes(ip / Raw(b"\x00" * 16))
        if self.proto == 6:
            return bytes(ip / TCP(sport=self.sport, dport=self.dport))
        if self.proto == 17:
            return bytes(ip / UDP(sport=self.sport, dport=self.dport))
        if self.proto == 1:
            return bytes(ip / ICMP(type=self.sport >> 8, code=self.sport & 0xFF))
        return bytes(ip / Raw(bytes([self.sport >> 8, self.sport & 0xFF, 0, 0])))

    def ports(self) -> tuple[int | None, int | None]:
        if self.later_fragment:
            return None, None
        if self.proto in (6, 17):
            return self.sport, self.dport
        return self.sport, self.sport  # ICMP: type << 8 | code on both sides


@st.composite
def packets(draw: st.DrawFn) -> Pkt:
    v = draw(st.sampled_from([4, 6]))
    proto = draw(st.sampled_from([6, 17, 1 if v == 4 else 58]))
    sport = draw(st.sampled_from(PORTS))
    dport = draw(st.sampled_from(PORTS))
    if proto in (1, 58):
        sport = dport = draw(st.sampled_from([0x0800, 0x0000, 0x0301, 0x8000]))
    return Pkt(
        v,
        proto,
        draw(st.sampled_from(ADDRS[v])),
        draw(st.sampled_from(ADDRS[v])),
        sport,
        dport,
        draw(st.booleans()),
    )


@settings(max_examples=500, deadline=None)
@given(
    src_sels=st.lists(selectors(), min_size=1, max_size=3),
    dst_sels=st.lists(selectors(), min_size=1, max_size=3),
    pkts=st.lists(packets(), min_size=1, max_size=6),
)
def test_policy_check_agrees_with_the_ipaddress_oracle(
    src_sels: list[Sel], dst_sels: list[Sel], pkts: list[Pkt]
) -> None:
    table = SaFlowTable()
    flow = table.add(
        0x1234, None, [s.build() for s in src_sels], [s.build() for s in dst_sels], "m"
    )
    for pkt in pkts:
        sport, dport = pkt.ports()
        expected = any(s.admits(pkt.version, pkt.proto, pkt.src, sport) for s in src_sels) and any(
            d.admits(pkt.version, pkt.proto, pkt.dst, dport) for d in dst_sels
        )
        assert table.check_inbound(flow, pkt.build()) is expected, pkt
    assert table.counters["m"]["policy_ok"] + table.counters["m"]["policy_violation"] == len(pkts)


@st.composite
def acl_lines(draw: st.DrawFn) -> str:
    """A crypto ACL line over the same addresses (outbound: our side first)."""
    v = draw(st.sampled_from([4, 6]))
    proto = draw(st.sampled_from(["ip" if v == 4 else "ipv6", "tcp", "udp", "tcp"]))

    def addr() -> str:
        kind = draw(st.sampled_from(["any", "host", "net"]))
        if kind == "host":
            return f"host {draw(st.sampled_from(ADDRS[v]))}"
        if kind == "net":
            return draw(st.sampled_from([n for n in NETS[v] if not n.endswith("/0")]))
        return "any" if proto != "ip" or v == 6 else "0.0.0.0/0"

    def ports() -> str:
        if proto not in ("tcp", "udp"):
            return ""
        lo, hi = sorted((draw(st.sampled_from(PORTS)), draw(st.sampled_from(PORTS))))
        return draw(st.sampled_from(["", "", f" eq {lo}", f" range {lo} {hi}", f" neq {lo}"]))

    action = draw(st.sampled_from(["permit", "permit", "deny"]))
    return f"{action} {proto} {addr()}{ports()} {addr()}{ports()}"


@settings(max_examples=300, deadline=None)
@given(
    earlier=st.lists(acl_lines(), max_size=2),
    lines=st.lists(acl_lines(), min_size=1, max_size=4),
    src_sels=st.lists(selectors(), min_size=1, max_size=2),
    dst_sels=st.lists(selectors(), min_size=1, max_size=2),
    pkts=st.lists(packets(), min_size=4, max_size=12),
)
def test_skipping_the_acl_check_never_changes_a_verdict(
    earlier: list[str],
    lines: list[str],
    src_sels: list[Sel],
    dst_sels: list[Sel],
    pkts: list[Pkt],
) -> None:
    """#19: when covers_reply says the selectors lie inside what map "m" permits,
    the SA-flow table skips permits_reply; every packet must get the verdict the
    per-packet check would give (an earlier map, a deny line, a port or address
    outside the permit lines all make covers_reply say no)."""
    clf = Classifier(
        [
            CryptoMap("first", parse_acl("first", earlier)),
            CryptoMap("m", parse_acl("m", lines)),
        ]
    )
    table = SaFlowTable()
    flow = table.add(
        0x1234, None, [s.build() for s in src_sels], [s.build() for s in dst_sels], "m"
    )
    inside = 0
    for pkt in pkts:
        data = pkt.build()
        sel = parse_selectors(data)
        assert not isinstance(sel, str)
        got = table.inbound_drop(flow, data, clf)
        if table.inbound_drop(flow, data) is None:  # inside the selectors
            inside += 1
            assert (got is None) is clf.permits_reply("m", *sel), (lines, pkt, flow.acl_covered)
        else:
            assert got is not None and got != "acl"
    assert flow.acl is clf or inside == 0
    if flow.acl_covered:
        assert table.counters["m"].get("policy_acl", 0) == 0
