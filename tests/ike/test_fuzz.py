"""Hypothesis: garbage and mutated messages never raise and never hurt established state."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ike.buffer import Buffer, DecodeError
from ike.constants import ExchangeType, PayloadType, ProtocolId
from ike.payloads import DeletePayload, build_header, parse_chain, parse_message

from .pair import I_ADDR, R_ADDR, Pair, configs

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _established() -> Pair:
    p = Pair(*configs())
    p.handshake()
    p.i.liveness_check(p.now)
    p.create = p.roundtrip()  # type: ignore[attr-defined]
    return p


BASE = _established()
TEMPLATES = [d for _, _, d in BASE.wire]


def _assert_healthy(p: Pair) -> None:
    assert p.ep.counters.get("sa_internal_error", 0) == 0, p.ep.counters
    for c in [p.i.counters] + [s.counters for s in p.ep.sas]:
        assert c.get("internal_error", 0) == 0, c


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(TEMPLATES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "len"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "len" and len(data) >= 28:
            # keep the header length consistent so the payload parser is reached
            data[24:28] = len(data).to_bytes(4, "big")
    return bytes(data)


@SETTINGS
@given(st.lists(st.one_of(st.binary(max_size=300), mutated()), min_size=1, max_size=6))
def test_new_responder_survives_garbage(datagrams: list[bytes]) -> None:
    p = Pair(*configs())
    for d in datagrams:
        p.ep.receive_datagram(d, I_ADDR, 0.0)
        p.ep.datagrams_to_send(0.0)
        p.ep.handle_timer(100.0)
    _assert_healthy(p)


@SETTINGS
@given(st.lists(mutated(), min_size=1, max_size=6))
def test_established_sas_survive_mutations(datagrams: list[bytes]) -> None:
    p = _established()
    r = p.r
    children_i, children_r = dict(p.i.children), dict(r.children)
    for d in datagrams:
        p.ep.receive_datagram(d, I_ADDR, p.now)
        p.i.receive_datagram(d, R_ADDR, p.now)
    # SK integrity protects everything after IKE_SA_INIT: nothing changed. (A mutated
    # IKE_SA_INIT with another SPIi is a new half-open SA, which is fine.)
    assert p.i.established and r.established and r in p.ep.sas
    assert p.i.children == children_i and r.children == children_r
    _assert_healthy(p)
    p.ep.sas[:] = [r]
    p.ep.datagrams_to_send(p.now)
    p.i.liveness_check(p.now)
    p.r.liveness_check(p.now)
    p.roundtrip()
    assert p.i.counters["liveness_ok"] == 2 and p.r.counters["liveness_ok"] == 1


@SETTINGS
@given(
    first=st.sampled_from([t.value for t in PayloadType] + [0, 1, 99, 200]),
    inner=st.binary(max_size=200),
    exchange=st.sampled_from([35, 36, 37, 38]),
)
def test_authenticated_garbage_inside_sk(first: int, inner: bytes, exchange: int) -> None:
    """Correctly protected requests with nonsense inside: answered (or dropped), never raised."""
    p = _established()
    ch = p.i.ch
    assert ch.out is not None
    msg_id = ch.next_id

    def prefix(total: int) -> bytes:
        hdr = build_header(ch.spi_i, ch.spi_r, PayloadType.SK, exchange, 0x08, msg_id, total)
        return hdr + bytes([first, 0]) + max(total - 28, 0).to_bytes(2, "big")

    data = ch.out.seal(inner, prefix)
    p.ep.receive_datagram(data, I_ADDR, p.now)
    _assert_healthy(p)
    out = p.ep.datagrams_to_send(p.now)
    try:
        payloads, _ = parse_chain(Buffer(inner), first)
    except DecodeError:
        payloads = None
    deletes_ike = payloads is not None and any(
        isinstance(x, DeletePayload) and x.protocol == ProtocolId.IKE for x in payloads
    )
    if exchange in (ExchangeType.CREATE_CHILD_SA, ExchangeType.INFORMATIONAL):
        assert len(out) == 1  # every well-protected request gets exactly one answer
        hdr, _, _ = parse_message(out[0][0])
        assert hdr.msg_id == msg_id and hdr.is_response
    if not deletes_ike:
        assert p.ep.sas and p.r.established
