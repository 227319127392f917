"""Benchmark: TUN offload packet logic (ipsecmgr.offload), µs per call and per segment.

Run: flock /work/bench.lock /work/main/.venv/bin/python tools/bench/offload.py   (about 20 s)

Measures, in one run and with the same timer:

* split_tun_read of a 64 KiB TCP TSO super-packet (IPv4 and IPv6, timestamps,
  MSS 1448: 46 segments), next to the reference: plain ``bytes`` slicing of the
  same payload into the same 46 pieces (no headers, no checksums), the floor
  any Python splitter pays for the copies; for information also the naive
  checksum floor (each piece summed with ``int.from_bytes(...) % 0xFFFF``);
* coalesce_for_tun of those 46 segments (one GSO packet out), next to the same
  slicing reference;
* for information: coalesce of 46 packets that cannot merge (each PSH, as an
  interactive flow sends them), the cost offloading adds to small traffic, and
  split_tun_read of one 1500-byte packet with and without NEEDS_CSUM.
"""

from __future__ import annotations

import struct
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ipsecmgr.offload import coalesce_for_tun, internet_checksum, split_tun_read

VNET = struct.Struct("=BBHHHH")
MSS = 1448
SRC4, DST4 = bytes([192, 0, 2, 1]), bytes([198, 51, 100, 1])
SRC6 = bytes.fromhex("20010db8000a00000000000000000001")
DST6 = bytes.fromhex("20010db8000c00000000000000000001")
TS_OPTIONS = b"\x01\x01\x08\x0a" + struct.pack("!II", 123456, 654321)


def tcp_packet(v6: bool, payload: bytes, flags: int = 0x18, seq: int = 1) -> bytes:
    """IPv4/IPv6 + TCP with timestamps; checksums filled (the TCP one matters to coalesce)."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 49, seq, 777, 8 << 4, flags, 502, 0, 0) + TS_OPTIONS
    seg = tcp + payload
    if v6:
        pseudo = int.from_bytes(SRC6 + DST6, "big") + 6 + len(seg)
        ip = struct.pack("!IHBB", 6 << 28, len(seg), 6, 64) + SRC6 + DST6
    else:
        pseudo = int.from_bytes(SRC4 + DST4, "big") + 6 + len(seg)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(seg), 1, 0x4000, 64, 6, 0, SRC4, DST4)
        ip = ip[:10] + internet_checksum(ip).to_bytes(2, "big") + ip[12:]
    csum = internet_checksum(seg, pseudo)
    return ip + seg[:16] + csum.to_bytes(2, "big") + seg[18:]


def tso_read(v6: bool) -> bytes:
    """What os.read() returns for a full 64 KiB TSO super-packet: 46 segments of MSS 1448."""
    t = 40 if v6 else 20
    payload = bytes(i * 7 & 0xFF for i in range(65535 - t - 32))
    pkt = tcp_packet(v6, payload)
    gso_type = 4 if v6 else 1
    return VNET.pack(1, gso_type, t + 32, MSS, t, 16) + pkt


def per_call_us(fn: Callable[[], object], number: int, repeat: int = 15) -> float:
    # The minimum of short runs: on a shared 2-core machine the rest measure the neighbours.
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def row(label: str, t: float, nseg: int = 0, ref: float = 0.0, note: str = "") -> None:
    per_seg = f"{t / nseg:8.3f}" if nseg else " " * 8
    ratio = f"{t / ref:5.1f}x" if ref else " " * 6
    print(f"  {label:54s} {t:9.2f} {per_seg} {ratio} {note}".rstrip())


def main() -> None:
    print("ipsecmgr.offload: 64 KiB TCP TSO super-packet, MSS 1448, TCP timestamps")
    print(f"Python {sys.version.split()[0]}, best of 15 runs, µs\n")
    print(f"  {'':54s} {'per call':>9s} {'per seg':>8s} {'ratio':>6s}")
    for v6 in (False, True):
        name = "IPv6" if v6 else "IPv4"
        buf = tso_read(v6)
        segs = split_tun_read(buf)
        nseg = len(segs)
        assert nseg == 46, nseg
        merged = coalesce_for_tun(segs)
        assert len(merged) == 1 and split_tun_read(merged[0]) == segs
        hl = (40 if v6 else 20) + 32 + 10
        n = len(buf)

        def slicing(buf: bytes = buf, hl: int = hl, n: int = n) -> list[bytes]:
            return [buf[i : i + MSS] for i in range(hl, n, MSS)]

        def summing(buf: bytes = buf, hl: int = hl, n: int = n) -> list[int]:
            return [int.from_bytes(buf[i : i + MSS], "big") % 0xFFFF for i in range(hl, n, MSS)]

        assert len(slicing()) == len(summing()) == nseg
        t_ref = per_call_us(slicing, 2000)
        t_sum = per_call_us(summing, 300)
        t_split = per_call_us(lambda buf=buf: split_tun_read(buf), 300)
        t_coal = per_call_us(lambda segs=segs: coalesce_for_tun(segs), 300)
        row(f"{name} reference: bytes slicing into {nseg} pieces", t_ref, nseg)
        row(f"{name} (info) naive sums: slice, from_bytes, % 0xFFFF", t_sum, nseg, t_ref)
        row(f"{name} split_tun_read (TSO -> {nseg} segments)", t_split, nseg, t_ref)
        row(f"{name} coalesce_for_tun ({nseg} segments -> 1 GSO)", t_coal, nseg, t_ref)

    # For information: traffic that does not merge, and single packets.
    small = [tcp_packet(False, b"x" * 100, seq=1 + 100 * i) for i in range(46)]
    assert len(coalesce_for_tun(small)) == 46
    t_small = per_call_us(lambda: coalesce_for_tun(small), 3000)
    t_small_ref = per_call_us(lambda: [b"\0" * 10 + p for p in small], 3000)
    one = tcp_packet(False, bytes(1448))
    plain = bytes(10) + one
    partial = VNET.pack(1, 0, 0, 0, 20, 16) + one
    t_plain = per_call_us(lambda: split_tun_read(plain), 30000)
    t_partial = per_call_us(lambda: split_tun_read(partial), 30000)
    t_slice1 = per_call_us(lambda: plain[10:], 30000)
    print()
    row("coalesce, 46 PSH packets that cannot merge", t_small, 46, t_small_ref,
        "(ref: header + packet concat)")  # fmt: skip
    row(
        "split_tun_read, one 1500-byte packet, no offload", t_plain, 0, t_slice1, "(ref: one slice)"
    )
    row("split_tun_read, one 1500-byte packet, NEEDS_CSUM", t_partial, 0, t_slice1)


if __name__ == "__main__":
    main()
