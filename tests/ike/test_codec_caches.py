"""The codec's caches and shortcuts give the same values as building afresh.

``_parse_ts`` keeps wire record -> TrafficSelector (bounded); ``_intersect``
returns one of its operands when the intersection equals it. The oracle for
the parsed values is the ``ipaddress`` module on the same octets.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest

from ike import payloads
from ike.buffer import Buffer
from ike.constants import PayloadType
from ike.payloads import TrafficSelector, TSPayload, build_chain, parse_chain
from ike.proposals import narrow


def _wire(*selectors: tuple[int, bytes, bytes, int, int, int]) -> bytes:
    """A TSi payload body by hand: (type, start, end, proto, start port, end port)."""
    body = bytes([len(selectors), 0, 0, 0])
    for ts_type, start, end, proto, sp, ep in selectors:
        body += struct.pack("!BBHHH", ts_type, proto, 8 + 2 * len(start), sp, ep) + start + end
    return struct.pack("!BBH", 0, 0, 4 + len(body)) + body


def _parse(wire: bytes) -> list[TrafficSelector]:
    got, _ = parse_chain(Buffer(wire), PayloadType.TSi)
    assert isinstance(got[0], TSPayload)
    return got[0].selectors


def test_ts_cache_keys_on_the_whole_record() -> None:
    """Same addresses, other protocol or ports: another selector, not the cached one."""
    a, b = bytes([192, 0, 2, 0]), bytes([192, 0, 2, 255])
    first = _parse(_wire((7, a, b, 0, 0, 65535)))
    again = _parse(_wire((7, a, b, 0, 0, 65535)))
    tcp49 = _parse(_wire((7, a, b, 6, 49, 49)))
    v6 = ipaddress.IPv6Address("2001:db8::1").packed
    six = _parse(_wire((8, v6, v6, 17, 500, 500)))
    want = TrafficSelector(ipaddress.IPv4Address("192.0.2.0"), ipaddress.IPv4Address("192.0.2.255"))
    assert first == again == [want]
    assert tcp49 == [
        TrafficSelector(want.start_addr, want.end_addr, ip_proto=6, start_port=49, end_port=49)
    ]
    addr6 = ipaddress.IPv6Address("2001:db8::1")
    assert six == [TrafficSelector(addr6, addr6, 17, 500, 500)]
    # Rebuilt from the cached objects: the same octets
    assert build_chain([TSPayload(tcp49)]) == _wire((7, a, b, 6, 49, 49))


def test_ts_cache_stays_bounded() -> None:
    n = payloads._TS_CACHE_MAX + 50
    for i in range(n):
        addr = (0xC6336400 + i).to_bytes(4, "big")  # 198.51.100.0 + i (and on)
        got = _parse(_wire((7, addr, addr, 0, i, i)))
        assert got == [
            TrafficSelector(ipaddress.IPv4Address(addr), ipaddress.IPv4Address(addr), 0, i, i)
        ]
        assert len(payloads._TS_CACHE) <= payloads._TS_CACHE_MAX


@pytest.mark.parametrize(
    ("offered", "allowed", "want"),
    [
        ("192.0.2.0/24", "192.0.2.0/24", "192.0.2.0/24"),  # equal
        ("192.0.2.0/24", "192.0.2.0/25", "192.0.2.0/25"),  # allowed inside offered
        ("192.0.2.0/26", "192.0.2.0/24", "192.0.2.0/26"),  # offered inside allowed
        ("0.0.0.0/0", "2001:db8::/32", None),  # other family
        ("2001:db8::/64", "2001:db8::/32", "2001:db8::/64"),
    ],
)
def test_narrow_same_values_as_fresh_objects(offered: str, allowed: str, want: str | None) -> None:
    o, a = TrafficSelector.from_network(offered), TrafficSelector.from_network(allowed)
    got = narrow([o], [a])
    assert got == ([TrafficSelector.from_network(want)] if want else [])


def test_narrow_partial_overlap_builds_a_new_selector() -> None:
    o = TrafficSelector(ipaddress.IPv4Address("192.0.2.10"), ipaddress.IPv4Address("192.0.2.50"))
    a = TrafficSelector(
        ipaddress.IPv4Address("192.0.2.30"), ipaddress.IPv4Address("192.0.2.90"), 6, 49, 49
    )
    (got,) = narrow([o], [a])
    assert got == TrafficSelector(
        ipaddress.IPv4Address("192.0.2.30"), ipaddress.IPv4Address("192.0.2.50"), 6, 49, 49
    )
    assert got is not o and got is not a
