"""ipsecmgr.offload: TSO super-packets from the TUN cut into wire packets, decrypted
packets coalesced into GSO super-packets for the TUN.

Oracles: scapy builds every expected packet from scratch (it fills lengths and
checksums itself), and, in the root tests, the kernel: it produces the
super-packets we split, and a TCP socket behind a forwarding namespace that
checksums in software receives what we coalesced.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import IP, TCP, UDP, IPv6, raw

from ipsecmgr.netns import NetnsPool
from ipsecmgr.offload import (
    TUN_OFFLOAD_MAX_MTU,
    TUN_OFFLOADS,
    VNET_HDR_LEN,
    coalesce_for_tun,
    internet_checksum,
    split_tun_read,
    tun_offload_pays,
)

VNET = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_ECN = 1, 0, 1, 4, 0x80
NO_OFFLOAD = bytes(VNET_HDR_LEN)

SRC4, DST4 = "192.0.2.1", "198.51.100.1"
SRC6, DST6 = "2001:db8:a::1", "2001:db8:c::1"
TS = [("NOP", None), ("NOP", None), ("Timestamp", (123456, 654321))]
DATA = bytes((i * 7 + 3) & 0xFF for i in range(140000))


def ip_layer(v6: bool, **kw: Any) -> Any:
    if v6:
        return IPv6(
            src=SRC6, dst=DST6, tc=kw.get("tos", 0), fl=kw.get("fl", 0), hlim=kw.get("ttl", 64)
        )
    return IP(src=SRC4, dst=DST4, id=kw.get("id", 1000), flags=kw.get("ipflags", "DF"),
              ttl=kw.get("ttl", 64), tos=kw.get("tos", 0))  # fmt: skip


def seg(v6: bool, seq: int, payload: bytes, flags: str = "A", **kw: Any) -> bytes:
    """One TCP segment built by scapy (lengths and checksums filled by scapy)."""
    tcp = TCP(sport=kw.get("sport", 40000), dport=49, seq=seq, ack=kw.get("ack", 777),
              flags=flags, window=kw.get("window", 502), options=kw.get("options", TS))  # fmt: skip
    return raw(ip_layer(v6, **kw) / tcp / payload)


def pseudo_sum(pkt: bytes, v6: bool) -> int:
    """The folded, uncomplemented pseudo-header sum, as CHECKSUM_PARTIAL leaves it."""
    t = 40 if v6 else (pkt[0] & 15) * 4
    proto = pkt[6] if v6 else pkt[9]
    addrs = pkt[8:40] if v6 else pkt[12:20]
    return 0xFFFF - internet_checksum(addrs, proto + len(pkt) - t)


def partial(pkt: bytes, v6: bool, csum_at: int) -> bytes:
    """``pkt`` with its L4 checksum replaced by the pseudo-header sum (what TUN hands us)."""
    b = bytearray(pkt)
    b[csum_at : csum_at + 2] = pseudo_sum(pkt, v6).to_bytes(2, "big")
    return bytes(b)


def checksums_ok(pkt: bytes) -> bool:
    """scapy agrees with every checksum in ``pkt`` (rebuilt with them recomputed)."""
    p = IPv6(pkt) if pkt[0] >> 4 == 6 else IP(pkt)
    q = p.copy()
    if IP in q:
        del q[IP].chksum
    for layer in (TCP, UDP):
        if layer in q:
            del q[layer].chksum
    return raw(q) == pkt


# -- checksum helper -------------------------------------------------------------


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=2**40))
def test_internet_checksum_is_rfc1071(data: bytes, initial: int) -> None:
    # The textbook loop: 16-bit big-endian words, end-around carry, complement.
    padded = data + b"\0" * (len(data) & 1)
    total = initial
    for i in range(0, len(padded), 2):
        total += padded[i] << 8 | padded[i + 1]
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    assert internet_checksum(data, initial) == ~total & 0xFFFF


def test_ipv4_header_checksum_matches_scapy_and_the_datapath_helper() -> None:
    hdr = raw(IP(src=SRC4, dst=DST4, id=0xBEEF, ttl=3))[:20]
    zeroed = hdr[:10] + b"\0\0" + hdr[12:]
    want = int.from_bytes(hdr[10:12], "big")
    assert internet_checksum(zeroed) == want


# -- split: TSO super-packets ---------------------------------------------------------


def expected_segments(
    v6: bool, payload: bytes, mss: int, flags: str, seq0: int, options: Any, id0: int
) -> list[bytes]:
    """What tcp_gso_segment + inet_gso_segment produce, each built from scratch."""
    chunks = [payload[i : i + mss] for i in range(0, len(payload), mss)]
    out = []
    for i, chunk in enumerate(chunks):
        f = set(flags)
        if i != len(chunks) - 1:
            f -= {"F", "P"}
        if i != 0:
            f -= {"C"}
        out.append(seg(v6, (seq0 + i * mss) % 2**32, chunk, "".join(sorted(f)) or "",
                       options=options, id=(id0 + i) % 65536, ttl=17, tos=0x28))  # fmt: skip
    return out


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("options", [TS, []], ids=["timestamps", "no-options"])
@pytest.mark.parametrize(
    ("size", "mss", "flags"),
    [
        (65000, 1448, "PA"),  # 45 segments, the last shorter
        (10001, 1448, "FPA"),  # odd payload, FIN and PSH on the last only
        (3 * 1448, 1448, "CEA"),  # CWR on the first only, ECE kept
        (4001, 999, "CPA"),  # odd segment size
        (700, 1448, "CFPA"),  # one segment: flags unchanged
    ],
)
def test_split_equals_scapy_segments(
    v6: bool, options: Any, size: int, mss: int, flags: str
) -> None:
    seq0, id0 = 2**32 - 5000, 65530  # both wrap inside the run
    big = seg(v6, seq0, DATA[:size], flags, options=options, id=id0, ttl=17, tos=0x28)
    t = 40 if v6 else 20
    thl = (big[t + 12] >> 4) * 4
    gso = (GSO_TCPV6 if v6 else GSO_TCPV4) | (GSO_ECN if "C" in flags else 0)
    buf = VNET.pack(NEEDS_CSUM, gso, t + thl, mss, t, 16) + partial(big, v6, t + 16)
    got = split_tun_read(buf)
    want = expected_segments(v6, DATA[:size], mss, flags, seq0, options, id0)
    assert len(got) == len(want) == -(-size // mss)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"segment {i}"


def test_split_accepts_memoryview_and_ignores_hdr_len() -> None:
    big = seg(False, 1, DATA[:5000], "PA")
    # TUN puts skb_headlen() into hdr_len, which may cover payload: not a header length.
    buf = VNET.pack(NEEDS_CSUM, GSO_TCPV4, 1000, 1448, 20, 16) + partial(big, False, 36)
    assert split_tun_read(memoryview(buf)) == split_tun_read(buf)
    assert len(split_tun_read(buf)) == 4


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_split_none_completes_udp_and_tcp_checksums(v6: bool) -> None:
    t = 40 if v6 else 20
    udp = raw(ip_layer(v6) / UDP(sport=5000, dport=53) / b"hello, odd payload")
    tcp = seg(v6, 99, b"x" * 101, "PA")
    for pkt, off in ((udp, 6), (tcp, 16)):
        buf = VNET.pack(NEEDS_CSUM, GSO_NONE, 0, 0, t, off) + partial(pkt, v6, t + off)
        assert split_tun_read(buf) == [pkt]
        # Without NEEDS_CSUM the packet is passed as it is.
        assert split_tun_read(NO_OFFLOAD + pkt) == [pkt]
        assert split_tun_read(VNET.pack(2, GSO_NONE, 0, 0, 0, 0) + pkt) == [pkt]  # DATA_VALID


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_split_none_sends_a_zero_udp_checksum_as_ffff(v6: bool) -> None:
    t = 40 if v6 else 20
    # Make the sum come out as -0: put the checksum of the packet into its payload.
    probe = raw(ip_layer(v6) / UDP(sport=5000, dport=53, chksum=0) / b"ab\0\0")
    c = internet_checksum(probe[t:], pseudo_sum(probe, v6))
    pkt = raw(ip_layer(v6) / UDP(sport=5000, dport=53) / (b"ab" + c.to_bytes(2, "big")))
    assert pkt[t + 6 : t + 8] == b"\xff\xff"  # scapy's answer: 0 is sent as 0xFFFF
    buf = VNET.pack(NEEDS_CSUM, GSO_NONE, 0, 0, t, 6) + partial(pkt, v6, t + 6)
    assert split_tun_read(buf) == [pkt]


def _malformed() -> list[tuple[str, bytes]]:
    good4 = partial(seg(False, 1, DATA[:3000], "A"), False, 36)
    good6 = partial(seg(True, 1, DATA[:3000], "A"), True, 56)
    tso4 = VNET.pack(NEEDS_CSUM, GSO_TCPV4, 52, 1448, 20, 16)
    tso6 = VNET.pack(NEEDS_CSUM, GSO_TCPV6, 72, 1448, 40, 16)

    def patch(p: bytes, at: int, b: bytes) -> bytes:
        return p[:at] + b + p[at + len(b) :]

    return [
        ("empty", b""),
        ("header only", NO_OFFLOAD),
        ("short header", b"\0" * 9),
        ("csum beyond end", VNET.pack(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 60000) + good4),
        ("csum field half out", VNET.pack(NEEDS_CSUM, GSO_NONE, 0, 0, len(good4) - 1, 0) + good4),
        ("gso UDP", VNET.pack(NEEDS_CSUM, 3, 28, 1000, 20, 6) + good4),
        ("gso UDP_L4", VNET.pack(NEEDS_CSUM, 5, 28, 1000, 20, 6) + good4),
        ("ECN alone", VNET.pack(0, GSO_ECN, 0, 0, 0, 0) + good4),
        ("gso_size 0", VNET.pack(NEEDS_CSUM, GSO_TCPV4, 52, 0, 20, 16) + good4),
        ("TCPV4 on IPv6", VNET.pack(NEEDS_CSUM, GSO_TCPV4, 72, 1448, 40, 16) + good6),
        ("TCPV6 on IPv4", tso6[:1] + bytes([GSO_TCPV6]) + tso4[2:] + good4),
        ("csum_start not TCP", VNET.pack(NEEDS_CSUM, GSO_TCPV4, 52, 1448, 24, 16) + good4),
        ("csum_offset not 16", VNET.pack(NEEDS_CSUM, GSO_TCPV4, 52, 1448, 20, 6) + good4),
        ("IPv4 total length", tso4 + patch(good4, 2, b"\x0b\xb8")),
        ("IPv4 truncated read", tso4 + good4[:-1]),
        ("IPv4 not TCP", tso4 + patch(good4, 9, b"\x11")),
        ("IPv4 IHL 4", tso4 + patch(good4, 0, b"\x44")),
        ("IPv4 fragment", tso4 + patch(good4, 6, b"\x20")),
        ("IPv6 payload length", tso6 + patch(good6, 4, b"\x00\x10")),
        ("IPv6 extension header", tso6 + patch(good6, 6, b"\x00")),
        ("TCP data offset 4", tso4 + patch(good4, 32, b"\x40")),
        ("TCP data offset beyond", tso4 + patch(patch(good4[:60], 2, b"\x00\x3c"), 32, b"\xf0")),
        ("no payload", tso4 + patch(good4[:52], 2, b"\x00\x34")),
        ("IPv4 too short", tso4 + good4[:30]),
    ]  # fmt: skip


@pytest.mark.parametrize(("why", "buf"), _malformed(), ids=[w for w, _ in _malformed()])
def test_split_rejects_malformed(why: str, buf: bytes) -> None:
    with pytest.raises(ValueError):
        split_tun_read(buf)


_VNET_PREFIX = st.builds(
    VNET.pack,
    st.sampled_from([0, 1, 2, 3, 0xFF]),
    st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 0xFF]),
    st.integers(0, 0xFFFF),
    st.sampled_from([0, 1, 2, 7, 536, 1448, 0xFFFF]),
    st.sampled_from([0, 1, 20, 40, 0xFFFF]),
    st.sampled_from([0, 6, 16, 0xFFFF]),
)


@settings(max_examples=500)
@given(st.one_of(st.binary(max_size=200), st.tuples(_VNET_PREFIX, st.binary(max_size=300))))
def test_split_arbitrary_bytes_give_packets_or_valueerror(
    data: bytes | tuple[bytes, bytes],
) -> None:
    if isinstance(data, tuple):
        # A plausible header and an IP-ish start make the fuzzer reach the TCP parser.
        vnet, rest = data
        data = vnet + bytes([0x45 if rest[:1] < b"\x80" else 0x60]) + rest[1:] if rest else vnet
    try:
        out = split_tun_read(data)
    except ValueError:
        return
    assert isinstance(out, list) and all(isinstance(p, bytes) for p in out)


# -- coalesce ----------------------------------------------------------------


def run(v6: bool, n: int, size: int = 1000, last: int | None = None, seq0: int = 5000,
        last_flags: str = "A", **kw: Any) -> list[bytes]:  # fmt: skip
    """n in-order segments of one flow, ``size`` payload bytes each (the last ``last``)."""
    out, seq, off = [], seq0, 0
    for i in range(n):
        plen = last if (last is not None and i == n - 1) else size
        flags = last_flags if i == n - 1 else "A"
        out.append(seg(v6, seq % 2**32, DATA[off : off + plen], flags, id=1000 + i, **kw))
        seq, off = seq + plen, off + plen
    return out


def vnet_of(buf: bytes) -> tuple[int, ...]:
    return tuple(VNET.unpack_from(buf))


def complete(buf: bytes) -> bytes:
    """What the kernel does with a CHECKSUM_PARTIAL packet before it checks it."""
    flags, _g, _h, _s, start, off = VNET.unpack_from(buf)
    pkt = bytearray(buf[VNET_HDR_LEN:])
    assert flags & NEEDS_CSUM
    pkt[start + off : start + off + 2] = internet_checksum(pkt[start:]).to_bytes(2, "big")
    return bytes(pkt)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("last_flags", ["A", "PA"])
def test_coalesce_merges_a_run_into_one_gso_packet(v6: bool, last_flags: str) -> None:
    segs = run(v6, 6, 1000, last=501, last_flags=last_flags)
    out = coalesce_for_tun(segs)
    assert len(out) == 1
    t = 40 if v6 else 20
    hl = t + 32
    assert vnet_of(out[0]) == (NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, hl, 1000, t, 16)
    # Independent oracle: scapy builds the one big segment from scratch; ours, with
    # the checksum completed from the pseudo-header sum, must be that packet.
    want = seg(v6, 5000, DATA[: 5 * 1000 + 501], last_flags, id=1000)
    got = out[0][VNET_HDR_LEN:]
    assert got[t + 16 : t + 18] == pseudo_sum(want, v6).to_bytes(2, "big")
    assert complete(out[0]) == want
    # And back: split gives the very segments we were given.
    assert split_tun_read(out[0]) == segs


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_coalesce_round_trip_without_options_and_with_odd_sizes(v6: bool) -> None:
    segs = run(v6, 9, 1001, last=3, options=[], seq0=2**32 - 2000)  # seq wraps
    out = coalesce_for_tun(segs)
    assert len(out) == 1 and vnet_of(out[0])[3] == 1001
    assert split_tun_read(out[0]) == segs


def test_coalesce_stops_at_65535_bytes() -> None:
    segs = run(False, 50, 1448)  # 50 * 1448 + 52 > 65535
    out = coalesce_for_tun(segs)
    assert [len(b) - VNET_HDR_LEN for b in out] == [52 + 45 * 1448, 52 + 5 * 1448]
    assert [p for b in out for p in split_tun_read(b)] == segs


def alone(pkts: list[bytes]) -> list[bytes]:
    return [NO_OFFLOAD + p for p in pkts]


def test_coalesce_keeps_flows_apart_and_in_order() -> None:
    a = run(False, 3, 1000)
    b = run(False, 3, 1000, sport=40001)
    c = run(True, 2, 1000)
    udp = raw(IP(src=SRC4, dst=DST4) / UDP() / b"between")
    out = coalesce_for_tun([a[0], b[0], udp, a[1], c[0], b[1], a[2], c[1], b[2]])
    assert [split_tun_read(x) for x in out] == [a, b, [udp], c]
    assert out[2] == NO_OFFLOAD + udp


def test_coalesce_keeps_order_within_a_flow() -> None:
    # A pure ACK (window update) between data segments ends the run: the next
    # segment continues its sequence, but may not jump the ACK.
    s = run(False, 4, 1000)
    upd = seg(False, 7000, b"", "A", window=9000)
    out = coalesce_for_tun([s[0], s[1], upd, s[2], s[3]])
    assert [split_tun_read(x) for x in out] == [[s[0], s[1]], [upd], [s[2], s[3]]]


@pytest.mark.parametrize(
    "change",
    [
        {"ack": 778},
        {"window": 503},
        {"options": [("NOP", None), ("NOP", None), ("Timestamp", (123457, 654321))]},
        {"options": []},
        {"ttl": 63},
        {"tos": 0x02},
        {"sport": 40001},
    ],
    ids=["ack", "window", "options", "no-options", "ttl", "tos", "flow"],
)
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_coalesce_needs_same_headers(change: dict[str, Any], v6: bool) -> None:
    first = run(v6, 2, 1000)
    other = seg(v6, 7000, DATA[2000:3000], "A", **change)
    assert coalesce_for_tun([*first, other]) == [*coalesce_for_tun(first), NO_OFFLOAD + other]


def test_coalesce_ipv6_needs_same_flow_label() -> None:
    a = seg(True, 1, DATA[:1000], fl=5)
    b = seg(True, 1001, DATA[1000:2000], fl=6)
    assert coalesce_for_tun([a, b]) == alone([a, b])


@pytest.mark.parametrize("flags", ["SA", "FA", "RA", "UA", "CA", "EA", "A"])
def test_coalesce_merges_only_plain_ack_segments(flags: str) -> None:
    s = run(False, 3, 1000)
    odd = seg(False, 6000, DATA[1000:2000], flags)
    out = coalesce_for_tun([s[0], odd, s[2]])
    if flags == "A":
        assert len(out) == 1
    else:
        assert out == alone([s[0], odd, s[2]])


def test_coalesce_psh_ends_a_run_and_never_starts_one() -> None:
    s = run(False, 4, 1000)
    p1 = seg(False, 6000, DATA[1000:2000], "PA", id=1001)
    out = coalesce_for_tun([s[0], p1, s[2], s[3]])
    assert [split_tun_read(x) for x in out] == [[s[0], p1], [s[2], s[3]]]
    p0 = seg(False, 5000, DATA[:1000], "PA")
    assert coalesce_for_tun([p0, s[1]]) == alone([p0, s[1]])


def test_coalesce_does_not_merge_across_a_gap_or_a_size_change() -> None:
    s = run(False, 4, 1000)
    assert coalesce_for_tun([s[0], s[2]]) == alone([s[0], s[2]])  # gap
    assert coalesce_for_tun([s[1], s[0]]) == alone([s[1], s[0]])  # reordered
    big = seg(False, 6000, DATA[1000:2200], "A")  # larger than the first
    assert coalesce_for_tun([s[0], big]) == alone([s[0], big])
    # A shorter segment ends the run: the next one starts a new one.
    short = seg(False, 6000, DATA[1000:1500], "A", id=1001)
    nxt = seg(False, 6500, DATA[1500:2000], "A", id=1002)
    out = coalesce_for_tun([s[0], short, nxt])
    assert [split_tun_read(x) for x in out] == [[s[0], short], [nxt]]


def test_coalesce_does_not_merge_pure_acks_or_non_tcp() -> None:
    acks = [seg(False, 5000, b"", "A"), seg(False, 5000, b"", "A")]
    assert coalesce_for_tun(acks) == alone(acks)
    udp = [raw(IP(src=SRC4, dst=DST4) / UDP() / DATA[:1000]) for _ in range(2)]
    assert coalesce_for_tun(udp) == alone(udp)
    assert coalesce_for_tun([b"", b"\x45"]) == alone([b"", b"\x45"])


def test_coalesce_ipv4_needs_df_no_options_and_exact_length() -> None:
    nodf = run(False, 2, 1000, ipflags=0)
    assert coalesce_for_tun(nodf) == alone(nodf)
    opts = [raw(IP(src=SRC4, dst=DST4, flags="DF", options=b"\x01\x01\x01\x00") /
                TCP(sport=1, dport=2, seq=1 + i * 1000, flags="A") / DATA[:1000])
            for i in range(2)]  # fmt: skip
    assert coalesce_for_tun(opts) == alone(opts)
    s = run(False, 2, 1000)
    padded = [s[0], s[1] + b"\0\0"]  # trailing bytes beyond the IPv4 total length
    assert coalesce_for_tun(padded) == alone(padded)


@pytest.mark.parametrize("bad", [0, 1, 2])
def test_coalesce_never_merges_a_bad_checksum(bad: int) -> None:
    s = run(False, 3, 1000)
    broken = bytearray(s[bad])
    broken[200] ^= 0x01  # a payload bit: only the TCP checksum can tell
    s[bad] = bytes(broken)
    out = coalesce_for_tun(s)
    merged = [x for x in out if vnet_of(x)[1] != GSO_NONE]
    assert NO_OFFLOAD + s[bad] in out  # passed alone, unrepaired: the kernel drops it
    for x in merged:
        assert s[bad] not in split_tun_read(x)
    # The good ones still merge where they are contiguous: head bad -> 1+2, tail bad -> 0+1.
    assert len(merged) == (0 if bad == 1 else 1)
    assert [p for x in out for p in split_tun_read(x)] == s


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=120), max_size=8))
def test_coalesce_arbitrary_bytes_pass_alone(pkts: list[bytes]) -> None:
    assert coalesce_for_tun(pkts) == alone(pkts)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0, 1]),  # flow
            st.sampled_from([1000, 1000, 1000, 999, 10]),  # payload size
            st.sampled_from(["A", "A", "A", "PA"]),
            st.sampled_from(["ok", "ok", "ok", "bad", "lost"]),
        ),
        max_size=24,
    )
)
def test_coalesce_keeps_every_flow_intact(stream: list[tuple[int, int, str, str]]) -> None:
    """Whatever merges, split(coalesce(x)) gives each flow's packets back in order,
    a bad one untouched and never inside a GSO packet, nothing across a lost one."""
    pkts, seqs, ids, flows = [], [5000, 90000], [100, 200], []
    for flow, size, flags, what in stream:
        p = seg(False, seqs[flow], DATA[:size], flags, sport=40000 + flow, id=ids[flow])
        if what == "bad":
            p = p[:-1] + bytes([p[-1] ^ 0x40])
        seqs[flow] += size
        ids[flow] += 1
        if what != "lost":
            pkts.append(p)
            flows.append(flow)
    out = coalesce_for_tun(pkts)
    back = [p for x in out for p in split_tun_read(x)]
    for flow in (0, 1):
        mine = [p for p, f in zip(pkts, flows, strict=True) if f == flow]
        assert [p for p in back if p[21] == flow + 0x40] == mine  # sport low byte
    assert len(out) <= len(pkts)


# -- the kernel as the oracle (root) ---------------------------------------------

IFF_TUN, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
TUNSETIFF, TUNSETOFFLOAD = 0x400454CA, 0x400454D0
SIOCETHTOOL, ETHTOOL_STXCSUM = 0x8946, 0x17
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block in namespace ``name`` (this thread only); fds and sockets made
    inside stay in it."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


def open_vnet_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(
        fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
    )
    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_OFFLOADS)
    return fd


def tx_checksum_off(ifname: str) -> None:
    """ethtool -K IF tx off: the kernel then segments and checksums in software."""
    value = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_STXCSUM, 0))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(
            s.fileno(),
            SIOCETHTOOL,
            struct.pack("16sP16x", ifname.encode(), ctypes.addressof(value)),
        )


def tcp_csum_errors(ns: Any) -> int:
    lines = [ln.split() for ln in ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines()]
    tcp = [ln for ln in lines if ln[0] == "Tcp:"]
    return int(tcp[1][tcp[0].index("InCsumErrors")])


@pytest.mark.root
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_kernel_tso_split_and_gso_coalesce_carry_a_tcp_stream(netns: NetnsPool, v6: bool) -> None:
    """sender (A) -> tunA ==[split, check, coalesce]==> tunB -> router (B) -> veth -> receiver (C)

    A's TCP stack hands tunA TSO super-packets (TUN_F_TSO*); we split them and check
    every segment with scapy; we coalesce them and write GSO packets into tunB. B
    forwards them to C over a veth whose tx checksumming is off, so B's kernel
    segments them and completes the checksum from our pseudo-header sum in software,
    and C's TCP verifies it: a wrong gso/csum header means lost data. The ACKs take
    the way back (C -> B -> tunB: CHECKSUM_PARTIAL, completed by split; -> tunA: A verifies).
    """
    a, b, c = netns.add("snd"), netns.add("rtr"), netns.add("rcv")
    link = netns.link(b, c, ["198.51.100.254/24", "2001:db8:c::fe/64"],
                      ["198.51.100.1/24", "2001:db8:c::1/64"])  # fmt: skip
    c.add_route("default", via="198.51.100.254")
    c.ip("-6", "route", "add", "default", "via", "2001:db8:c::fe")
    b.run(["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
    fds: list[int] = []
    try:
        with in_netns(a.name):
            fd_a = open_vnet_tun("tunA")
            fds.append(fd_a)
            snd = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
        with in_netns(b.name):
            fd_b = open_vnet_tun("tunB")
            fds.append(fd_b)
            tx_checksum_off(link.a_if)
        with in_netns(c.name):
            lsock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
            lsock.bind((DST6 if v6 else DST4, 4900))
            lsock.listen(1)
        for ns, dev in ((a, "tunA"), (b, "tunB")):
            ns.ip("link", "set", dev, "up")
        a.add_address("tunA", SRC4 + "/32")
        a.add_address("tunA", SRC6 + "/128")
        a.ip("route", "add", "198.51.100.0/24", "dev", "tunA", "src", SRC4)
        a.ip("-6", "route", "add", "2001:db8:c::/64", "dev", "tunA", "src", SRC6)
        b.ip("route", "add", "192.0.2.0/24", "dev", "tunB")
        b.ip("-6", "route", "add", "2001:db8:a::/64", "dev", "tunB")
        _stream_through(fd_a, fd_b, snd, lsock, (DST6 if v6 else DST4, 4900))
        assert tcp_csum_errors(c) == 0 and tcp_csum_errors(a) == 0
    finally:
        for fd in fds:
            os.close(fd)


def _stream_through(fd_a: int, fd_b: int, snd: socket.socket, lsock: socket.socket,
                    dst: tuple[str, int]) -> None:  # fmt: skip
    total = 3 * 1024 * 1024
    data = (DATA * (total // len(DATA) + 1))[:total]
    got: dict[str, Any] = {}

    def receive() -> None:
        lsock.settimeout(20)
        conn, _ = lsock.accept()
        conn.settimeout(20)
        h, n = hashlib.sha256(), 0
        while n < total:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
        got["n"], got["sha"] = n, h.hexdigest()
        conn.close()

    def send() -> None:
        snd.settimeout(20)
        snd.connect(dst)
        snd.sendall(data)

    stats = {"tso_reads": 0, "segments": 0, "max_per_read": 0, "gso_writes": 0, "csum_completed": 0}
    threads = [threading.Thread(target=f, daemon=True) for f in (receive, send)]
    for th in threads:
        th.start()
    poller = select.poll()
    poller.register(fd_a, select.POLLIN)
    poller.register(fd_b, select.POLLIN)
    deadline = time.monotonic() + 30
    try:
        while threads[0].is_alive() and time.monotonic() < deadline:
            for fd, _ev in poller.poll(100):
                _pump(fd, fd_b if fd == fd_a else fd_a, stats)
    finally:
        snd.close()
        lsock.close()
        for th in threads:
            th.join(5)
    print(f"offload kernel oracle: {stats}")  # shown with -s: how much was offloaded
    assert got.get("n") == total
    assert got["sha"] == hashlib.sha256(data).hexdigest()
    # The offloads were used, both ways: super-packets read, super-packets written.
    assert stats["tso_reads"] > 0 and stats["gso_writes"] > 0, stats
    assert stats["csum_completed"] > 0, stats


def _pump(src: int, dst: int, stats: dict[str, int]) -> None:
    for _ in range(64):
        try:
            buf = os.read(src, VNET_HDR_LEN + 65535)
        except BlockingIOError:
            return
        flags, gso_type, _h, gso_size, _s, _o = VNET.unpack_from(buf)
        segs = split_tun_read(buf)
        tcp = [p for p in segs if (p[6] if p[0] >> 4 == 6 else p[9]) == 6]
        if not tcp:
            continue  # the TUNs' own IPv6 chatter (MLD, router solicitations)
        for p in tcp:
            assert checksums_ok(p)
        if gso_type != GSO_NONE:
            stats["tso_reads"] += 1
            stats["max_per_read"] = max(stats["max_per_read"], len(tcp))
            # One read: contiguous segments of gso_size bytes, the whole payload.
            pkts = [IPv6(p) if p[0] >> 4 == 6 else IP(p) for p in tcp]
            seqs = [q[TCP].seq for q in pkts]
            lens = [len(q[TCP].payload) for q in pkts]
            assert all(n == gso_size for n in lens[:-1]) and 0 < lens[-1] <= gso_size
            assert seqs == [(seqs[0] + sum(lens[:i])) % 2**32 for i in range(len(seqs))]
            big = bytes(buf[VNET_HDR_LEN:])
            assert b"".join(bytes(q[TCP].payload) for q in pkts) == bytes(
                (IPv6(big) if v6_of(big) else IP(big))[TCP].payload
            )
        elif flags & NEEDS_CSUM:
            stats["csum_completed"] += 1
        stats["segments"] += len(tcp)
        for w in coalesce_for_tun(tcp):
            if w[1] != GSO_NONE:
                stats["gso_writes"] += 1
            os.write(dst, w)


def v6_of(pkt: bytes) -> bool:
    return pkt[0] >> 4 == 6


def test_tun_super_packets_only_up_to_the_mtu_where_they_pay() -> None:
    # TUN MTU 1400 (46 segments per read) uses them; jumbo 9000 (7 segments, each one
    # checksummed in Python) does not: tools/bench/tunnel.py --mtu 9000 measured 1530
    # Mbit/s with them and 3153 without (docs/performance.md).
    assert tun_offload_pays(1400)
    assert tun_offload_pays(TUN_OFFLOAD_MAX_MTU)
    assert not tun_offload_pays(TUN_OFFLOAD_MAX_MTU + 1)
    assert not tun_offload_pays(9000)
