"""IKEv2 message and payload codec (RFC 7296 §3), one parse/build pair per payload.

Plain data in, plain data out: nothing here knows keys. The SK payload
(§3.14) is returned as raw bytes with its offset, and the SA object decrypts it
and parses the inner chain with :func:`parse_chain`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from .buffer import Buffer, DecodeError, Writer
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


@dataclass(frozen=True)
class TrafficSelector:
    start_addr: IPAddress
    end_addr: IPAddress
    ip_proto: int = 0
    start_port: int = 0
    end_port: int = 65535

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


def _parse_sa(buf: Buffer) -> SAPayload:
    proposals: list[Proposal] = []
    last = 2
    while last == 2:
        last = buf.pull_uint8()
        if last not in (0, 2):
            raise DecodeError("bad proposal last-substructure")
        buf.pull_uint8()
        plen = buf.pull_uint16()
        if plen < 8:
            raise DecodeError("proposal too short")
        p = buf.sub(plen - 4)
        number, protocol, spi_size, ntrans = (p.pull_uint8() for _ in range(4))
        spi = p.pull_bytes(spi_size)
        transforms: list[Transform] = []
        tlast = 3
        while tlast == 3:
            tlast = p.pull_uint8()
            if tlast not in (0, 3):
                raise DecodeError("bad transform last-substructure")
            p.pull_uint8()
            tlen = p.pull_uint16()
            if tlen < 8:
                raise DecodeError("transform too short")
            t = p.sub(tlen - 4)
            ttype = t.pull_uint8()
            t.pull_uint8()
            tid = t.pull_uint16()
            key_length: int | None = None
            while not t.eof():
                atype = t.pull_uint16()
                if atype & 0x8000:
                    value = t.pull_uint16()
                    if atype & 0x7FFF == ATTR_KEY_LENGTH:
                        key_length = value
                else:
                    t.pull_bytes(t.pull_uint16())  # TLV attributes: none we know
            transforms.append(Transform(ttype, tid, key_length))
        if len(transforms) != ntrans or not p.eof():
            raise DecodeError("transform count/length mismatch")
        proposals.append(Proposal(number, protocol, spi, transforms))
    if not buf.eof():
        raise DecodeError("trailing bytes in SA payload")
    return SAPayload(proposals)


def _build_sa(p: SAPayload, w: Writer) -> None:
    for i, prop in enumerate(p.proposals):
        body = Writer()
        body.push_uint8(prop.number)
        body.push_uint8(prop.protocol)
        body.push_uint8(len(prop.spi))
        body.push_uint8(len(prop.transforms))
        body.push_bytes(prop.spi)
        for j, t in enumerate(prop.transforms):
            attrs = b""
            if t.key_length is not None:
                attrs = (0x8000 | ATTR_KEY_LENGTH).to_bytes(2, "big") + t.key_length.to_bytes(
                    2, "big"
                )
            body.push_uint8(0 if j == len(prop.transforms) - 1 else 3)
            body.push_uint8(0)
            body.push_uint16(8 + len(attrs))
            body.push_uint8(t.type)
            body.push_uint8(0)
            body.push_uint16(t.id)
            body.push_bytes(attrs)
        w.push_uint8(0 if i == len(p.proposals) - 1 else 2)
        w.push_uint8(0)
        w.push_uint16(4 + len(body))
        w.push_bytes(body.data())


# --- Traffic selectors (§3.13) ------------------------------------------------


def _parse_ts(buf: Buffer, ptype: int) -> TSPayload:
    count = buf.pull_uint8()
    buf.pull_bytes(3)
    selectors: list[TrafficSelector] = []
    for _ in range(count):
        ts_type = buf.pull_uint8()
        proto = buf.pull_uint8()
        slen = buf.pull_uint16()
        if ts_type == TsType.TS_IPV4_ADDR_RANGE and slen == 16:
            alen = 4
        elif ts_type == TsType.TS_IPV6_ADDR_RANGE and slen == 40:
            alen = 16
        else:
            raise DecodeError(f"unsupported traffic selector type {ts_type}/len {slen}")
        sp, ep = buf.pull_uint16(), buf.pull_uint16()
        a = ipaddress.ip_address(buf.pull_bytes(alen))
        b = ipaddress.ip_address(buf.pull_bytes(alen))
        selectors.append(TrafficSelector(a, b, proto, sp, ep))
    if not buf.eof():
        raise DecodeError("trailing bytes in TS payload")
    return TSPayload(selectors, ptype)


def _build_ts(p: TSPayload, w: Writer) -> None:
    w.push_uint8(len(p.selectors))
    w.push_bytes(b"\x00\x00\x00")
    for ts in p.selectors:
        alen = 4 if ts.start_addr.version == 4 else 16
        w.push_uint8(ts.ts_type)
        w.push_uint8(ts.ip_proto)
        w.push_uint16(8 + 2 * alen)
        w.push_uint16(ts.start_port)
        w.push_uint16(ts.end_port)
        w.push_bytes(ts.start_addr.packed)
        w.push_bytes(ts.end_addr.packed)


# --- The rest ------------------------------------------------------------------


def _parse_body(ptype: int, critical: bool, buf: Buffer) -> Payload:
    if ptype == PayloadType.SA:
        return _parse_sa(buf)
    if ptype == PayloadType.KE:
        group = buf.pull_uint16()
        buf.pull_uint16()
        return KEPayload(group, buf.pull_rest())
    if ptype == PayloadType.NONCE:
        return NoncePayload(buf.pull_rest())
    if ptype in (PayloadType.IDi, PayloadType.IDr):
        id_type = buf.pull_uint8()
        buf.pull_bytes(3)
        return IDPayload(id_type, buf.pull_rest(), ptype)
    if ptype == PayloadType.AUTH:
        method = buf.pull_uint8()
        buf.pull_bytes(3)
        return AuthPayload(method, buf.pull_rest())
    if ptype == PayloadType.NOTIFY:
        protocol = buf.pull_uint8()
        spi_size = buf.pull_uint8()
        ntype = buf.pull_uint16()
        spi = buf.pull_bytes(spi_size)
        return NotifyPayload(ntype, buf.pull_rest(), protocol, spi)
    if ptype == PayloadType.DELETE:
        protocol = buf.pull_uint8()
        spi_size = buf.pull_uint8()
        count = buf.pull_uint16()
        spis = [buf.pull_bytes(spi_size) for _ in range(count)]
        if not buf.eof():
            raise DecodeError("trailing bytes in DELETE payload")
        return DeletePayload(protocol, spis)
    if ptype in (PayloadType.TSi, PayloadType.TSr):
        return _parse_ts(buf, ptype)
    if ptype == PayloadType.VENDOR:
        return VendorPayload(buf.pull_rest())
    return UnknownPayload(ptype, critical, buf.pull_rest())


def _build_body(p: Payload, w: Writer) -> None:
    if isinstance(p, SAPayload):
        _build_sa(p, w)
    elif isinstance(p, KEPayload):
        w.push_uint16(p.group)
        w.push_uint16(0)
        w.push_bytes(p.data)
    elif isinstance(p, NoncePayload):
        w.push_bytes(p.nonce)
    elif isinstance(p, IDPayload):
        w.push_bytes(p.rest())
    elif isinstance(p, AuthPayload):
        w.push_bytes(bytes([p.method, 0, 0, 0]))
        w.push_bytes(p.data)
    elif isinstance(p, NotifyPayload):
        w.push_uint8(p.protocol)
        w.push_uint8(len(p.spi))
        w.push_uint16(p.notify_type)
        w.push_bytes(p.spi)
        w.push_bytes(p.data)
    elif isinstance(p, DeletePayload):
        w.push_uint8(p.protocol)
        w.push_uint8(len(p.spis[0]) if p.spis else 0)
        w.push_uint16(len(p.spis))
        for s in p.spis:
            w.push_bytes(s)
    elif isinstance(p, TSPayload):
        _build_ts(p, w)
    else:
        w.push_bytes(p.data)


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


def parse_chain(buf: Buffer, first: int) -> tuple[list[Payload], EncryptedBody | None]:
    """Parse a payload chain starting with type ``first`` until next-payload 0.

    An SK payload ends the chain (§3.14: it must be the last payload) and must
    reach exactly the end of ``buf``.
    """
    payloads: list[Payload] = []
    ptype = first
    while ptype != PayloadType.NONE:
        start = buf.position
        nxt = buf.pull_uint8()
        critical = bool(buf.pull_uint8() & 0x80)
        plen = buf.pull_uint16()
        if plen < GENERIC_HEADER_LEN:
            raise DecodeError("payload length below header size")
        if ptype == PayloadType.SK:
            if plen - GENERIC_HEADER_LEN != buf.remaining():
                raise DecodeError("SK payload is not the last payload")
            return payloads, EncryptedBody(nxt, start)
        body = buf.sub(plen - GENERIC_HEADER_LEN)
        payloads.append(_parse_body(ptype, critical, body))
        ptype = nxt
    if not buf.eof():
        raise DecodeError("bytes after the last payload")
    return payloads, None


def build_chain(payloads: Sequence[Payload], last_next: int = PayloadType.NONE) -> bytes:
    """Encode payloads, chaining Next Payload; the last points at ``last_next``."""
    w = Writer()
    for i, p in enumerate(payloads):
        body = Writer()
        _build_body(p, body)
        nxt = payloads[i + 1].type if i + 1 < len(payloads) else last_next
        w.push_uint8(nxt)
        w.push_uint8(0x80 if isinstance(p, UnknownPayload) and p.critical else 0)
        w.push_uint16(GENERIC_HEADER_LEN + len(body))
        w.push_bytes(body.data())
    return w.data()


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


def parse_header(data: bytes) -> Header:
    """§3.1. The length field must match the datagram exactly."""
    buf = Buffer(data)
    spi_i = buf.pull_bytes(8)
    spi_r = buf.pull_bytes(8)
    nxt = buf.pull_uint8()
    version = buf.pull_uint8()
    exchange = buf.pull_uint8()
    flags = buf.pull_uint8()
    msg_id = buf.pull_uint32()
    length = buf.pull_uint32()
    if version >> 4 != IKE_VERSION >> 4:
        raise DecodeError(f"unsupported major version {version >> 4}")
    if length != len(data):
        raise DecodeError(f"length field {length} != datagram size {len(data)}")
    return Header(spi_i, spi_r, nxt, exchange, flags, msg_id, length)


def build_header(
    spi_i: bytes, spi_r: bytes, nxt: int, exchange: int, flags: int, msg_id: int, length: int
) -> bytes:
    w = Writer()
    w.push_bytes(spi_i)
    w.push_bytes(spi_r)
    w.push_uint8(nxt)
    w.push_uint8(IKE_VERSION)
    w.push_uint8(exchange)
    w.push_uint8(flags)
    w.push_uint32(msg_id)
    w.push_uint32(length)
    return w.data()


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
