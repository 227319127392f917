"""Bytes from the TUN or from the peer never make npusim raise: every input
gets a verdict (RFC 4301 §5.1: what cannot be classified is discarded)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment

from npusim import (
    BYPASS,
    GLOBAL,
    Bypass,
    Classifier,
    CryptoMap,
    Drop,
    Protect,
    SaFlowTable,
    TrafficSelector,
    parse_acl,
)

CLF = Classifier(
    [
        CryptoMap(
            "a",
            parse_acl(
                "a",
                [
                    "deny udp any any eq 53",
                    "permit tcp any any eq 49",
                    "permit udp any range 1000 2000 host 192.0.2.1",
                    "permit ipv6 2001:db8::/32 any",
                    "permit 50 any any",
                ],
            ),
            ["192.0.2.1", "2001:db8::1"],
        ),
        CryptoMap("b", parse_acl("b", ["permit ip 192.0.2.0 0.0.0.255 any"]), []),
    ]
)
TABLE = SaFlowTable()
FLOW = TABLE.add(
    0x1000,
    None,
    [TrafficSelector.from_prefix("192.0.2.0/24", 6, (49, 49)), TrafficSelector.any(6)],
    [TrafficSelector.from_prefix("198.51.100.0/24")],
    "a",
)

SEEDS = [
    bytes(IP(src="192.0.2.5", dst="198.51.100.1") / TCP(dport=49)),
    bytes(IP(src="192.0.2.5", dst="192.0.2.1", options=b"\x01" * 4) / UDP(dport=1500)),
    bytes(IPv6(src="2001:db8::5", dst="2001:db8::1") / IPv6ExtHdrDestOpt() / TCP(dport=49)),
    bytes(IPv6(src="2001:db8::5", dst="2001:db8::1") / IPv6ExtHdrFragment(offset=3) / UDP()),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@settings(max_examples=1500, deadline=None)
@given(st.one_of(st.binary(max_size=96), mutated()))
def test_any_bytes_get_a_verdict_and_are_counted(data: bytes) -> None:
    before = sum(CLF.counters[GLOBAL].values()) + sum(
        CLF.counters[m]["protect"] + CLF.counters[m]["deny"] for m in ("a", "b")
    )
    for buf in (data, bytearray(data), memoryview(data)):
        v = CLF.classify(buf)
        assert isinstance(v, Bypass | Protect | Drop)
        assert v is BYPASS or not isinstance(v, Bypass)
    after = sum(CLF.counters[GLOBAL].values()) + sum(
        CLF.counters[m]["protect"] + CLF.counters[m]["deny"] for m in ("a", "b")
    )
    assert after > before
    assert isinstance(TABLE.check_inbound(FLOW, data), bool)
    assert isinstance(TABLE.check_inbound_transport(FLOW, data[:4], data[4:8], 6, data), bool)
    TABLE.lookup_esp(data)
