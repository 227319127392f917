"""IKEv2 message and payload codec (RFC 7296 §3), one parse/build pair per payload.

Plain data in, plain data out: nothing here knows keys. The SK payload
(§3.14) is returned as raw bytes with its offset, and the SA object decrypts it
and parses the inner chain with :func:`parse_chain`.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .buffer import Buffer, BufferReadError, DecodeError
from .constants import (
    ATTR_KEY_LENGTH,
    GENERIC_HEADER_LEN,
    IKE_HEADER_LEN,
    IKE_VERSION,
    HeaderFlag,
    PayloadType,
    TsType,
)

_T = TypeVar("_T")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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


@dataclass(frozen=True, slots=True)  # one or more per IKE SA
class TrafficSelector:
    start_addr: IPAddress
    end_addr: IPAddress
    ip_proto: int = 0
    start_port: int = 0
    end_port: int = 65535
    # IP version, start and end as ints, for narrowing (ipaddress converts on every
    # int() call; these are the address objects' own ints, in slots rather than a
    # tuple: 48 bytes less per selector, one or two per peer), and the hash, computed
    # once: the manager looks selectors up in caches for every Child SA, and
    # ipaddress hashes each address through hex() every time. Ints only, so the hash
    # is the same in every process (str hashes are salted per process; selectors
    # travel pickled to the data path workers).
    version: int = field(init=False, repr=False, compare=False)
    start: int = field(init=False, repr=False, compare=False)
    end: int = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        version = self.start_addr.version
        start = int(self.start_addr)
        end = start if self.end_addr is self.start_addr else int(self.end_addr)
        # frozen: set once, here
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)
        object.__setattr__(
            self,
            "_hash",
            hash((version, start, end, self.ip_proto, self.start_port, self.end_port)),
        )

    def __hash__(self) -> int:
        return self._hash

    @property
    def span(self) -> tuple[int, int, int]:
        """(IP version, start, end) as ints."""
        return self.version, self.start, self.end

    @property
    def ts_type(self) -> int:
        if self.start_addr.version == 4:
            return TsType.TS_IPV4_ADDR_RANGE
        return TsType.TS_IPV6_ADDR_RANGE

    @classmethod
    def from_network(
        cls, net: str, ip_proto: int = 0, start_port: int = 0, end_port: int = 65535
    ) -> TrafficSelector:
        n = ipaddress.ip_network(net, strict=False)
        return cls(n.network_address, n.broadcast_address, ip_proto, start_port, end_port)

    def __str__(self) -> str:
        ports = (
            ""
            if (self.start_port, self.end_port) == (0, 65535)
            else (f"[{self.start_port}-{self.end_port}]")
        )
        return f"{self.start_addr}-{self.end_addr}/{self.ip_proto}{ports}"


@dataclass
class TSPayload:
    """TSi (``type`` = 44) or TSr (45)."""

    selectors: list[TrafficSelector]
    type: int = PayloadType.TSi


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
_U16X2 = struct.Struct("!HH")
_KEY_LENGTH_ATTR = 0x8000 | ATTR_KEY_LENGTH  # TV format (AF bit set), §3.3.5
# A whole transform in one pack (§3.3.2): generic header + _TRANSFORM [+ key length]
_TRANSFORM_8 = struct.Struct("!BBHBBH")
_TRANSFORM_12 = struct.Struct("!BBHBBHHH")


def _underrun(pos: int, n: int, end: int) -> BufferReadError:
    return BufferReadError(f"need {n} bytes, {end - pos} left")


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


# --- Traffic selectors (§3.13) ------------------------------------------------


_TS_HEAD = struct.Struct("!BBHHH")  # type, protocol, length, start port, end port


# A peer sends the same selectors in every IKE_AUTH and CREATE_CHILD_SA, and
# building the two ipaddress objects costs more than the rest of the TS payload.
# TrafficSelector and the addresses are immutable, so one object can be shared:
# the caller may pass a table wire record (type .. end address) -> TrafficSelector
# (its endpoint's, ``EngineCaches.selectors``), bounded here (emptied when full)
# whatever a peer sends.
TS_CACHE_MAX = 256


def _parse_ts(
    data: bytes, pos: int, end: int, ptype: int, cache: dict[bytes, TrafficSelector] | None
) -> TSPayload:
    if pos + 4 > end:
        raise _underrun(pos, 4 if pos < end else 1, end)
    count = data[pos]
    pos += 4
    selectors: list[TrafficSelector] = []
    if cache is None:
        cache = {}
    for _ in range(count):
        if pos + 4 > end:
            raise _underrun(pos, 4, end)
        ts_type, proto, slen = _GENERIC.unpack_from(data, pos)
        if ts_type == TsType.TS_IPV4_ADDR_RANGE and slen == 16:
            cls: type[IPAddress] = ipaddress.IPv4Address
            alen = 4
        elif ts_type == TsType.TS_IPV6_ADDR_RANGE and slen == 40:
            cls, alen = ipaddress.IPv6Address, 16
        else:
            raise DecodeError(f"unsupported traffic selector type {ts_type}/len {slen}")
        if pos + slen > end:
            raise _underrun(pos + 4, slen - 4, end)
        record = data[pos : pos + slen]
        ts = cache.get(record)
        if ts is None:
            _, _, _, sp, ep = _TS_HEAD.unpack_from(record)
            a = cls(record[8 : 8 + alen])
            # A host (start = end, the usual peer selector) holds one address object
            b = a if record[8 : 8 + alen] == record[8 + alen :] else cls(record[8 + alen :])
            ts = TrafficSelector(a, b, proto, sp, ep)
            if len(cache) >= TS_CACHE_MAX:
                cache.clear()
            cache[record] = ts
        pos += slen
        selectors.append(ts)
    if pos != end:
        raise DecodeError("trailing bytes in TS payload")
    return TSPayload(selectors, ptype)


def _build_ts(p: TSPayload) -> bytes:
    parts = [bytes([len(p.selectors), 0, 0, 0])]
    for ts in p.selectors:
        alen = 4 if ts.start_addr.version == 4 else 16
        parts.append(_TS_HEAD.pack(ts.ts_type, ts.ip_proto, 8 + 2 * alen, ts.start_port,
                                   ts.end_port))  # fmt: skip
        parts.append(ts.start_addr.packed)
        parts.append(ts.end_addr.packed)
    return b"".join(parts)


# --- The rest ------------------------------------------------------------------


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
