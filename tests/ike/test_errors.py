"""Error notifies (§2.21, §3.10.1) and the drops of §2.21 with their counters."""

from __future__ import annotations

from ike.buffer import Buffer
from ike.config import Identity
from ike.constants import IdType, NotifyType, PayloadType
from ike.events import ChildSaInstalled, IkeSaEstablished
from ike.payloads import (
    NoncePayload,
    NotifyPayload,
    TrafficSelector,
    UnknownPayload,
    VendorPayload,
    build_plain_message,
    find_notify,
    parse_chain,
    parse_message,
)

from .pair import I_ADDR, Pair, configs


def _first_request(p: Pair) -> bytes:
    p.i.initiate(0.0)
    ((req, _),) = p.i.datagrams_to_send(0.0)
    return req


def _answer_to(p: Pair, data: bytes) -> list[object]:
    p.ep.receive_datagram(data, I_ADDR, 0.0)
    out = p.ep.datagrams_to_send(0.0)
    assert len(out) == 1
    hdr, payloads, _ = parse_message(out[0][0])
    assert hdr.is_response and hdr.msg_id == 0
    return list(payloads)


def _rebuild(req: bytes, change: object) -> bytes:
    hdr, payloads, _ = parse_message(req)
    payloads = change(payloads)  # type: ignore[operator]
    return build_plain_message(hdr.spi_i, hdr.spi_r, hdr.exchange, hdr.flags, 0, payloads)


def test_unknown_critical_payload_is_refused() -> None:
    p = Pair(*configs())
    bad = _rebuild(_first_request(p), lambda pl: [*pl, UnknownPayload(200, True, b"xx")])
    (n,) = _answer_to(p, bad)
    assert isinstance(n, NotifyPayload)
    assert n.notify_type == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD and n.data == bytes([200])
    assert not p.ep.sas


def test_unknown_noncritical_and_vendor_payloads_are_ignored() -> None:
    p = Pair(*configs())
    req = _first_request(p)
    ok = _rebuild(req, lambda pl: [*pl, UnknownPayload(200, False, b"x"), VendorPayload(b"v")])
    payloads = _answer_to(p, ok)
    assert [type(x).__name__ for x in payloads][:3] == ["SAPayload", "KEPayload", "NoncePayload"]
    # the critical bit on a payload type we know is not a reason to refuse (§2.5)
    assert len(p.ep.sas) == 1


def test_missing_nonce_is_invalid_syntax() -> None:
    p = Pair(*configs())
    bad = _rebuild(_first_request(p), lambda pl: [x for x in pl if not isinstance(x, NoncePayload)])
    (n,) = _answer_to(p, bad)
    assert isinstance(n, NotifyPayload) and n.notify_type == NotifyType.INVALID_SYNTAX


def test_short_nonce_is_invalid_syntax() -> None:
    p = Pair(*configs())
    bad = _rebuild(
        _first_request(p),
        lambda pl: [NoncePayload(b"n" * 15) if isinstance(x, NoncePayload) else x for x in pl],
    )
    assert find_notify(_answer_to(p, bad), NotifyType.INVALID_SYNTAX) is not None  # type: ignore[arg-type]


def test_drops_are_counted_and_harmless() -> None:
    p = Pair(*configs())
    p.handshake()
    auth_req = [d for who, _, d in p.wire if who == "i>r"][1]
    # wrong message ID (a future one): dropped
    future = bytearray(auth_req)
    future[20:24] = (7).to_bytes(4, "big")
    p.ep.receive_datagram(bytes(future), I_ADDR, 0.0)
    assert p.r.counters["bad_msg_id"] == 1
    # unknown SPI: dropped by the endpoint
    other = bytearray(auth_req)
    other[8:16] = b"\x01" * 8
    p.ep.receive_datagram(bytes(other), I_ADDR, 0.0)
    assert p.ep.counters["unknown_spi"] == 1
    # a request with the right ID and a broken ICV: dropped, ID not consumed (§2.21)
    p.i.liveness_check(p.now)
    ((live, _),) = p.i.datagrams_to_send(p.now)
    broken = bytearray(live)
    broken[-1] ^= 1
    p.ep.receive_datagram(bytes(broken), I_ADDR, 0.0)
    assert p.r.counters["integrity_failed"] == 1 and p.r.ch.peer_id == 2
    # truncated and oversized copies: length field mismatch
    p.ep.receive_datagram(live[:-3], I_ADDR, 0.0)
    p.ep.receive_datagram(live + b"\x00", I_ADDR, 0.0)
    assert p.ep.counters["malformed"] == 2
    assert not p.ep.datagrams_to_send(0.0)
    # the real one still works
    p.ep.receive_datagram(live, I_ADDR, 0.0)
    p.roundtrip()
    assert p.i.counters["liveness_ok"] == 1 and p.r.established


def test_fqdn_and_email_identities_over_ipv6() -> None:
    a, b = ("2001:db8::1", 500), ("2001:db8::2", 500)
    fq = Identity(IdType.ID_FQDN, "gw-a.example.net")
    em = Identity(IdType.ID_RFC822_ADDR, "gw-b@example.net")
    p = Pair(
        *configs(
            i_local_addr=a,
            i_peer_addr=b,
            r_local_addr=b,
            r_peer_addr=a,
            i_local_id=fq,
            i_remote_id=em,
            r_local_id=em,
            r_remote_id=fq,
        )
    )
    p.i_src = a
    p.handshake()
    (e,) = p.events_of("r", IkeSaEstablished)
    assert e.remote_id == "ID_FQDN:gw-a.example.net"
    (c,) = p.events_of("i", ChildSaInstalled)
    assert list(c.local_ts) == [TrafficSelector.from_network("2001:db8::1/128")]


def test_identity_mismatch_fails_authentication() -> None:
    p = Pair(*configs(r_remote_id=Identity(IdType.ID_FQDN, "someone.else")))
    p.handshake()
    assert p.i.dead and not p.ep.sas
    # the responder answered IKE_AUTH with only N(AUTHENTICATION_FAILED), no AUTH of its own
    answer = [d for who, _, d in p.wire if who == "r>i"][1]
    _, _, sk = parse_message(answer)
    assert sk is not None and p.i.ch.inb is not None
    inner, _ = parse_chain(Buffer(p.i.ch.inb.open(answer, sk.offset)), sk.first_inner)
    assert [(x.type, getattr(x, "notify_type", None)) for x in inner] == [
        (PayloadType.NOTIFY, NotifyType.AUTHENTICATION_FAILED)
    ]
