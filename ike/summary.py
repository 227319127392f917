"""One-line summaries of IKE datagrams for the packet-flow trace.

pyikev2's habit (STYLE.md, "Logs a person can read"): direction, exchange,
size and the list of payloads, e.g. ``IKE_AUTH request #1 (256 bytes)
SK{IDi, AUTH, SA, TSi, TSr, N(INITIAL_CONTACT)}``. The payload list inside the
SK payload is only known after decryption, so :func:`summarize` takes the IKE
SAs that may hold the keys; without them (or if the keys do not open the
message) the summary names the first inner payload only, which is all the
wire shows (RFC 7296 §3.14: the SK header's Next Payload field).

Pure: bytes in, a dataclass out. Nothing here raises on bad input: a datagram
that is not IKE yields ``None``. Keys never appear in the summary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .buffer import Buffer, DecodeError
from .constants import IKE_HEADER_LEN, ExchangeType, NotifyType, PayloadType
from .crypto import CryptoError
from .payloads import (
    DeletePayload,
    NotifyPayload,
    Payload,
    TSPayload,
    UnknownPayload,
    parse_chain,
    parse_header,
)
from .sa import IkeSA

NON_ESP_MARKER = b"\x00\x00\x00\x00"

_PAYLOAD_NAMES: dict[int, str] = {
    PayloadType.SA: "SA",
    PayloadType.KE: "KE",
    PayloadType.IDi: "IDi",
    PayloadType.IDr: "IDr",
    PayloadType.CERT: "CERT",
    PayloadType.CERTREQ: "CERTREQ",
    PayloadType.AUTH: "AUTH",
    PayloadType.NONCE: "Nonce",
    PayloadType.NOTIFY: "N",
    PayloadType.DELETE: "D",
    PayloadType.VENDOR: "V",
    PayloadType.TSi: "TSi",
    PayloadType.TSr: "TSr",
    PayloadType.CP: "CP",
    PayloadType.EAP: "EAP",
}


@dataclass
class IkeSummary:
    """What a trace line says about one IKE datagram."""

    exchange: str  # "IKE_SA_INIT", "IKE_AUTH", ... or "EXCHANGE_<n>"
    response: bool
    from_initiator: bool
    msg_id: int
    length: int  # the IKE message, without the non-ESP marker
    spi_i: str
    spi_r: str
    payloads: list[str] = field(default_factory=list)
    encrypted: bool = False
    decrypted: bool = False
    sa_name: str | None = None  # the engine's name of the IKE SA it belongs to

    def __str__(self) -> str:
        kind = "response" if self.response else "request"
        return f"{self.exchange} {kind} #{self.msg_id} ({self.length} bytes) {self.payload_text}"

    @property
    def payload_text(self) -> str:
        return ", ".join(self.payloads)


def payload_name(p: Payload) -> str:
    """``N(INITIAL_CONTACT)``, ``D(ESP, 1 SPI)``, ``TSi(1)``, ``SA``..."""
    if isinstance(p, NotifyPayload):
        try:
            return f"N({NotifyType(p.notify_type).name})"
        except ValueError:
            return f"N({p.notify_type})"
    if isinstance(p, DeletePayload):
        proto = {1: "IKE", 3: "ESP"}.get(p.protocol, str(p.protocol))
        return f"D({proto}, {len(p.spis)} SPI)"
    if isinstance(p, TSPayload):
        return f"{_PAYLOAD_NAMES.get(p.type, '?')}({len(p.selectors)})"
    if isinstance(p, UnknownPayload):
        return _PAYLOAD_NAMES.get(p.type, f"#{p.type}")
    return _PAYLOAD_NAMES.get(p.type, f"#{p.type}")


def _exchange_name(value: int) -> str:
    try:
        return ExchangeType(value).name
    except ValueError:
        return f"EXCHANGE_{value}"


#: ``find(spi_i, spi_r)``: the IKE SA a message with these SPIs may belong to
SaLookup = Callable[[bytes, bytes], "IkeSA | None"]


def among(sas: Iterable[IkeSA]) -> SaLookup:
    """A :data:`SaLookup` over a few SAs (a scan: for tests and single SAs; the
    daemon passes :meth:`ike.IkeEndpoint.sa_by_spis`, an index)."""
    listed = list(sas)

    def find(spi_i: bytes, spi_r: bytes) -> IkeSA | None:
        return next((sa for sa in listed if _owns(sa, spi_i)), None)

    return find


def _owns(sa: IkeSA, spi_i: bytes) -> bool:
    """``sa``'s current or replaced keys carry IKE SPIi ``spi_i``."""
    return any(ch is not None and ch.spi_i == spi_i for ch in (sa.ch, sa.old_ch))


def summarize(data: bytes, find: SaLookup | None = None) -> IkeSummary | None:
    """Summarise one UDP payload (port 500, or 4500 with its non-ESP marker).

    ``find`` gives the IKE SA with the message's SPIs (checked: its SPIi); its keys, if
    any, decrypt the SK payload to list the inner payloads (either direction:
    GCM and CBC+HMAC open with the key that sealed them).
    """
    if data[:4] == NON_ESP_MARKER:
        data = data[4:]
    try:
        hdr = parse_header(data)
        outer, sk = parse_chain(Buffer(data, IKE_HEADER_LEN), hdr.next_payload)
    except DecodeError:
        return None
    sa = find(hdr.spi_i, hdr.spi_r) if find is not None else None
    if sa is not None and not _owns(sa, hdr.spi_i):
        sa = None
    out = IkeSummary(
        _exchange_name(hdr.exchange),
        hdr.is_response,
        hdr.from_initiator,
        hdr.msg_id,
        hdr.length,
        hdr.spi_i.hex(),
        hdr.spi_r.hex(),
        [payload_name(p) for p in outer],
        sa_name=sa.name if sa is not None else None,
    )
    if sk is None:
        return out
    out.encrypted = True
    inner = _open(sa, hdr.spi_r, data, sk.offset, sk.first_inner)
    if inner is None:
        first = _PAYLOAD_NAMES.get(sk.first_inner, f"#{sk.first_inner}")
        out.payloads.append(f"SK{{{first}, ...}}" if sk.first_inner else "SK{}")
    else:
        out.decrypted = True
        out.payloads.append("SK{" + ", ".join(payload_name(p) for p in inner) + "}")
    return out


def _open(
    sa: IkeSA | None, spi_r: bytes, data: bytes, offset: int, first: int
) -> list[Payload] | None:
    if sa is None:
        return None
    for ch in (sa.ch, sa.old_ch):
        if ch is None or ch.spi_r != spi_r:
            continue
        for cipher in (ch.inb, ch.out):
            if cipher is None:
                continue
            try:
                inner = cipher.open(data, offset)
                payloads, nested = parse_chain(Buffer(inner), first)
            except (CryptoError, DecodeError, ValueError):
                continue
            if nested is None:
                return payloads
    return None
