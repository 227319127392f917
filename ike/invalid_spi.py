"""INVALID_SPI for ESP that arrives with an SPI we do not know (RFC 7296 §1.5, §3.10.1).

Sender side: a gateway that lost its SAs (it restarted) still receives the
peer's ESP. With no IKE SA towards that address it tells the sender in one
message *outside* any IKE SA (§1.5)::

    HDR(SPIi random, SPIr 0, INFORMATIONAL, I=1 R=0, msg 0), N(INVALID_SPI, data=SPI)

unprotected, to the ESP packet's source address (UDP 500, or the source port
of UDP-encapsulated ESP, with the non-ESP marker). It is not part of an
exchange: the receiver MUST NOT answer it (§1.5: that could loop). §2.21.4:
answers to unprotected messages are rate-limited, here at most one per
source address per second and :data:`GLOBAL_PER_SECOND` in all (spoofed
sources).

Receiver side: anyone on the path can forge such a message, so it is only a
hint (§1.5) for an SPI we send on: the endpoint turns it into an
:class:`ike.events.InvalidSpiReceived` event, never a teardown; the daemon
answers with a liveness check on a short schedule (``IkeSA.probe``).
"""

from __future__ import annotations

from collections.abc import Callable

from .buffer import DecodeError
from .constants import ExchangeType, HeaderFlag, NotifyType, PayloadType
from .payloads import NotifyPayload, build_plain_message, notifies, parse_message

ZERO_SPI = b"\x00" * 8
SOURCE_INTERVAL = 1.0  # s: at most one INVALID_SPI per source address in this time
GLOBAL_PER_SECOND = 100  # in all, whatever the sources (they may be forged)
_MAX_SOURCES = 4096  # remembered sources before the stale ones are dropped


def build_invalid_spi(spi: int, rng: Callable[[int], bytes]) -> bytes:
    """The unprotected one-way INVALID_SPI message of §1.5 for ESP SPI ``spi``.

    §1.5: no IKE SPI means anything to the recipient, "zero values or random
    values are both acceptable"; the Initiator flag is set, the Response flag
    not. §3.10: INVALID_SPI carries no SPI field (protocol 0, size 0); the
    Notification Data is the SPI of the wayward packet.
    """
    spi_i = rng(8)
    if spi_i == ZERO_SPI:
        spi_i = b"\x00" * 7 + b"\x01"
    return build_plain_message(
        spi_i,
        ZERO_SPI,
        ExchangeType.INFORMATIONAL,
        HeaderFlag.INITIATOR,
        0,
        [NotifyPayload(NotifyType.INVALID_SPI, spi.to_bytes(4, "big"))],
    )


def unprotected_invalid_spis(body: bytes) -> list[int] | None:
    """The SPIs of an unprotected INFORMATIONAL request's INVALID_SPI notifies.

    None when ``body`` (an IKE message without the non-ESP marker) is not such
    a message: a response, another exchange, or an SK payload (protected).
    """
    try:
        hdr, payloads, sk = parse_message(body)
    except DecodeError:
        return None
    if hdr.exchange != ExchangeType.INFORMATIONAL or hdr.is_response or sk is not None:
        return None
    return [
        int.from_bytes(n.data, "big")
        for n in notifies(payloads)
        if n.notify_type == NotifyType.INVALID_SPI and len(n.data) == 4
    ]


def is_unprotected_request(first_payload: int, exchange: int, flags: int) -> bool:
    """From the header alone: an INFORMATIONAL request whose first payload is not SK."""
    return (
        exchange == ExchangeType.INFORMATIONAL
        and not flags & HeaderFlag.RESPONSE
        and first_payload != PayloadType.SK
    )


class SourceLimit:
    """§2.21.4: at most one message per source per ``interval``, ``per_second`` in all.

    Memory is bounded: past ``max_sources`` remembered sources, those older
    than ``interval`` are dropped (at most ``per_second`` are younger), so each
    call costs O(1) amortised.
    """

    def __init__(
        self,
        interval: float = SOURCE_INTERVAL,
        per_second: int = GLOBAL_PER_SECOND,
        max_sources: int = _MAX_SOURCES,
    ) -> None:
        self.interval = interval
        self.per_second = per_second
        self.max_sources = max(max_sources, per_second * 2)
        self._last: dict[str, float] = {}
        self._window = float("-inf")
        self._in_window = 0

    def allow(self, source: str, now: float) -> bool:
        last = self._last.get(source)
        if last is not None and now - last < self.interval:
            return False
        if now - self._window >= 1.0:
            self._window, self._in_window = now, 0
        if self._in_window >= self.per_second:
            return False
        self._in_window += 1
        if len(self._last) >= self.max_sources:
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval}
        self._last[source] = now
        return True
