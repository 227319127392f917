"""IKEv2 message and payload codec (RFC 7296 §3), one parse/build pair per payload.

Plain data in, plain data out: nothing here knows keys. The SK payload
(§3.14) is returned as raw bytes with its offset, and the SA object decrypts it
and parses the inner chain with :func:`parse_chain`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .buffer import Buffer, DecodeError, _underrun
from .constants import (
    GENERIC_HEADER_LEN,
    IKE_HEADER_LEN,
    IKE_VERSION,
    HeaderFlag,
    PayloadType,
)
from .sa_payload import Proposal, SAPayload, Transform, _build_sa, _parse_sa
from .ts_payload import TS_CACHE_MAX, TrafficSelector, TSPayload, _build_ts, _parse_ts

# The SA payload (ike.sa_payload) and the traffic selectors (ike.ts_payload) have
# their own modules; their types are found here as well, with the other payloads.
__all__ = [
    "KNOWN_PAYLOADS",
    "TS_CACHE_MAX",
    "AuthPayload",
    "DeletePayload",
    "EncryptedBody",
    "Header",
    "IDPayload",
    "KEPayload",
    "NoncePayload",
    "NotifyPayload",
    "Payload",
    "Proposal",
    "SAPayload",
    "TSPayload",
    "TrafficSelector",
    "Transform",
    "UnknownPayload",
    "VendorPayload",
    "build_chain",
    "build_header",
    "build_plain_message",
    "find",
    "find_notify",
    "notifies",
    "parse_chain",
    "parse_header",
    "parse_message",
    "summarize",
]

_T = TypeVar("_T")


@dataclass
class KEPayload:
    group: int
    data: bytes = field(repr=False)
    type: int = PayloadType.KE


@dataclass
class NoncePayload:
    nonce: bytes
    type: int = PayloadType.NONCE


@dataclass
class IDPayload:
    """IDi (``type`` = 35) or IDr (36)."""

    id_type: int
    data: bytes
    type: int = PayloadType.IDi

    def rest(self) -> bytes:
        """RFC 7296 §2.15 "RestOfInitIDPayload": the body after the generic header."""
        return bytes([self.id_type, 0, 0, 0]) + self.data


@dataclass
class AuthPayload:
    method: int
    data: bytes = field(repr=False)
    type: int = PayloadType.AUTH


@dataclass
class NotifyPayload:
    notify_type: int
    data: bytes = b""
    protocol: int = 0
    spi: bytes = b""
    type: int = PayloadType.NOTIFY


@dataclass
class DeletePayload:
    protocol: int
    spis: list[bytes]
    type: int = PayloadType.DELETE


@dataclass
class VendorPayload:
    data: bytes
    type: int = PayloadType.VENDOR


@dataclass
class UnknownPayload:
    type: int
    critical: bool
    data: bytes


Payload = (
    SAPayload
    | KEPayload
    | NoncePayload
    | IDPayload
    | AuthPayload
    | NotifyPayload
    | DeletePayload
    | TSPayload
    | VendorPayload
    | UnknownPayload
)


# --- The chain and the small payloads -----------------------------------------
#
# Read and written with struct at known offsets, with the checks of Buffer, as the
# SA and TS codecs are (see ike.sa_payload).

_GENERIC = struct.Struct("!BBH")  # next payload, flags, length (and other 1+1+2 heads)
_U16 = struct.Struct("!H")
_U16X2 = struct.Struct("!HH")


def _head4(data: bytes, pos: int, end: int) -> int:
    """The 4 fixed octets that open an ID, AUTH, NOTIFY, DELETE or KE body."""
    if pos + 4 > end:
        raise _underrun(pos, 4 if pos < end else 1, end)
    return pos + 4


# Payload types as plain ints: the parser compares each payload against them
# (an IntEnum attribute costs several times an int global in CPython 3.11).
_SA, _KE, _IDI, _IDR, _AUTH, _NONCE, _NOTIFY, _DELETE, _VENDOR, _TSI, _TSR = (
    int(t)
    for t in (
        PayloadType.SA,
        PayloadType.KE,
        PayloadType.IDi,
        PayloadType.IDr,
        PayloadType.AUTH,
        PayloadType.NONCE,
        PayloadType.NOTIFY,
        PayloadType.DELETE,
        PayloadType.VENDOR,
        PayloadType.TSi,
        PayloadType.TSr,
    )
)


def _parse_body(
    ptype: int,
    critical: bool,
    data: bytes,
    pos: int,
    end: int,
    selectors: dict[bytes, TrafficSelector] | None,
) -> Payload:
    """One payload body, ``data[pos:end]`` (the generic header already read)."""
    if ptype == _SA:
        return _parse_sa(data, pos, end)
    if ptype == _NONCE:
        return NoncePayload(data[pos:end])
    if ptype == _NOTIFY:
        body = _head4(data, pos, end)
        protocol, spi_size, ntype = _GENERIC.unpack_from(data, pos)
        if body + spi_size > end:
            raise _underrun(body, spi_size, end)
        spi = data[body : body + spi_size]
        return NotifyPayload(ntype, data[body + spi_size : end], protocol, spi)
    if ptype == _KE:
        # (group, reserved): Buffer read them as two uint16, 2 octets at a time
        if pos + 2 > end:
            raise _underrun(pos, 2, end)
        body = _head4(data, pos, end)
        return KEPayload(_U16.unpack_from(data, pos)[0], data[body:end])
    if ptype in (_IDI, _IDR):
        body = _head4(data, pos, end)
        return IDPayload(data[pos], data[body:end], ptype)
    if ptype == _AUTH:
        body = _head4(data, pos, end)
        return AuthPayload(data[pos], data[body:end])
    if ptype in (_TSI, _TSR):
        return _parse_ts(data, pos, end, ptype, selectors)
    if ptype == _DELETE:
        body = _head4(data, pos, end)
        protocol, spi_size, count = _GENERIC.unpack_from(data, pos)
        spis = []
        for _ in range(count):
            if body + spi_size > end:
                raise _underrun(body, spi_size, end)
            spis.append(data[body : body + spi_size])
            body += spi_size
        if body != end:
            raise DecodeError("trailing bytes in DELETE payload")
        return DeletePayload(protocol, spis)
    if ptype == _VENDOR:
        return VendorPayload(data[pos:end])
    return UnknownPayload(ptype, critical, data[pos:end])


def _build_notify(p: NotifyPayload) -> bytes:
    return _GENERIC.pack(p.protocol, len(p.spi), p.notify_type) + p.spi + p.data


def _build_delete(p: DeletePayload) -> bytes:
    head = _GENERIC.pack(p.protocol, len(p.spis[0]) if p.spis else 0, len(p.spis))
    return head + b"".join(p.spis)


_BUILDERS: dict[type, Callable[[Any], bytes]] = {
    SAPayload: _build_sa,
    KEPayload: lambda p: _U16X2.pack(p.group, 0) + p.data,
    NoncePayload: lambda p: p.nonce,
    IDPayload: lambda p: p.rest(),
    AuthPayload: lambda p: bytes([p.method, 0, 0, 0]) + p.data,
    NotifyPayload: _build_notify,
    DeletePayload: _build_delete,
    TSPayload: _build_ts,
}


def _build_body(p: Payload) -> bytes:
    build = _BUILDERS.get(type(p))
    if build is not None:
        return build(p)
    assert isinstance(p, VendorPayload | UnknownPayload)
    return p.data


# Known types (the critical bit of an unknown one decides: §2.5, §3.2)
KNOWN_PAYLOADS = frozenset(
    {
        PayloadType.SA,
        PayloadType.KE,
        PayloadType.IDi,
        PayloadType.IDr,
        PayloadType.CERT,
        PayloadType.CERTREQ,
        PayloadType.AUTH,
        PayloadType.NONCE,
        PayloadType.NOTIFY,
        PayloadType.DELETE,
        PayloadType.VENDOR,
        PayloadType.TSi,
        PayloadType.TSr,
        PayloadType.SK,
        PayloadType.CP,
        PayloadType.EAP,
    }
)


@dataclass
class EncryptedBody:
    """The SK payload as found on the wire: still encrypted."""

    first_inner: int
    offset: int  # of the SK generic payload header inside the message


def parse_chain(
    buf: Buffer, first: int, selectors: dict[bytes, TrafficSelector] | None = None
) -> tuple[list[Payload], EncryptedBody | None]:
    """Parse a payload chain starting with type ``first`` until next-payload 0.

    ``selectors``: a table of traffic selectors already decoded (see ``_parse_ts``).

    An SK payload ends the chain (§3.14: it must be the last payload) and must
    reach exactly the end of ``buf``.
    """
    data, pos, end = buf.span()
    payloads: list[Payload] = []
    ptype = first
    while ptype != PayloadType.NONE:
        if pos + GENERIC_HEADER_LEN > end:
            raise _underrun(pos, GENERIC_HEADER_LEN, end)
        nxt, flags, plen = _GENERIC.unpack_from(data, pos)
        if plen < GENERIC_HEADER_LEN:
            raise DecodeError("payload length below header size")
        if ptype == PayloadType.SK:
            if pos + plen != end:
                raise DecodeError("SK payload is not the last payload")
            return payloads, EncryptedBody(nxt, pos)
        body_end = pos + plen
        if body_end > end:
            raise _underrun(pos + GENERIC_HEADER_LEN, plen - GENERIC_HEADER_LEN, end)
        payloads.append(
            _parse_body(
                ptype, bool(flags & 0x80), data, pos + GENERIC_HEADER_LEN, body_end, selectors
            )
        )
        pos = body_end
        ptype = nxt
    if pos != end:
        raise DecodeError("bytes after the last payload")
    return payloads, None


def build_chain(payloads: Sequence[Payload], last_next: int = PayloadType.NONE) -> bytes:
    """Encode payloads, chaining Next Payload; the last points at ``last_next``."""
    parts = []
    n = len(payloads)
    for i, p in enumerate(payloads):
        body = _build_body(p)
        nxt = payloads[i + 1].type if i + 1 < n else last_next
        crit = 0x80 if isinstance(p, UnknownPayload) and p.critical else 0
        parts.append(_GENERIC.pack(nxt, crit, GENERIC_HEADER_LEN + len(body)))
        parts.append(body)
    return b"".join(parts)


@dataclass
class Header:
    spi_i: bytes
    spi_r: bytes
    next_payload: int
    exchange: int
    flags: int
    msg_id: int
    length: int

    @property
    def is_response(self) -> bool:
        return bool(self.flags & HeaderFlag.RESPONSE)

    @property
    def from_initiator(self) -> bool:
        return bool(self.flags & HeaderFlag.INITIATOR)


_HEADER = struct.Struct("!8s8sBBBBII")
_HEADER_TAIL = struct.Struct("!BBBBII")  # after the two SPIs


def parse_header(data: bytes) -> Header:
    """§3.1. The length field must match the datagram exactly."""
    if len(data) < IKE_HEADER_LEN:
        raise _underrun(0, IKE_HEADER_LEN, len(data))
    spi_i, spi_r, nxt, version, exchange, flags, msg_id, length = _HEADER.unpack_from(data)
    if version >> 4 != IKE_VERSION >> 4:
        raise DecodeError(f"unsupported major version {version >> 4}")
    if length != len(data):
        raise DecodeError(f"length field {length} != datagram size {len(data)}")
    return Header(spi_i, spi_r, nxt, exchange, flags, msg_id, length)


def build_header(
    spi_i: bytes, spi_r: bytes, nxt: int, exchange: int, flags: int, msg_id: int, length: int
) -> bytes:
    return spi_i + spi_r + _HEADER_TAIL.pack(nxt, IKE_VERSION, exchange, flags, msg_id, length)


def build_plain_message(
    spi_i: bytes, spi_r: bytes, exchange: int, flags: int, msg_id: int, payloads: Sequence[Payload]
) -> bytes:
    """An unencrypted message (IKE_SA_INIT, or an unprotected error notify)."""
    body = build_chain(payloads)
    first = payloads[0].type if payloads else PayloadType.NONE
    hdr = build_header(spi_i, spi_r, first, exchange, flags, msg_id, IKE_HEADER_LEN + len(body))
    return hdr + body


def parse_message(data: bytes) -> tuple[Header, list[Payload], EncryptedBody | None]:
    hdr = parse_header(data)
    payloads, sk = parse_chain(Buffer(data, IKE_HEADER_LEN), hdr.next_payload)
    return hdr, payloads, sk


def find(
    payloads: Sequence[Payload], kind: type[_T], pred: Callable[[_T], bool] | None = None
) -> _T | None:
    for p in payloads:
        if isinstance(p, kind) and (pred is None or pred(p)):
            return p
    return None


def notifies(payloads: Sequence[Payload]) -> list[NotifyPayload]:
    return [p for p in payloads if isinstance(p, NotifyPayload)]


def find_notify(payloads: Sequence[Payload], ntype: int) -> NotifyPayload | None:
    for p in payloads:
        if isinstance(p, NotifyPayload) and p.notify_type == ntype:
            return p
    return None


_SHORT: dict[int, str] = {
    PayloadType.SA: "SA",
    PayloadType.KE: "KE",
    PayloadType.IDi: "IDi",
    PayloadType.IDr: "IDr",
    PayloadType.AUTH: "AUTH",
    PayloadType.NONCE: "No",
    PayloadType.DELETE: "D",
    PayloadType.VENDOR: "V",
    PayloadType.TSi: "TSi",
    PayloadType.TSr: "TSr",
}


def summarize(payloads: Sequence[Payload]) -> str:
    """One-line payload list as strongSwan logs it: ``SA KE No N(NAT_DETECTION_SOURCE_IP)``."""
    from .constants import notify_name

    out = []
    for p in payloads:
        if isinstance(p, NotifyPayload):
            out.append(f"N({notify_name(p.notify_type)})")
        else:
            out.append(_SHORT.get(p.type, f"UNKNOWN({p.type})"))
    return " ".join(out)
