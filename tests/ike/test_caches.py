"""The engine's caches and shortcuts give the same values as computing afresh.

The caches belong to an endpoint (``ike.caches.EngineCaches``), never to the
process: ``parse_chain`` keeps wire record -> TrafficSelector in the table it is
given (bounded); ``_intersect`` returns one of its operands when the
intersection equals it; identities are decoded once; prf(PSK, "Key Pad for
IKEv2") is kept per (PRF, PSK) and dropped when the endpoint's configs change.
The oracles: the ``ipaddress`` module on the same octets, the stdlib ``hmac``
for §2.15, and a handshake after the PSK changed.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import pickle
import struct
import subprocess
import sys

import pytest

from ike import payloads
from ike.buffer import Buffer
from ike.caches import EngineCaches
from ike.config import Identity
from ike.constants import IdType, PayloadType, PrfId
from ike.crypto import get_prf
from ike.endpoint import IkeEndpoint
from ike.payloads import TrafficSelector, TSPayload, build_chain, parse_chain
from ike.proposals import narrow

from .pair import Pair, configs


def _wire(*selectors: tuple[int, bytes, bytes, int, int, int]) -> bytes:
    """A TSi payload body by hand: (type, start, end, proto, start port, end port)."""
    body = bytes([len(selectors), 0, 0, 0])
    for ts_type, start, end, proto, sp, ep in selectors:
        body += struct.pack("!BBHHH", ts_type, proto, 8 + 2 * len(start), sp, ep) + start + end
    return struct.pack("!BBH", 0, 0, 4 + len(body)) + body


def _parse(wire: bytes, table: dict[bytes, TrafficSelector] | None = None) -> list[TrafficSelector]:
    got, _ = parse_chain(Buffer(wire), PayloadType.TSi, table)
    assert isinstance(got[0], TSPayload)
    return got[0].selectors


def test_ts_cache_keys_on_the_whole_record() -> None:
    """Same addresses, other protocol or ports: another selector, not the cached one."""
    a, b = bytes([192, 0, 2, 0]), bytes([192, 0, 2, 255])
    table = EngineCaches().selectors
    first = _parse(_wire((7, a, b, 0, 0, 65535)), table)
    again = _parse(_wire((7, a, b, 0, 0, 65535)), table)
    tcp49 = _parse(_wire((7, a, b, 6, 49, 49)), table)
    v6 = ipaddress.IPv6Address("2001:db8::1").packed
    six = _parse(_wire((8, v6, v6, 17, 500, 500)), table)
    want = TrafficSelector(ipaddress.IPv4Address("192.0.2.0"), ipaddress.IPv4Address("192.0.2.255"))
    assert first == again == [want] and again[0] is first[0]  # the table's object
    assert first == _parse(_wire((7, a, b, 0, 0, 65535)))  # no table: decoded afresh
    assert tcp49 == [
        TrafficSelector(want.start_addr, want.end_addr, ip_proto=6, start_port=49, end_port=49)
    ]
    addr6 = ipaddress.IPv6Address("2001:db8::1")
    assert six == [TrafficSelector(addr6, addr6, 17, 500, 500)]
    # Rebuilt from the cached objects: the same octets
    assert build_chain([TSPayload(tcp49)]) == _wire((7, a, b, 6, 49, 49))


def test_ts_cache_stays_bounded() -> None:
    n = payloads.TS_CACHE_MAX + 50
    table = EngineCaches().selectors
    for i in range(n):
        addr = (0xC6336400 + i).to_bytes(4, "big")  # 198.51.100.0 + i (and on)
        got = _parse(_wire((7, addr, addr, 0, i, i)), table)
        assert got == [
            TrafficSelector(ipaddress.IPv4Address(addr), ipaddress.IPv4Address(addr), 0, i, i)
        ]
        assert 1 <= len(table) <= payloads.TS_CACHE_MAX


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


def test_psk_key_is_the_rfc7296_key_pad_per_psk() -> None:
    """§2.15: AUTH = prf(prf(PSK, "Key Pad for IKEv2"), octets), for each PSK apart."""
    octets = b"signed octets " * 20
    caches = EngineCaches()
    for prf_id in (PrfId.HMAC_SHA2_256, PrfId.HMAC_SHA2_512):
        prf = get_prf(prf_id)
        for psk in (b"psk one 0123456789", b"psk two 0123456789"):
            pad = hmac.digest(psk, b"Key Pad for IKEv2", prf.hash_name)
            want = hmac.digest(pad, octets, prf.hash_name)
            assert caches.psk_key(prf, psk).mac(octets) == want
            assert caches.psk_key(prf, psk).mac(octets) == want  # from the cache
    assert caches.sizes()["psk_keys"] == 4


def test_changed_psk_is_used_after_a_handshake_with_the_old_one() -> None:
    ci, cr = configs(psk=b"first shared key 0123")
    p = Pair(ci, cr)
    p.i.initiate(0.0)
    p.roundtrip()
    assert p.i.established and p.r.established
    # A reload: the responder now has another PSK; the initiator keeps the old one
    cr2 = type(cr)(**{**vars(cr), "local_psk": b"second shared key 012"})
    p2 = Pair(ci, cr2, seed=2)
    p2.i.initiate(0.0)
    p2.roundtrip()
    assert not p2.i.established
    assert not any(sa.established for sa in p2.ep.sas)
    # Both sides on the new PSK: up again
    ci3 = type(ci)(**{**vars(ci), "local_psk": b"second shared key 012"})
    p3 = Pair(ci3, cr2, seed=3)
    p3.i.initiate(0.0)
    p3.roundtrip()
    assert p3.i.established and p3.r.established


def test_identity_decode_cached_values_and_errors() -> None:
    caches = EngineCaches()
    a = caches.identity(IdType.ID_IPV4_ADDR, bytes([198, 51, 100, 1]))
    assert a == Identity(IdType.ID_IPV4_ADDR, "198.51.100.1")
    assert caches.identity(IdType.ID_IPV4_ADDR, bytes([198, 51, 100, 1])) is a
    assert caches.identity(IdType.ID_IPV4_ADDR, bytes([198, 51, 100, 2])).value == "198.51.100.2"
    assert caches.identity(IdType.ID_FQDN, b"gw.example").value == "gw.example"
    assert a.encode() == caches.encoded(a) == bytes([198, 51, 100, 1])  # §3.5: the four octets
    assert caches.encoded(Identity(IdType.ID_FQDN, "gw.example")) == b"gw.example"
    for _ in range(2):  # an error is raised every time, not cached as a value
        with pytest.raises(ValueError):
            caches.identity(IdType.ID_IPV4_ADDR, b"\x01\x02\x03")
        with pytest.raises(ValueError):
            caches.identity(IdType.ID_FQDN, b"\xff\xfe")
    assert caches.sizes()["identities"] == 3


def test_selector_hash_survives_pickling_into_another_process() -> None:
    """The cached hash is the same in a process with another str-hash salt (the
    split data path's workers receive selectors pickled)."""
    ts = TrafficSelector.from_network("2001:db8:1::/48", 6, 49, 49)
    v4 = TrafficSelector.from_network("192.0.2.0/24")
    assert hash(ts) == hash(TrafficSelector.from_network("2001:db8:1::/48", 6, 49, 49))
    assert {ts: 1}[TrafficSelector.from_network("2001:db8:1::/48", 6, 49, 49)] == 1
    code = (
        "import pickle, sys\n"
        "from ike.payloads import TrafficSelector as T\n"
        "got = pickle.loads(sys.stdin.buffer.read())\n"
        "here = [T.from_network('2001:db8:1::/48', 6, 49, 49), T.from_network('192.0.2.0/24')]\n"
        "table = dict.fromkeys(here, 'found')\n"
        "print(*[table.get(t, 'missing') for t in got])\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=pickle.dumps([ts, v4]),
        capture_output=True,
        env=env,
        check=True,
    ).stdout
    assert out.split() == [b"found", b"found"]


def test_two_endpoints_never_share_caches() -> None:
    """A handshake fills its responder endpoint's tables only; a lone SA has its own."""
    ci, cr = configs()
    p = Pair(ci, cr)
    other = IkeEndpoint([cr])
    p.handshake()
    assert p.r.established and p.r.caches is p.ep.caches
    filled = p.ep.caches.sizes()
    assert filled["psk_keys"] == 1 and filled["identities"] == 1 and filled["selectors"] >= 2
    assert other.caches is not p.ep.caches
    assert set(other.caches.sizes().values()) == {0}
    assert p.i.caches is not p.ep.caches and p.i.caches.sizes()["psk_keys"] == 1


def test_reload_drops_the_psk_derived_keys_and_the_handshake_still_works() -> None:
    """SIGHUP: new configs on the endpoint; a replaced PSK's derived key must not stay."""
    ci, cr = configs(psk=b"first shared key 0123")
    p = Pair(ci, cr)
    p.handshake()
    assert p.ep.caches.sizes()["psk_keys"] == 1
    cr2 = type(cr)(**{**vars(cr), "local_psk": b"second shared key 012"})
    p.ep.configs = [cr2]
    assert p.ep.caches.sizes()["psk_keys"] == 0
    ci2 = type(ci)(**{**vars(ci), "local_psk": b"second shared key 012"})
    q = Pair(ci2, cr2, seed=5)
    q.ep = p.ep
    p.ep.sas[:] = []
    q.handshake()
    assert q.i.established and q.r.established
    assert p.ep.caches.sizes()["psk_keys"] == 1  # the new PSK's only


def test_forget_psks_drops_only_those_keys() -> None:
    """A reload that removes a config drops its PSK's derived keys (every PRF); a
    kept PSK's key stays the same object (not derived again), and a forgotten one
    is derived again on demand, equal to the stdlib's prf(PSK, "Key Pad for IKEv2")."""
    c = EngineCaches()
    sha256, sha384 = get_prf(PrfId.HMAC_SHA2_256), get_prf(PrfId.HMAC_SHA2_384)
    kept = c.psk_key(sha256, b"kept key")
    c.psk_key(sha256, b"removed key")
    c.psk_key(sha384, b"removed key")
    assert c.sizes()["psk_keys"] == 3
    c.forget_psks({b"removed key"})
    assert c.sizes()["psk_keys"] == 1
    assert c.psk_key(sha256, b"kept key") is kept
    again = c.psk_key(sha256, b"removed key")
    pad = hmac.new(b"removed key", b"Key Pad for IKEv2", "sha256").digest()
    assert again.mac(b"octets") == hmac.new(pad, b"octets", "sha256").digest()
