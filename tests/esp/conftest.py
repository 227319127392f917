"""Helpers for the esp tests.

``seal`` builds an ESP packet straight from AESGCM with a plaintext the test chooses
(bad padding, Next Header 59, ...): an encoder independent of esp.OutboundSA.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

Seal = Callable[..., bytes]


def seal_packet(
    keymat: bytes,
    spi: int,
    seq: int,
    plaintext: bytes,
    *,
    esn: bool = False,
    iv: bytes | None = None,
) -> bytes:
    """SPI ‖ seq32 ‖ IV ‖ AESGCM(salt ‖ IV, plaintext, AAD) per RFC 4106 §3-5."""
    iv = seq.to_bytes(8, "big") if iv is None else iv
    low = seq & 0xFFFFFFFF
    aad = struct.pack(">III", spi, seq >> 32, low) if esn else struct.pack(">II", spi, low)
    sealed = AESGCM(keymat[:-4]).encrypt(keymat[-4:] + iv, plaintext, aad)
    return struct.pack(">II", spi, low) + iv + sealed


@pytest.fixture
def seal() -> Seal:
    return seal_packet
