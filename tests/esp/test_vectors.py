"""Known-answer tests: published AES-GCM ESP packets (tests/vectors/esp_aes_gcm.json).

The vectors' IVs are not their sequence numbers, so the production ``encapsulate``
is given the vector's IV through ``iv_source``; ``test_default_iv_is_the_sequence_number``
checks what the data path sends without one, and the scapy tests check
``encapsulate`` against an independent encoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import esp

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "esp_aes_gcm.json").read_text()
)
# RFC 4303 §2.1: SPI 0 is reserved and never sent, and our SAs refuse it;
# the keying material of AES-192 (28 bytes) is outside the API's 20/36 bytes.
USABLE = [v for v in VECTORS if v["key_bits"] != 192 and v["spi"] != "00000000"]
REFUSED = [v for v in VECTORS if v not in USABLE]


def _keymat(v: dict[str, Any]) -> bytes:
    return bytes.fromhex(v["key"] + v["salt"])


def _payload(v: dict[str, Any]) -> bytes:
    plaintext = bytes.fromhex(v["plaintext"])
    return plaintext[: len(plaintext) - 2 - v["pad_length"]]


def test_vector_file_is_the_expected_one() -> None:
    assert len(VECTORS) == 21
    assert len(USABLE) == 18
    assert {v["id"] for v in REFUSED} == {
        "mcgrew-esp-12",
        "mcgrew-esp-14",
        "dpdk-pkt-aes-192-gcm",
    }
    assert sum(v["esn"] for v in USABLE) == 12


@pytest.mark.parametrize("v", USABLE, ids=[v["id"] for v in USABLE])
def test_encapsulate_matches_vector(v: dict[str, Any]) -> None:
    iv = int(v["iv"], 16)
    sa = esp.OutboundSA(
        int(v["spi"], 16), _keymat(v), esn=v["esn"], seq=v["seq"], iv_source=lambda _seq: iv
    )
    packet = sa.encapsulate(_payload(v), v["next_header"])
    assert packet.hex() == v["esp_packet"]
    assert sa.next_seq == v["seq"] + 1
    assert sa.counters.packets == 1
    assert sa.counters.bytes == len(_payload(v))


@pytest.mark.parametrize("v", USABLE, ids=[v["id"] for v in USABLE])
def test_decapsulate_matches_vector(v: dict[str, Any]) -> None:
    sa = esp.InboundSA(int(v["spi"], 16), _keymat(v), esn=v["esn"])
    # Put the window just left of the vector's number, so that with ESN the high
    # 32 bits are inferred (RFC 4303 A2.2) rather than given.
    sa.window.reset(v["seq"] - 1)
    payload, next_header = sa.decapsulate(bytes.fromhex(v["esp_packet"]))
    assert payload == _payload(v)
    assert next_header == v["next_header"]
    assert sa.window.top == v["seq"]
    assert sa.counters.packets == 1


@pytest.mark.parametrize("v", [v for v in USABLE if v["esn"]], ids=lambda v: v["id"])
def test_esn_vector_fails_with_wrong_high_bits(v: dict[str, Any]) -> None:
    """A window one 2^32 subspace away infers other high bits: the ICV must fail."""
    sa = esp.InboundSA(int(v["spi"], 16), _keymat(v), esn=True)
    seq = v["seq"]
    other = seq - (1 << 32) if seq >= (1 << 32) else seq + (1 << 32)
    sa.window.reset(other - 1)
    with pytest.raises(esp.IntegrityError):
        sa.decapsulate(bytes.fromhex(v["esp_packet"]))
    assert sa.window.top == other - 1  # RFC 4303 A2.3: nothing moves on ICV failure


@pytest.mark.parametrize("v", REFUSED, ids=[v["id"] for v in REFUSED])
def test_unusable_vectors_are_refused(v: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        esp.OutboundSA(int(v["spi"], 16), _keymat(v), esn=v["esn"])


@given(
    payload=st.binary(max_size=80),
    next_header=st.integers(0, 255),
    esn=st.booleans(),
    seq=st.integers(1, (1 << 32) - 1),
    high=st.integers(0, 5),
)
def test_default_iv_is_the_sequence_number(
    payload: bytes, next_header: int, esn: bool, seq: int, high: int
) -> None:
    """RFC 4106 §3.1: without an IV source the IV is the full 64-bit sequence number,
    and the packet is the one an explicit source giving that IV produces."""
    if esn:
        seq |= high << 32
    key = bytes(range(20))
    default = esp.OutboundSA(0x100, key, esn=esn, seq=seq)
    explicit = esp.OutboundSA(0x100, key, esn=esn, seq=seq, iv_source=lambda s: s)
    packet = default.encapsulate(payload, next_header)
    assert packet[4:8] == (seq & 0xFFFFFFFF).to_bytes(4, "big")
    assert packet[8:16] == seq.to_bytes(8, "big")
    assert packet == explicit.encapsulate(payload, next_header)
