"""ESP (RFC 4303) with AES-GCM-16 (RFC 4106): a pure data-path library.

No sockets, no clocks, no threads: bytes and ``now`` in, bytes and typed errors out.

Sending::

    sa = esp.OutboundSA(spi, keymat, mode="tunnel", esn=False)   # keymat: key ‖ 4-byte salt
    packet = sa.encapsulate(inner_ip_packet, next_header=4)      # SPI ... ICV, no outer IP

Receiving::

    sa = esp.InboundSA(spi, keymat, mode="tunnel", esn=False, replay_window=128)
    try:
        payload, next_header = sa.decapsulate(packet)
    except esp.EspError as err:      # err.counter names the drop counter already bumped
        ...

* ``keymat`` is what IKEv2 derives for ENCR_AES_GCM_16: a 16- or 32-byte AES key followed
  by the 4-byte salt (20 or 36 bytes); anything else raises ``ValueError``.
* Outbound IV = the 64-bit sequence number; sequence numbers start at 1 and never cycle:
  after 2^32-1 (2^64-1 with ESN) ``encapsulate`` raises :class:`SequenceExhausted`.
* Inbound: anti-replay window (32..65536, default 128) checked before decryption and
  moved only after the ICV verified; ESN high bits inferred per RFC 4303 Appendix A2.2.
  Padding bytes are verified; Next Header 59 raises :class:`DummyPacket`.
* ``decapsulate`` raises nothing but :class:`EspError` subclasses: :class:`TruncatedError`
  and :class:`PadError` (both :class:`MalformedError`), :class:`UnknownSpiError`,
  :class:`ReplayError`, :class:`IntegrityError`, :class:`DummyPacket`.
* ``sa.counters`` (:class:`SaCounters`): ``packets``, ``bytes`` (payload bytes) and
  ``drops[reason]``. ``sa.status(now)`` -> :class:`LifetimeStatus` with ``soft_expired``
  / ``hard_expired`` and the reasons (``packets``, ``bytes``, ``seconds``, ``seq``).
  Limits are reported, not enforced (except the sequence number); the daemon rekeys.
* :mod:`esp.udp_encap`: RFC 3948 port-4500 demux (``classify_udp4500``, ``decode``),
  non-ESP marker framing and the 0xFF NAT-keepalive.
"""

from .counters import DROP_REASONS, Lifetime, LifetimeStatus, SaCounters
from .errors import (
    DummyPacket,
    EspError,
    IntegrityError,
    MalformedError,
    PadError,
    ReplayError,
    SequenceExhausted,
    TruncatedError,
    UnknownSpiError,
)
from .replay import ReplayWindow
from .sa import (
    ICV_LEN,
    IV_LEN,
    MIN_PACKET_LEN,
    NEXT_HEADER_DUMMY,
    InboundSA,
    OutboundSA,
    SaOptions,
)

__all__ = [
    "DROP_REASONS",
    "ICV_LEN",
    "IV_LEN",
    "MIN_PACKET_LEN",
    "NEXT_HEADER_DUMMY",
    "DummyPacket",
    "EspError",
    "InboundSA",
    "IntegrityError",
    "Lifetime",
    "LifetimeStatus",
    "MalformedError",
    "OutboundSA",
    "PadError",
    "ReplayError",
    "ReplayWindow",
    "SaCounters",
    "SaOptions",
    "SequenceExhausted",
    "TruncatedError",
    "UnknownSpiError",
]
