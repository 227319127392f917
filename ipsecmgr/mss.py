"""TCP MSS clamping for traffic entering the tunnel (RFC 4459 §3.2).

The MSS a host announces fits its own link, not the tunnel: lowering it in
SYNs read from the TUN keeps the inner packets within the TUN MTU, so that
inner packet plus ESP overhead fit the path. Used by the data path in both
the single-process and the split mode.
"""

from __future__ import annotations


def _fold(total: int) -> int:
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def clamp_mss(packet: bytes, mss4: int, mss6: int) -> bytes:
    """A TCP SYN (or SYN-ACK) whose MSS option exceeds the limit, with the option lowered
    to ``mss4`` (IPv4) / ``mss6`` (IPv6) and the TCP checksum updated; anything else is
    returned as is (the same object).

    The MSS a host announces fits its own link, not the tunnel: clamping it keeps
    the inner packets within the TUN MTU, so inner packet plus ESP overhead fit the
    path (RFC 4459 §3.2). The checksum is updated incrementally, RFC 1624 eqn. 3:
    HC' = ~(~HC + ~m + m'), with m and m' byte-swapped when the option's value
    sits at an odd offset of the segment (RFC 1071 §2(B): byte order independence).
    IPv6 extension headers are not walked (such a SYN is passed unchanged).
    """
    n = len(packet)
    if n < 40:
        return packet
    version = packet[0] >> 4
    if version == 4:
        # Protocol TCP, and the first fragment (offset 0) only.
        if packet[9] != 6 or (packet[6] & 0x1F) or packet[7]:
            return packet
        t, limit = (packet[0] & 0x0F) * 4, mss4
    elif version == 6:
        if packet[6] != 6:
            return packet
        t, limit = 40, mss6
    else:
        return packet
    if n < t + 20 or not packet[t + 13] & 0x02:  # SYN flag
        return packet
    end = min(t + (packet[t + 12] >> 4) * 4, n)
    i = t + 20
    while i < end:
        kind = packet[i]
        if kind == 0:  # end of option list
            return packet
        if kind == 1:  # NOP
            i += 1
            continue
        if i + 1 >= end or packet[i + 1] < 2 or i + packet[i + 1] > end:
            return packet  # malformed options: not ours to repair
        if kind == 2 and packet[i + 1] == 4:
            old = packet[i + 2] << 8 | packet[i + 3]
            if old <= limit:
                return packet
            m, m_new = old, limit
            if (i + 2 - t) & 1:
                m, m_new = (m >> 8) | (m & 0xFF) << 8, (m_new >> 8) | (m_new & 0xFF) << 8
            hc = packet[t + 16] << 8 | packet[t + 17]
            hc_new = ~_fold((~hc & 0xFFFF) + (~m & 0xFFFF) + m_new) & 0xFFFF
            out = bytearray(packet)
            out[i + 2 : i + 4] = limit.to_bytes(2, "big")
            out[t + 16 : t + 18] = hc_new.to_bytes(2, "big")
            return bytes(out)
        i += packet[i + 1]
    return packet


def mss_limits(tun_mtu: int, setting: bool | int) -> tuple[int, int] | None:
    """(IPv4, IPv6) MSS limits for a TUN: its MTU minus the IP and TCP headers, or a
    configured number if lower; None when clamping is off."""
    if setting is False:
        return None
    mss4, mss6 = tun_mtu - 40, tun_mtu - 60
    if setting is not True:
        mss4, mss6 = min(mss4, setting), min(mss6, setting)
    return mss4, mss6
