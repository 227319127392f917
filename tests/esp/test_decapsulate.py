"""Inbound checks after decryption: padding, Next Header 59, lengths, SPI, counters.

Packets here come from the ``seal`` fixture (AESGCM directly, any plaintext we
like), so an authentic packet can carry a trailer OutboundSA would never build.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import esp

Seal = Callable[..., bytes]  # the ``seal`` fixture from conftest.py

KEY = bytes(range(0x20, 0x30)) + b"salt"
SPI = 0x0BADCAFE


def _inbound(use_esn: bool = False) -> esp.InboundSA:
    return esp.InboundSA(SPI, KEY, esn=use_esn)


@pytest.mark.parametrize(
    ("payload", "trailer"),
    [
        (b"abcd", b"\x01\x02\x02\x06"),  # OutboundSA's own choice
        (b"abcde", b"\x01\x01\x06"),
        (b"ab", b"\x00\x06"),  # no padding
        (b"", b"\x01\x02\x02\x06"),  # empty payload
        (b"abcd", bytes(range(1, 11)) + b"\x0a\x06"),  # more than needed: allowed
        (b"abcd", bytes(range(1, 256)) + b"\xff\x06"),  # the maximum, 255
    ],
)
def test_valid_trailers_accepted(seal: Seal, payload: bytes, trailer: bytes) -> None:
    sa = _inbound()
    assert sa.decapsulate(seal(KEY, SPI, 1, payload + trailer)) == (payload, 6)
    assert sa.counters.bytes == len(payload)


@pytest.mark.parametrize(
    "trailer",
    [
        b"\x01\x03\x02\x06",  # 1, 3 instead of 1, 2
        b"\x00\x00\x02\x06",  # zeros
        b"\x02\x01\x02\x06",  # reversed
        b"\x07\x01\x06",  # wrong single byte
        bytes(range(1, 10)) + b"\x00\x0a\x06",  # last of ten wrong
    ],
)
def test_bad_padding_bytes(seal: Seal, trailer: bytes) -> None:
    sa = _inbound()
    with pytest.raises(esp.PadError) as info:
        sa.decapsulate(seal(KEY, SPI, 1, b"abcd" + trailer))
    assert isinstance(info.value, esp.MalformedError)
    drops = {reason: sa.counters.drops[reason] for reason in esp.DROP_REASONS}
    assert drops == {**dict.fromkeys(esp.DROP_REASONS, 0), "bad_padding": 1}
    assert sa.counters.packets == 0
    # authentic, so its sequence number is used up (RFC 4303 §3.4.3 updates the
    # window after the ICV verified): a replay is a replay
    with pytest.raises(esp.ReplayError):
        sa.decapsulate(seal(KEY, SPI, 1, b"abcd" + trailer))


@pytest.mark.parametrize("plaintext", [b"\x01\x06", b"\x05\x06", b"ab\x03\x06", b"\xff\x06"])
def test_pad_length_beyond_payload_is_malformed(seal: Seal, plaintext: bytes) -> None:
    sa = _inbound()
    with pytest.raises(esp.MalformedError) as info:
        sa.decapsulate(seal(KEY, SPI, 1, plaintext))
    assert type(info.value) is esp.MalformedError
    assert sa.counters.drops["malformed"] == 1


@pytest.mark.parametrize("use_esn", [False, True])
def test_dummy_packet_dropped_and_counted(seal: Seal, use_esn: bool) -> None:
    sa = _inbound(use_esn)
    with pytest.raises(esp.DummyPacket):
        sa.decapsulate(seal(KEY, SPI, 1, b"tfc filler\x01\x02\x02\x3b", esn=use_esn))
    assert sa.counters.drops["dummy"] == 1
    assert sa.counters.packets == 0
    assert sa.counters.bytes == 0
    # the sender's own dummies too
    out = esp.OutboundSA(SPI, KEY, esn=use_esn, seq=2)
    with pytest.raises(esp.DummyPacket):
        sa.decapsulate(out.encapsulate(b"", esp.NEXT_HEADER_DUMMY))
    assert sa.counters.drops["dummy"] == 2


def test_every_length_below_minimum_is_truncated(seal: Seal) -> None:
    # The shortest authentic packet: empty payload, no padding, Pad Length, Next
    # Header (OutboundSA would pad it to 4 bytes; RFC 4303 asks the receiver only
    # for the padding values, so we accept it).
    shortest = seal(KEY, SPI, 1, b"\x00\x06")
    assert len(shortest) == esp.MIN_PACKET_LEN == 34
    sa = _inbound()
    for n in range(esp.MIN_PACKET_LEN):
        with pytest.raises(esp.TruncatedError):
            sa.decapsulate(shortest[:n])
    assert sa.counters.drops["truncated"] == esp.MIN_PACKET_LEN
    assert sa.window.top == 0
    assert sa.decapsulate(shortest) == (b"", 6)


def test_unknown_spi(seal: Seal) -> None:
    sa = _inbound()
    with pytest.raises(esp.UnknownSpiError):
        sa.decapsulate(seal(KEY, SPI + 1, 1, b"ab\x00\x06"))
    assert sa.counters.drops["unknown_spi"] == 1


def test_wrong_key_is_icv_failure() -> None:
    out = esp.OutboundSA(SPI, bytes(20))
    sa = _inbound()
    with pytest.raises(esp.IntegrityError):
        sa.decapsulate(out.encapsulate(b"x", 6))
    assert sa.counters.drops["icv_failed"] == 1
    assert sa.window.top == 0


def test_other_buffer_types_are_accepted() -> None:
    out = esp.OutboundSA(SPI, KEY)
    sa = _inbound()
    assert sa.decapsulate(bytearray(out.encapsulate(b"hello", 17))) == (b"hello", 17)
    assert sa.decapsulate(memoryview(out.encapsulate(b"world", 17))) == (b"world", 17)


def test_non_bytes_input_is_malformed_not_type_error() -> None:
    sa = _inbound()
    for junk in (None, 42, "x" * 40, [0] * 40):
        with pytest.raises(esp.MalformedError):
            sa.decapsulate(junk)  # type: ignore[arg-type]
