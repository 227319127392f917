"""TUN offloads: the packet logic for a TUN opened with IFF_VNET_HDR (pure, no I/O).

With ``IFF_VNET_HDR`` every read from and write to the TUN carries a
``struct virtio_net_hdr`` (include/uapi/linux/virtio_net.h) in front of the IP
packet. With ``TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)`` the kernel
hands us TCP "super-packets" of up to 64 KiB with the checksum left to us, and
accepts the same from us, as wireguard-go does (tun/offload_linux.go)::

    read:  virtio_net_hdr + super-packet --split_tun_read-->   IP packets for the wire
    write: decrypted IP packets          --coalesce_for_tun--> virtio_net_hdr + super-packet

The rules are the kernel's own: segmentation as net/ipv4/tcp_offload.c
``tcp_gso_segment`` and net/ipv4/af_inet.c ``inet_gso_segment`` do it,
coalescing only where ``tcp_gro_receive`` / ``inet_gro_receive`` /
``ipv6_gro_receive`` would merge, so the receiving stack sees what it would
have seen from a NIC with GRO.

Checksums (RFC 1071): 2**16 ≡ 1 (mod 0xFFFF), so the ones' complement sum of
the 16-bit big-endian words of ``data`` is ``int.from_bytes(data, "big") %
0xFFFF`` (with 0xFFFF for the residue 0 of non-zero data): one C call per
packet instead of a loop over words. Partial sums add up modulo 0xFFFF, which
lets a 32-bit sequence number or a length be added to a sum as a plain integer.

The virtio header is in host byte order: TUN without TUNSETVNETLE/BE uses the
legacy virtio layout, which is the CPU's (drivers/net/tun.c tun_is_little_endian).
"""

from __future__ import annotations

import struct
from typing import Any

# include/uapi/linux/if_tun.h
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6

# include/uapi/linux/virtio_net.h
VNET_HDR_LEN = 10

# TUN super-packets pay while one 64 KiB read replaces many: every segment costs a
# TCP checksum in Python (~1.3 ns/byte, on the way in and again, verified, on the way
# out), one read or write saved is worth ~10 us. Measured with tools/bench/tunnel.py:
# TUN MTU 1400, 900 vs 455 Mbit/s with and without; MTU 9000, 1530 vs 3153 Mbit/s
# (7 segments per read save little and each one checksums 9 kB). Above this MTU the
# TUN stays plain; UDP GSO/GRO on port 4500 are used at any MTU.
TUN_OFFLOAD_MAX_MTU = 4096


def tun_offload_pays(mtu: int) -> bool:
    """Whether a TUN of this MTU is opened with IFF_VNET_HDR + TSO (``offload = true``)."""
    return mtu <= TUN_OFFLOAD_MAX_MTU


VIRTIO_NET_HDR_F_NEEDS_CSUM = 0x01
VIRTIO_NET_HDR_GSO_NONE = 0x00
VIRTIO_NET_HDR_GSO_TCPV4 = 0x01
VIRTIO_NET_HDR_GSO_TCPV6 = 0x04
VIRTIO_NET_HDR_GSO_ECN = 0x80

# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
_VNET = struct.Struct("=BBHHHH")
_NO_OFFLOAD = bytes(VNET_HDR_LEN)

_TCP_FIN, _TCP_PSH, _TCP_ACK, _TCP_CWR = 0x01, 0x08, 0x10, 0x80
_TCP_CSUM_OFFSET = 16
_MAX_IP_LEN = 0xFFFF

# IPv4 bytes 2..11: total length, ID, flags+fragment offset, TTL, protocol, checksum.
_IP4_MUTABLE = struct.Struct("!HHHBBH")
# TCP bytes 4..17: seq, ack, data offset, flags, window, checksum.
_TCP_MUTABLE = struct.Struct("!IIBBHH")
_TCP_HDR = struct.Struct("!HHIIBBHHH")
_U16 = struct.Struct("!H")


def _fold_steps(bits: int) -> tuple[tuple[int, int], ...]:
    steps = []
    while bits > 1024:
        k = 16 * ((bits + 31) // 32)  # about half, a multiple of 16 bits
        steps.append((k, (1 << k) - 1))
        bits = k + 1
    return tuple(steps)


# v = hi * 2**k + lo ≡ hi + lo (mod 2**k - 1), and 0xFFFF divides 2**k - 1 when 16 | k.
# Halving a big int this way (a shift, an AND, an add) and taking ``%`` of what is
# left is about twice as fast as ``%`` alone on a 1500-byte packet, whose digits
# CPython divides one by one. The steps are precomputed per 512-bit bucket up to
# 16384 bits (2 KiB); bigger ints (rare here) are first halved with masks made on the fly.
_STEPS = tuple(_fold_steps(b << 9) for b in range(33))


def _residue(v: int) -> int:
    """``v % 0xFFFF`` for a non-negative ``v``, faster for big ones."""
    n = v.bit_length()
    while n > 16384:
        k = 16 * ((n + 31) // 32)
        v = (v >> k) + (v & ((1 << k) - 1))
        n = v.bit_length()
    for k, mask in _STEPS[(n + 511) >> 9]:
        v = (v >> k) + (v & mask)
    return v % 0xFFFF


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The RFC 1071 checksum of ``data`` (odd length: padded with a zero byte), with
    ``initial`` added to the sum first (e.g. a pseudo-header sum; any int >= 0, it is
    reduced modulo 0xFFFF). Returns the complemented 16-bit value to store."""
    total = int.from_bytes(data, "big")
    if len(data) & 1:
        total <<= 8
    total += initial
    if not total:
        return 0xFFFF  # all-zero input: the sum is +0, its complement 0xFFFF
    # The sum of non-zero data is -0 (0xFFFF), never +0, when its residue is 0:
    # ~0xFFFF = 0 and ~r = 0xFFFF - r otherwise, which is exactly -r mod 0xFFFF.
    return -_residue(total) % 0xFFFF


# -- read side: one super-packet from the TUN -> packets for the wire ----------


def split_tun_read(buf: bytes | bytearray | memoryview) -> list[bytes]:
    """What os.read() returned on an IFF_VNET_HDR TUN (virtio_net_hdr + one packet) ->
    complete IP packets ready for the wire, checksums filled in.

    - gso_type NONE: the packet; with VIRTIO_NET_HDR_F_NEEDS_CSUM the checksum at
      csum_start + csum_offset is completed (the field holds the pseudo-header sum,
      include/linux/skbuff.h "CHECKSUM_PARTIAL"); a UDP result of 0 is sent as 0xFFFF
      (RFC 768: 0 means "no checksum"; the kernel's skb_checksum_help does the same).
    - gso_type TCPV4 / TCPV6 (ECN bit allowed): cut into segments of gso_size payload
      bytes, as tcp_gso_segment + inet_gso_segment / ipv6_gso_segment do.
    - anything malformed raises ValueError (the caller counts and drops).
    """
    n = len(buf)
    if n < VNET_HDR_LEN + 1:
        raise ValueError("shorter than virtio_net_hdr + 1 byte")
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = _VNET.unpack_from(buf)
    if gso_type == VIRTIO_NET_HDR_GSO_NONE:
        if not flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            return [bytes(buf[VNET_HDR_LEN:])]
        return [_complete_csum(buf, csum_start, csum_offset)]
    base_type = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if base_type not in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6):
        raise ValueError(f"unsupported gso_type {gso_type:#x}")
    if not gso_size:
        raise ValueError("gso_size 0")
    # hdr_len is not checked: TUN reports skb_headlen() there, which may cover payload
    # too (wireguard-go ignores it for the same reason); the headers are parsed instead.
    return _segment_tcp(
        memoryview(buf)[VNET_HDR_LEN:],
        base_type == VIRTIO_NET_HDR_GSO_TCPV4,
        gso_size,
        csum_start if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM else -1,
        csum_offset,
    )


def _complete_csum(buf: bytes | bytearray | memoryview, start: int, offset: int) -> bytes:
    """CHECKSUM_PARTIAL -> complete: sum from csum_start to the end (the field already
    holds the pseudo-header sum), fold, complement (net/core/dev.c skb_checksum_help)."""
    o = VNET_HDR_LEN
    at = o + start + offset
    if at + 2 > len(buf):
        raise ValueError("csum_start + csum_offset beyond the packet")
    csum = internet_checksum(buf[o + start :])
    if csum == 0 and offset == 6:
        # Offset 6 is the UDP (and UDP-Lite) checksum field (TCP's is 16, ICMP's 2):
        # a computed 0 is sent as 0xFFFF, RFC 768.
        csum = 0xFFFF
    return b"".join((buf[o:at], _U16.pack(csum), buf[at + 2 :]))


def _segment_tcp(
    pkt: memoryview, v4: bool, mss: int, csum_start: int, csum_offset: int
) -> list[bytes]:
    n = len(pkt)
    if v4:
        if n < 40 or pkt[0] >> 4 != 4:
            raise ValueError("TCPV4 GSO: not an IPv4 packet")
        t = (pkt[0] & 0x0F) * 4
        if t < 20 or pkt[9] != 6:
            raise ValueError("TCPV4 GSO: bad IHL or not TCP")
        if (pkt[2] << 8 | pkt[3]) != n:
            raise ValueError("TCPV4 GSO: total length does not match the read")
        if pkt[6] & 0x3F or pkt[7]:
            raise ValueError("TCPV4 GSO: a fragment")
        addr_sum = int.from_bytes(pkt[12:20], "big")
    else:
        # Extension headers are not walked: a TCP socket's TSO packets have none.
        if n < 60 or pkt[0] >> 4 != 6 or pkt[6] != 6:
            raise ValueError("TCPV6 GSO: not an IPv6 packet with a TCP header next")
        if (pkt[4] << 8 | pkt[5]) != n - 40:
            raise ValueError("TCPV6 GSO: payload length does not match the read")
        t = 40
        addr_sum = int.from_bytes(pkt[8:40], "big")
    if csum_start >= 0 and (csum_start != t or csum_offset != _TCP_CSUM_OFFSET):
        raise ValueError("GSO: csum_start/csum_offset do not point at the TCP checksum")
    if n < t + 20:
        raise ValueError("GSO: truncated TCP header")
    thl = (pkt[t + 12] >> 4) * 4
    hl = t + thl
    if thl < 20 or hl > n:
        raise ValueError("GSO: bad TCP data offset")
    payload_total = n - hl
    if payload_total <= 0:
        raise ValueError("GSO: no payload")

    _sp, _dp, seq0, ack, doff, tcp_flags, window, _c, _u = _TCP_HDR.unpack_from(pkt, t)
    # The header template: the fields that change per segment are zero in it, so
    # that their values can be added to the precomputed sums (see the module doc).
    hdr = bytearray(pkt[:hl])
    _TCP_MUTABLE.pack_into(hdr, t + 4, 0, ack, doff, 0, window, 0)
    # Pseudo-header (RFC 793 / RFC 8200 §8.1) + TCP header without seq/flags/csum;
    # the TCP length is added per segment.
    tcp_base = addr_sum + 6 + int.from_bytes(hdr[t:], "big")
    ip_id0 = frag = ttl = ip_base = 0
    if v4:
        ip_id0 = pkt[4] << 8 | pkt[5]
        frag, ttl = pkt[6] << 8 | pkt[7], pkt[8]
        _IP4_MUTABLE.pack_into(hdr, 2, 0, 0, frag, ttl, 6, 0)
        ip_base = int.from_bytes(hdr[:t], "big")
    # tcp_gso_segment: FIN and PSH only on the last segment, CWR only on the first.
    f_first = tcp_flags & ~(_TCP_FIN | _TCP_PSH)
    f_mid = f_first & ~_TCP_CWR
    f_last = tcp_flags & ~_TCP_CWR

    out: list[bytes] = []
    append = out.append
    pack_tcp = _TCP_MUTABLE.pack_into
    pack_ip = _IP4_MUTABLE.pack_into
    from_bytes = int.from_bytes
    residue = _residue
    nseg = (payload_total + mss - 1) // mss
    last = nseg - 1
    pos = hl
    for i in range(nseg):
        end = pos + mss
        if end > n:
            end = n
        chunk = pkt[pos:end]
        plen = end - pos
        psum = from_bytes(chunk, "big")
        if plen & 1:
            psum <<= 8
        seq = (seq0 + i * mss) & 0xFFFFFFFF
        if 0 < i < last:
            fl = f_mid
        elif i == 0:
            fl = f_first if last else tcp_flags
        else:
            fl = f_last
        csum = -(tcp_base + thl + plen + seq + fl + residue(psum)) % 0xFFFF
        pack_tcp(hdr, t + 4, seq, ack, doff, fl, window, csum)
        if v4:
            # inet_gso_segment: tot_len per segment, ID incremented per segment, new checksum.
            tot = hl + plen
            ip_id = (ip_id0 + i) & 0xFFFF
            pack_ip(hdr, 2, tot, ip_id, frag, ttl, 6, -(ip_base + tot + ip_id) % 0xFFFF)
        else:
            _U16.pack_into(hdr, 4, thl + plen)
        append(b"".join((hdr, chunk)))
        pos = end
    return out


# -- write side: decrypted packets -> super-packets for the TUN ----------------


def coalesce_for_tun(packets: list[bytes]) -> list[bytes]:
    """Decrypted inner IP packets in arrival order -> buffers for os.write() on the
    IFF_VNET_HDR TUN, each virtio_net_hdr + packet.

    Runs of in-order TCP segments of one flow that the kernel's GRO would merge
    (tcp_gro_receive, inet_gro_receive, ipv6_gro_receive) become one GSO super-packet;
    every other packet passes alone behind an all-zero header. A run is written at
    the place of its first segment; a packet of the same flow that cannot join ends
    the run, so the order within a flow is kept. A segment whose TCP checksum is
    wrong never joins (it passes alone, so the kernel still drops it).

    A run is: same 5-tuple; IPv4 with IHL 5, DF set, not a fragment, same TOS and
    TTL (IPv4 IDs are not compared: with DF they carry no meaning, RFC 6864, and GRO
    ignores them too); IPv6 with TCP as next header, same version/class/flow label
    and hop limit; same ack, window, data offset and options; flags exactly ACK, with
    PSH allowed on the last segment; seq = previous seq + previous payload length;
    every payload the size of the first except a shorter last one; at most 65535
    bytes in all. IP length fields must match the packet (no trailing bytes).
    """
    out: list[Any] = []  # bytes (alone) or list[bytes] (a run of >= 2 segments)
    # flow key -> [index in out, invariants, next seq, mss, total length, head checked]
    runs: dict[bytes, list[Any]] = {}
    from_bytes = int.from_bytes
    unpack_tcp = _TCP_HDR.unpack_from
    for pkt in packets:
        n = len(pkt)
        if n < 40:
            out.append(pkt)
            continue
        vb = pkt[0]
        if vb == 0x45:
            if pkt[9] != 6:
                out.append(pkt)
                continue
            key = pkt[12:24]  # addresses and ports: contiguous without IP options
            t = 20
            ok = (pkt[2] << 8 | pkt[3]) == n and pkt[6] == 0x40 and not pkt[7]
            inv_ip: int = pkt[1] << 8 | pkt[8]  # TOS, TTL
            csum_from = 12
        elif vb >> 4 == 6:
            if pkt[6] != 6 or n < 60:
                out.append(pkt)
                continue
            key = pkt[8:44]
            t = 40
            ok = (pkt[4] << 8 | pkt[5]) == n - 40
            inv_ip = from_bytes(pkt[0:4], "big") << 8 | pkt[7]  # class, flow label, hops
            csum_from = 8
        else:
            if vb >> 4 == 4 and n >= 24 and pkt[9] == 6 and not (pkt[6] & 0x1F or pkt[7]):
                # TCP with IP options: never merged, but it ends its flow's run.
                t = (vb & 0x0F) * 4
                if 20 < t <= n - 4:
                    runs.pop(pkt[12:20] + pkt[t : t + 4], None)
            out.append(pkt)
            continue
        _sp, _dp, seq, ack, doff, flags, window, _c, _u = unpack_tcp(pkt, t)
        hl = t + (doff >> 4) * 4
        plen = n - hl
        if not ok or flags & ~_TCP_PSH != _TCP_ACK or hl < t + 20 or plen <= 0:
            runs.pop(key, None)
            out.append(pkt)
            continue
        inv = (inv_ip, ack, doff, window, pkt[t + 20 : hl])
        run = runs.get(key)
        if (
            run is not None
            and run[2] == seq
            and plen <= run[3]
            and run[4] + plen <= _MAX_IP_LEN
            and run[1] == inv
        ):
            if not run[5]:
                # Checked only now that a second segment wants to join (a lone
                # packet is passed on as it is, so its checksum is the kernel's business).
                head = out[run[0]]
                run[5] = True
                if not _tcp_csum_ok(head, csum_from, t):
                    run = None
            if run is not None and not _tcp_csum_ok(pkt, csum_from, t):
                runs.pop(key, None)
                out.append(pkt)
                continue
        elif run is not None:
            run = None
        if run is None:
            if flags & _TCP_PSH:
                runs.pop(key, None)  # a PSH segment only ever ends a run
            else:
                runs[key] = [len(out), inv, (seq + plen) & 0xFFFFFFFF, plen, n, False]
            out.append(pkt)
            continue
        slot = out[run[0]]
        if type(slot) is list:
            slot.append(pkt)
        else:
            out[run[0]] = [slot, pkt]
        run[2] = (seq + plen) & 0xFFFFFFFF
        run[4] += plen
        if plen < run[3] or flags & _TCP_PSH:
            del runs[key]  # tcp_gro_receive: a short or PSH segment flushes the run
    return [_super_packet(x) if type(x) is list else _NO_OFFLOAD + x for x in out]


def _tcp_csum_ok(pkt: bytes, csum_from: int, t: int) -> bool:
    """The TCP checksum verifies: addresses (from ``csum_from``) + protocol + TCP length +
    the segment itself sum to -0 (RFC 1071 §1, "the result should be all 1 bits")."""
    total = int.from_bytes(pkt[csum_from:], "big")
    n = len(pkt)
    if n & 1:
        total <<= 8
    return (_residue(total) + 6 + n - t) % 0xFFFF == 0


def _super_packet(segs: list[bytes]) -> bytes:
    """virtio_net_hdr + one GSO packet for a run: the first segment's headers with the
    new length, the TCP checksum field holding the pseudo-header sum (CHECKSUM_PARTIAL,
    as tcp_v4_send_check / tcp_v6_send_check leave it), payloads concatenated."""
    head = segs[0]
    v4 = head[0] == 0x45
    t = 20 if v4 else 40
    hl = t + (head[t + 12] >> 4) * 4
    mss = len(head) - hl
    total = hl
    for s in segs:
        total += len(s) - hl
    hdr = bytearray(head[:hl])
    if v4:
        _U16.pack_into(hdr, 2, total)
        _U16.pack_into(hdr, 10, 0)
        _U16.pack_into(hdr, 10, internet_checksum(hdr[:20]))
        pseudo = int.from_bytes(head[12:20], "big") + 6 + total - t
        gso_type = VIRTIO_NET_HDR_GSO_TCPV4
    else:
        _U16.pack_into(hdr, 4, total - 40)
        pseudo = int.from_bytes(head[8:40], "big") + 6 + total - t
        gso_type = VIRTIO_NET_HDR_GSO_TCPV6
    hdr[t + 13] |= segs[-1][t + 13] & _TCP_PSH
    _U16.pack_into(hdr, t + 16, pseudo % 0xFFFF or 0xFFFF)  # folded, not complemented
    vnet = _VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hl, mss, t, _TCP_CSUM_OFFSET)
    parts: list[bytes | bytearray | memoryview] = [vnet, hdr]
    parts += [memoryview(s)[hl:] for s in segs]
    return b"".join(parts)
