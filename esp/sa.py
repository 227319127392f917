"""ESP Security Associations with AES-GCM-16 (RFC 4303 + RFC 4106).

Wire format produced and consumed here (no outer IP or UDP header)::

    0        4        8                16                          -16
    | SPI    | Seq    | IV (8 bytes)   | AES-GCM ciphertext of       | ICV (16) |
    |        | low 32 |                | payload|pad|padlen|nexthdr  |          |

* nonce = salt (last 4 bytes of the keying material) ‖ IV (RFC 4106 §4)
* AAD = SPI ‖ Seq, or with ESN SPI ‖ Seq high 32 ‖ Seq low 32 (RFC 4106 §5)
* we send IV = the 64-bit sequence number: unique per key, which is all RFC 4106 §3.1
  asks; on input the IV is whatever the packet carries.

Hot path notes (measure with tools/bench/esp.py): one AESGCM object per SA, built
once; precompiled structs; trailers (padding ‖ Pad Length ‖ Next Header) precomputed
for every (next header, pad length) pair; the per-packet methods read what is fixed
for the SA's life from one tuple (``_fixed``: one slot read and an unpack, as fast as
the per-SA closures they replace, by tools/bench/esp_ab.py, and without
their ~1 KB of cells and function objects per SA pair: a responder holds 10,000s).
Per packet, encapsulate makes two payload-sized copies
(payload ‖ trailer for AESGCM, header ‖ sealed for the wire) and decapsulate two
(the ciphertext slice AESGCM needs, the payload without its trailer): the
one-shot AESGCM API takes and returns whole buffers, and its ``*_into`` variants
measured slower here. In-order packets take a fast path through the replay window.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, TypedDict, Unpack

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .counters import Lifetime, LifetimeStatus, SaCounters
from .errors import (
    DummyPacket,
    EspError,
    IntegrityError,
    MalformedError,
    PadError,
    SequenceExhausted,
    TruncatedError,
    UnknownSpiError,
)
from .replay import ReplayWindow

__all__ = [
    "ICV_LEN",
    "IV_LEN",
    "MIN_PACKET_LEN",
    "NEXT_HEADER_DUMMY",
    "InboundSA",
    "OutboundSA",
    "SaOptions",
]

SALT_LEN = 4  # RFC 4106 §8.1: KEYMAT = AES key ‖ 4-byte salt
IV_LEN = 8  # RFC 4106 §3.1
ICV_LEN = 16  # ENCR_AES_GCM_16
HEADER_LEN = 8  # SPI + sequence number
# SPI, Seq, IV, Pad Length, Next Header, ICV: the smallest packet that can carry
# anything (an empty payload with no padding).
MIN_PACKET_LEN = HEADER_LEN + IV_LEN + 2 + ICV_LEN
NEXT_HEADER_DUMMY = 59  # RFC 4303 §2.6 ("no next header")
KEYMAT_LENGTHS = (20, 36)  # AES-128 and AES-256, each + salt
MODES = ("tunnel", "transport")

_M32 = 0xFFFFFFFF
_NO_LIMITS = Lifetime()
_NONE_6 = (None,) * 6
_LAST_SEQ_32 = (1 << 32) - 1
_LAST_SEQ_64 = (1 << 64) - 1
# Soft thresholds: leave the daemon 2^20 (2^32 with ESN) packets to finish a rekey.
DEFAULT_SOFT_SEQ_32 = (1 << 32) - (1 << 20)
DEFAULT_SOFT_SEQ_64 = (1 << 64) - (1 << 32)

_HEADER = struct.Struct(">IIQ")  # SPI, seq low 32, IV = full 64-bit seq
_SPI_SEQ = struct.Struct(">II")
_AAD_ESN = struct.Struct(">III")  # RFC 4106 §5: SPI, seq high 32, seq low 32
_NONCE = struct.Struct(">IQ")  # salt (as int), IV
_HEAD = struct.Struct(">II8s")  # SPI, seq low 32, IV as received
# Their bound methods, once for every SA: the per-packet methods read them as
# globals (no bound method per SA: 10,000s of SAs on a responder).
_pack_header = _HEADER.pack
_pack_nonce = _NONCE.pack
_pack_aad_esn = _AAD_ESN.pack
_unpack_head = _HEAD.unpack_from

# RFC 4303 §2.4: padding bytes are 1, 2, 3, ...; _PADS[n] is the n-byte padding.
_PADS: tuple[bytes, ...] = tuple(bytes(range(1, n + 1)) for n in range(256))
# _TRAILERS[next_header][pad_length] = padding ‖ Pad Length ‖ Next Header. GCM needs no
# block alignment, so we pad only to put the trailer at a 4-byte boundary (0..3 bytes).
_TRAILERS: dict[int, tuple[bytes, ...]] = {
    nh: tuple(_PADS[p] + bytes((p, nh)) for p in range(4)) for nh in range(256)
}


def _key_bits(key: bytes) -> int:
    """The AES key size of ESP keying material (validated: key ‖ 4-byte salt)."""
    if not isinstance(key, bytes | bytearray) or len(key) not in KEYMAT_LENGTHS:
        raise ValueError(
            "ESP AES-GCM keying material must be a 16- or 32-byte AES key followed by a "
            "4-byte salt (20 or 36 bytes)"
        )
    return (len(key) - SALT_LEN) * 8


def _split_keymat(key: bytes) -> tuple[AESGCM, bytes]:
    return AESGCM(bytes(key[:-SALT_LEN])), bytes(key[-SALT_LEN:])


class SaOptions(TypedDict, total=False):
    """Keyword arguments both SA directions take.

    ``mode``: "tunnel" or "transport" (kept for the daemon; the wire format is the
    same). ``esn``: 64-bit extended sequence numbers (RFC 4303 §2.2.1).
    ``soft_*``/``hard_*``: lifetimes in packets, payload bytes and seconds since
    ``created`` (caller's clock). ``soft_seq``: sequence number at which to report
    soft expiry (default 2^32 - 2^20, or 2^64 - 2^32 with ESN).
    """

    mode: str
    esn: bool
    soft_packets: int | None
    hard_packets: int | None
    soft_bytes: int | None
    hard_bytes: int | None
    soft_seconds: float | None
    hard_seconds: float | None
    soft_seq: int | None
    created: float


class _SecurityAssociation:
    """What outbound and inbound SAs share: identity, key, counters, lifetimes."""

    # What the per-packet methods read lives only in ``_fixed``, the SPI, ESN flag and
    # counters first in both directions (the properties below): a slot that copied
    # one would be 8 bytes per SA for nothing (10,000s of SAs on a responder).
    __slots__ = ("_fixed", "created", "key_bits", "lifetime", "mode", "soft_seq")
    _fixed: tuple[Any, ...]

    def __init__(
        self,
        spi: int,
        key: bytes,
        *,
        mode: str = "tunnel",
        esn: bool = False,
        soft_packets: int | None = None,
        hard_packets: int | None = None,
        soft_bytes: int | None = None,
        hard_bytes: int | None = None,
        soft_seconds: float | None = None,
        hard_seconds: float | None = None,
        soft_seq: int | None = None,
        created: float = 0.0,
    ) -> None:
        if not 0 < spi <= _M32:
            # RFC 4303 §2.1: SPI 0 is reserved for local use and never sent.
            raise ValueError(f"SPI must be 1..2^32-1, got {spi}")
        if mode not in MODES:
            raise ValueError(f"mode must be 'tunnel' or 'transport', got {mode!r}")
        self.key_bits = _key_bits(key)
        self.mode = mode
        if soft_seq is None:
            soft_seq = DEFAULT_SOFT_SEQ_64 if esn else DEFAULT_SOFT_SEQ_32
        self.soft_seq = soft_seq
        limits = (soft_packets, hard_packets, soft_bytes, hard_bytes, soft_seconds, hard_seconds)
        # Frozen, so SAs without limits (most) share one
        self.lifetime = _NO_LIMITS if limits == _NONE_6 else Lifetime(*limits)
        self.created = created
        # The subclass appends what its direction reads per packet
        self._fixed = (spi, bool(esn), SaCounters())

    @property
    def spi(self) -> int:
        spi: int = self._fixed[0]
        return spi

    @property
    def esn(self) -> bool:
        """64-bit extended sequence numbers (RFC 4303 §2.2.1)."""
        esn: bool = self._fixed[1]
        return esn

    @property
    def counters(self) -> SaCounters:
        counters: SaCounters = self._fixed[2]
        return counters

    @property
    def _last_seq(self) -> int:
        return _LAST_SEQ_64 if self.esn else _LAST_SEQ_32

    def _status(self, now: float, seq: int) -> LifetimeStatus:
        return self.lifetime.status(
            self.counters, now - self.created, seq, self.soft_seq, self._last_seq
        )

    def __repr__(self) -> str:
        # Never the key or salt (STYLE: secrets stay out of repr and logs).
        return (
            f"{type(self).__name__}(spi=0x{self.spi:08x}, mode={self.mode!r}, "
            f"esn={self.esn}, aes={self.key_bits})"
        )


class OutboundSA(_SecurityAssociation):
    """Sending side: :meth:`encapsulate` turns a payload into an ESP packet."""

    __slots__ = ("next_seq",)
    _fixed: tuple[int, bool, SaCounters, int, AESGCM, int, Callable[[int], int] | None]

    def __init__(
        self,
        spi: int,
        key: bytes,
        *,
        seq: int = 1,
        iv_source: Callable[[int], int] | None = None,
        **options: Unpack[SaOptions],
    ) -> None:
        """``seq`` is the next sequence number to send (RFC 4303 §3.3.3: starts at 1).

        ``iv_source(seq) -> int`` gives the 64-bit IV for a sequence number. Leave it
        ``None`` (the IV is the sequence number, RFC 4106 §3.1's counter): reusing an IV
        under one key breaks GCM completely. It exists so that known-answer vectors,
        whose IVs are unrelated to their sequence numbers, test this very code path.
        """
        super().__init__(spi, key, **options)
        if not 1 <= seq <= self._last_seq + 1:
            raise ValueError(f"next sequence number {seq} out of range")
        self.next_seq = seq
        aead, salt = _split_keymat(key)
        # What encapsulate reads per packet and never changes: one slot read and an
        # unpack are as fast as the closure cells this used to be (and no cells).
        self._fixed = (
            *self._fixed[:3],  # SPI, ESN, counters
            self._last_seq,
            aead,
            int.from_bytes(salt, "big"),
            iv_source,
        )

    def encapsulate(self, payload: bytes, next_header: int) -> bytes:
        """SPI ‖ Seq ‖ IV ‖ ciphertext ‖ ICV.

        Tunnel mode: ``payload`` is the inner IP packet, ``next_header`` 4 or 41.
        Transport mode: the upper-layer segment and its protocol number.
        Raises :class:`SequenceExhausted` once the last sequence number was used, and
        ``ValueError`` for a next header outside 0..255 (a caller bug, not a packet).
        """
        spi, esn, counters, last_seq, aead, salt, iv_source = self._fixed
        seq = self.next_seq
        if seq > last_seq:
            # RFC 4303 §3.3.3: the counter MUST NOT cycle; only a new SA may send.
            counters.count_drop("seq_exhausted")
            raise SequenceExhausted(f"SPI 0x{spi:08x}: sequence numbers exhausted")
        self.next_seq = seq + 1
        n = len(payload)
        try:
            trailer = _TRAILERS[next_header][(-2 - n) & 3]
        except KeyError:
            raise ValueError(f"next header must be 0..255, got {next_header!r}") from None
        # IV = the 64-bit sequence number, nonce = salt ‖ IV (RFC 4106 §3.1, §4)
        iv = seq if iv_source is None else iv_source(seq)
        if esn:
            header = _pack_header(spi, seq & _M32, iv)
            aad = _pack_aad_esn(spi, seq >> 32, seq & _M32)
        else:
            header = _pack_header(spi, seq, iv)
            aad = header[:8]
        sealed = aead.encrypt(_pack_nonce(salt, iv), payload + trailer, aad)
        counters.packets += 1
        counters.bytes += n
        return header + sealed

    def status(self, now: float) -> LifetimeStatus:
        """Soft/hard expiry by packets, bytes, seconds since ``created``, and sequence.

        Sequence: soft once the last sent number reaches ``soft_seq``; hard once the
        last possible number (2^32-1, or 2^64-1 with ESN) was sent.
        """
        return self._status(now, self.next_seq - 1)


class InboundSA(_SecurityAssociation):
    """Receiving side: :meth:`decapsulate` checks and opens an ESP packet."""

    __slots__ = ()
    _fixed: tuple[int, bool, SaCounters, ReplayWindow, AESGCM, bytes]

    def __init__(
        self, spi: int, key: bytes, *, replay_window: int = 128, **options: Unpack[SaOptions]
    ) -> None:
        """``replay_window``: anti-replay window size, 32..65536 packets."""
        super().__init__(spi, key, **options)
        window = ReplayWindow(replay_window, esn=self.esn)
        aead, salt = _split_keymat(key)
        # What decapsulate reads per packet and never changes (see OutboundSA): the
        # window object is fixed, its state is not
        self._fixed = (*self._fixed[:3], window, aead, salt)  # SPI, ESN, counters first

    @property
    def window(self) -> ReplayWindow:
        """The anti-replay window (RFC 4303 §3.4.3)."""
        return self._fixed[3]

    def status(self, now: float) -> LifetimeStatus:
        """Soft/hard expiry by packets, bytes, seconds and the highest sequence seen."""
        return self._status(now, self.window.top)

    def decapsulate(self, esp_packet: bytes) -> tuple[bytes, int]:
        """``(payload, next_header)`` or an :class:`EspError`.

        Nothing else escapes: whatever the bytes, the caller sees a payload or a typed
        error whose drop counter has already been bumped.
        """
        own_spi, esn, counters, window, aead, salt = self._fixed
        try:
            if len(esp_packet) < MIN_PACKET_LEN:
                raise TruncatedError(f"{len(esp_packet)} bytes")
            spi, seq_low, iv = _unpack_head(esp_packet)
            if spi != own_spi:
                raise UnknownSpiError(f"SPI 0x{spi:08x}")
            top = window.top
            # RFC 4303 §3.4.3: check the window before decrypting ...
            if esn:
                seq = window.check(seq_low)
                aad = _pack_aad_esn(spi, seq >> 32, seq_low)
            else:
                # right of the window (the usual case) needs no bitmap lookup
                seq = seq_low if seq_low > top else window.check(seq_low)
                aad = esp_packet[:8]
            try:
                plain = aead.decrypt(salt + iv, esp_packet[16:], aad)
            except InvalidTag:
                # With ESN this also covers a wrong guess of the high bits (A2.3).
                raise IntegrityError(f"seq {seq}") from None
            # ... and move it only for authentic packets. Authentic but malformed
            # packets (bad padding, dummies) still consume their sequence number.
            if seq == top + 1 and not window.missing:
                window.top = seq  # in order, no gaps: nothing to record
            else:
                window.accept(seq)
            pad_len = plain[-2]
            end = -2 - pad_len
            # RFC 4303 §2.4: the receiver SHOULD check the padding values (1, 2, ...).
            if pad_len and plain[end:-2] != _PADS[pad_len]:
                if pad_len > len(plain) - 2:
                    raise MalformedError(f"pad length {pad_len} exceeds the payload")
                raise PadError(f"seq {seq}")
            next_header = plain[-1]
            if next_header == NEXT_HEADER_DUMMY:
                raise DummyPacket(f"seq {seq}")
            payload = plain[:end]
            counters.packets += 1
            counters.bytes += len(payload)
            return payload, next_header
        except EspError as err:
            counters.count_drop(err.counter)
            raise
        except Exception as exc:  # anything else from hostile bytes becomes "malformed"
            counters.count_drop("malformed")
            raise MalformedError(f"{type(exc).__name__}: {exc}") from exc
