"""Typed ESP errors.

Every packet the data path drops is dropped with one of these, and each class names
the :class:`esp.counters.SaCounters` drop counter it bumps (``counter``). The SA has
already bumped that counter when the error reaches the caller, so the daemon only
decides what to log or trace; it never needs to count.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "DummyPacket",
    "EspError",
    "IntegrityError",
    "MalformedError",
    "PadError",
    "ReplayError",
    "SequenceExhausted",
    "TruncatedError",
    "UnknownSpiError",
]


class EspError(Exception):
    """Base of every error the esp package raises for a packet."""

    counter: ClassVar[str] = "malformed"


class MalformedError(EspError):
    """The packet cannot be ESP as this SA understands it (e.g. pad length too big)."""

    counter = "malformed"


class TruncatedError(MalformedError):
    """Shorter than SPI + sequence + IV + Pad Length + Next Header + ICV (34 bytes)."""

    counter = "truncated"


class PadError(MalformedError):
    """The padding bytes are not 1, 2, 3, ... (RFC 4303 §2.4 says to check them)."""

    counter = "bad_padding"


class ReplayError(EspError):
    """Duplicate, or older than the anti-replay window (RFC 4303 §3.4.3)."""

    counter = "replayed"


class IntegrityError(EspError):
    """The ICV did not verify (forged, corrupted, or wrong key/ESN high bits)."""

    counter = "icv_failed"


class UnknownSpiError(EspError):
    """The packet's SPI is not this SA's SPI."""

    counter = "unknown_spi"


class DummyPacket(EspError):
    """Authentic packet with Next Header 59: RFC 4303 §2.6 says discard it silently."""

    counter = "dummy"


class SequenceExhausted(EspError):
    """Outbound sequence number would cycle (RFC 4303 §3.3.3): the SA must be rekeyed."""

    counter = "seq_exhausted"
