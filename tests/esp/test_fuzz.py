"""Property tests: whatever the bytes, decapsulate returns a payload or raises an
EspError subclass (never anything else), and counts exactly one outcome per call."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

import esp

KEY = bytes(range(0x50, 0x60)) + b"salt"
SPI = 0x0F0E0D0C


def _outcome(sa: esp.InboundSA, data: bytes) -> tuple[bytes, int] | esp.EspError:
    try:
        return sa.decapsulate(data)
    except esp.EspError as err:  # anything else fails the test
        return err


def _counted(sa: esp.InboundSA) -> int:
    return sa.counters.packets + sum(sa.counters.drops.values())


@settings(max_examples=400)
@given(data=st.binary(max_size=200), use_esn=st.booleans())
def test_arbitrary_bytes(data: bytes, use_esn: bool) -> None:
    sa = esp.InboundSA(SPI, KEY, esn=use_esn)
    result = _outcome(sa, data)
    assert isinstance(result, esp.EspError)  # forging a GCM tag is not on the table
    assert _counted(sa) == 1


@settings(max_examples=400)
@given(
    seq_low=st.integers(0, 0xFFFFFFFF),
    body=st.binary(max_size=120),
    use_esn=st.booleans(),
    top=st.integers(0, 0xFFFFFFFF),
)
def test_arbitrary_bytes_behind_our_spi(seq_low: int, body: bytes, use_esn: bool, top: int) -> None:
    """Past the SPI check, into the window and AES code with any sequence number."""
    sa = esp.InboundSA(SPI, KEY, esn=use_esn, replay_window=32)
    sa.window.reset(top)
    result = _outcome(sa, struct.pack(">II", SPI, seq_low) + body)
    assert isinstance(result, esp.EspError)
    assert sa.window.top == top  # nothing unauthenticated moves the window
    assert _counted(sa) == 1


_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("append"), st.integers(1, 40), st.integers(0, 255)),
    st.tuples(st.just("drop"), st.integers(0, 10_000), st.just(0)),
)


def _mutate(packet: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(packet)
    for kind, where, value in mutations:
        if kind == "flip" and data:
            data[where % len(data)] ^= value
        elif kind == "cut":
            del data[where % (len(data) + 1) :]
        elif kind == "append":
            data += bytes([value]) * where
        elif kind == "drop" and data:
            del data[where % len(data)]
    return bytes(data)


@settings(max_examples=400)
@given(
    payload=st.binary(max_size=64),
    next_header=st.integers(0, 255),
    use_esn=st.booleans(),
    mutations=st.lists(_MUTATION, min_size=1, max_size=4),
)
def test_mutated_valid_packets(
    payload: bytes, next_header: int, use_esn: bool, mutations: list[tuple[str, int, int]]
) -> None:
    out = esp.OutboundSA(SPI, KEY, esn=use_esn, seq=(1 << 32) - 1)
    sa = esp.InboundSA(SPI, KEY, esn=use_esn)
    sa.window.reset((1 << 32) - 2)
    packet = out.encapsulate(payload, next_header)
    mutated = _mutate(packet, mutations)
    result = _outcome(sa, mutated)
    if mutated == packet:
        expected = esp.DummyPacket if next_header == 59 else tuple
        assert isinstance(result, expected)
    else:
        assert isinstance(result, esp.EspError)
        assert sa.window.top == (1 << 32) - 2
        # the genuine packet still gets through after the forgery
        genuine = _outcome(sa, packet)
        assert genuine == (payload, next_header) or next_header == 59
    assert _counted(sa) == (1 if mutated == packet else 2)


@settings(max_examples=200)
@given(payload=st.binary(max_size=1500), next_header=st.integers(0, 255), use_esn=st.booleans())
def test_round_trip(payload: bytes, next_header: int, use_esn: bool) -> None:
    out = esp.OutboundSA(SPI, KEY, esn=use_esn)
    sa = esp.InboundSA(SPI, KEY, esn=use_esn)
    packet = out.encapsulate(payload, next_header)
    assert (len(packet) - 16 - 16) % 4 == 0
    if next_header == esp.NEXT_HEADER_DUMMY:
        assert isinstance(_outcome(sa, packet), esp.DummyPacket)
    else:
        assert sa.decapsulate(packet) == (payload, next_header)
