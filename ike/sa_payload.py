"""The SA payload (RFC 7296 §3.3): proposals and their transforms, parsed and built.

:mod:`ike.payloads` parses and builds the chain and calls ``_parse_sa`` /
``_build_sa`` for an SA payload (and re-exports these names);
:mod:`ike.proposals` chooses among the proposals.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .buffer import DecodeError, _underrun
from .constants import ATTR_KEY_LENGTH, PayloadType


@dataclass
class Transform:
    type: int
    id: int
    key_length: int | None = None


@dataclass
class Proposal:
    number: int
    protocol: int
    spi: bytes
    transforms: list[Transform]


@dataclass
class SAPayload:
    proposals: list[Proposal]
    type: int = PayloadType.SA


# --- SA payload (§3.3) -------------------------------------------------------
#
# The SA, TS and chain codecs read and write with struct at known offsets (the
# hot path of every handshake). They check every length before they use it, in
# the order Buffer's pull_* would (so the same malformed input raises the same
# error), and raise BufferReadError on an underrun as Buffer does.

_GENERIC = struct.Struct("!BBH")  # next payload / last substructure, flags, length
_PROPOSAL = struct.Struct("!BBBB")  # number, protocol, SPI size, transform count
_TRANSFORM = struct.Struct("!BBH")  # type, reserved, id
_U16 = struct.Struct("!H")
_KEY_LENGTH_ATTR = 0x8000 | ATTR_KEY_LENGTH  # TV format (AF bit set), §3.3.5
# A whole transform in one pack (§3.3.2): generic header + _TRANSFORM [+ key length]
_TRANSFORM_8 = struct.Struct("!BBHBBH")
_TRANSFORM_12 = struct.Struct("!BBHBBHHH")


def _parse_sa(data: bytes, pos: int, end: int) -> SAPayload:
    proposals: list[Proposal] = []
    last = 2
    while last == 2:
        if pos >= end:
            raise _underrun(pos, 1, end)
        last = data[pos]
        if last not in (0, 2):
            raise DecodeError("bad proposal last-substructure")
        if pos + 4 > end:
            raise _underrun(pos + 1, 3, end)
        plen = _U16.unpack_from(data, pos + 2)[0]
        if plen < 8:
            raise DecodeError("proposal too short")
        p, pend = pos + 4, pos + plen
        if pend > end:
            raise _underrun(p, plen - 4, end)
        pos = pend
        if p + 4 > pend:
            raise _underrun(p, 4, pend)
        number, protocol, spi_size, ntrans = _PROPOSAL.unpack_from(data, p)
        p += 4
        if p + spi_size > pend:
            raise _underrun(p, spi_size, pend)
        spi = data[p : p + spi_size]
        p += spi_size
        transforms: list[Transform] = []
        tlast = 3
        while tlast == 3:
            if p >= pend:
                raise _underrun(p, 1, pend)
            tlast = data[p]
            if tlast not in (0, 3):
                raise DecodeError("bad transform last-substructure")
            if p + 4 > pend:
                raise _underrun(p + 1, 3, pend)
            tlen = _U16.unpack_from(data, p + 2)[0]
            if tlen < 8:
                raise DecodeError("transform too short")
            t, tend = p + 4, p + tlen
            if tend > pend:
                raise _underrun(t, tlen - 4, pend)
            p = tend
            ttype, _, tid = _TRANSFORM.unpack_from(data, t)  # tlen >= 8: 4 bytes are there
            t += 4
            key_length: int | None = None
            while t < tend:
                if t + 2 > tend:
                    raise _underrun(t, 2, tend)
                atype = _U16.unpack_from(data, t)[0]
                if t + 4 > tend:
                    raise _underrun(t + 2, 2, tend)
                value = _U16.unpack_from(data, t + 2)[0]
                t += 4
                if atype & 0x8000:
                    if atype & 0x7FFF == ATTR_KEY_LENGTH:
                        key_length = value
                else:  # TLV attributes: none we know; value is their length
                    if t + value > tend:
                        raise _underrun(t, value, tend)
                    t += value
            transforms.append(Transform(ttype, tid, key_length))
        if len(transforms) != ntrans or p != pend:
            raise DecodeError("transform count/length mismatch")
        proposals.append(Proposal(number, protocol, spi, transforms))
    if pos != end:
        raise DecodeError("trailing bytes in SA payload")
    return SAPayload(proposals)


def _build_sa(p: SAPayload) -> bytes:
    out = []
    nprops = len(p.proposals)
    for i, prop in enumerate(p.proposals):
        parts = [_PROPOSAL.pack(prop.number, prop.protocol, len(prop.spi), len(prop.transforms))]
        parts.append(prop.spi)
        ntrans = len(prop.transforms)
        for j, t in enumerate(prop.transforms):
            last = 0 if j == ntrans - 1 else 3
            if t.key_length is None:
                parts.append(_TRANSFORM_8.pack(last, 0, 8, t.type, 0, t.id))
            else:
                parts.append(
                    _TRANSFORM_12.pack(last, 0, 12, t.type, 0, t.id, _KEY_LENGTH_ATTR, t.key_length)
                )
        body = b"".join(parts)
        out.append(_GENERIC.pack(0 if i == nprops - 1 else 2, 0, 4 + len(body)))
        out.append(body)
    return b"".join(out)
