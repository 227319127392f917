"""Fast recovery after the far end restarts: INVALID_SPI (RFC 7296 §1.5, §3.10.1).

Without it, when the peer gateway restarts and only our side sends, we keep
encrypting into SAs the peer no longer has until dead-peer detection gives
up (30 s + 3 × 10 s with the reference's timers). Both halves live here:

* **Sending.** ESP whose SPI is not in the SA-flow table (``Datapath.
  on_unknown_spi``) → :meth:`ike.IkeEndpoint.send_invalid_spi`: unprotected
  outside any IKE SA (the restarted side has none), inside the IKE SA with
  that address if there is one; at most one per source address per second
  (§2.21.4).
* **Receiving.** The engine turns an unprotected INVALID_SPI for an SPI we
  send on into ``InvalidSpiReceived(authenticated=False)``. Anyone on the path
  can forge it, so it is only a hint (§1.5): :class:`InvalidSpiHints` starts
  a liveness check on that IKE SA at once (``IkeSA.probe``: resent every
  :data:`PROBE_TIMEOUT`, :data:`PROBE_TRIES` times; dead
  ``PROBE_TIMEOUT × (PROBE_TRIES + 1)`` = 0.75 s after the hint) and, if the
  peer does not answer, the engine declares it dead and we initiate a new IKE
  SA at once (an initiator map). A live peer answers: the SA stays, and
  further hints for that IKE SA are ignored for :data:`HOLD_DOWN` seconds, so
  forged hints cost at most one liveness exchange per IKE SA per HOLD_DOWN,
  never a teardown. An authenticated INVALID_SPI (inside the IKE SA, from the
  peer itself) deletes the Child SA it names; the next packet creates another.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from ike import events as ev

if TYPE_CHECKING:
    from ipsecmgr.manager import Manager, MapState

log = logging.getLogger("ipsecmgr.ike")

PROBE_TIMEOUT = 0.25  # s between the probe's resends (a LAN peer answers in ms)
PROBE_TRIES = 2  # resends after the first: no answer 0.75 s after the hint → dead
HOLD_DOWN = 5.0  # s after an answered probe during which hints for that IKE SA are ignored

Address = tuple[str, int]


class InvalidSpiHints:
    """The manager's reaction to INVALID_SPI, per IKE SA (by name)."""

    def __init__(self) -> None:
        # IKE SA name → when its probe started (kept while the SA lives, for HOLD_DOWN)
        self.probes: dict[str, float] = {}

    def on_unknown_spi(
        self, mgr: Manager, spi: int, src: bytes, family: int, udp: Address | None, now: float
    ) -> bool:
        """ESP with an unknown SPI from ``src`` (packed; ``udp``: its UDP source if it
        was ESP-in-UDP). True if an INVALID_SPI left (the caller re-arms timers)."""
        ip = socket.inet_ntop(family, src)
        peer = udp if udp is not None else (ip, mgr.config.gateway.ike_port)
        if not mgr.endpoint.send_invalid_spi(spi, peer, now, nat_t=udp is not None):
            return False
        mgr.pump(now)
        return True

    def on_hint(
        self, mgr: Manager, state: MapState, event: ev.InvalidSpiReceived, now: float
    ) -> None:
        sa = mgr.endpoint.find_sa(event.ike_sa)
        name = state.cmap.name
        if event.authenticated:
            # The peer itself, inside the IKE SA: it really has no such SA
            state.bump("invalid_spi_authenticated")
            log.warning("crypto map %s: peer does not know SPI %#010x (RFC 7296 §1.5), "
                        "deleting Child SA %d", name, event.spi, event.child_id)  # fmt: skip
            if sa is not None:
                sa.delete_child(event.child_id, now)
            return
        state.bump("invalid_spi_hints")
        if sa is None or not sa.established:
            state.bump("invalid_spi_ignored")
            return
        started = self.probes.get(sa.name)
        if started is not None:
            answered = sa.last_heard is not None and sa.last_heard >= started
            if not answered or now - started < HOLD_DOWN:
                state.bump("invalid_spi_ignored")  # a probe is running, or just proved it
                return
        self.probes[sa.name] = now
        state.bump("invalid_spi_probes")
        log.warning(
            "crypto map %s: %s says it does not know SPI %#010x (unauthenticated hint, "
            "RFC 7296 §1.5): checking at once whether it restarted",
            name, state.cmap.peer, event.spi,
        )  # fmt: skip
        sa.probe(now, PROBE_TIMEOUT, PROBE_TRIES)

    def on_ike_deleted(
        self, mgr: Manager, state: MapState, event: ev.IkeSaDeleted, now: float
    ) -> None:
        """A probed IKE SA went; if the probe found the peer dead, start again at once."""
        started = self.probes.pop(event.ike_sa, None)
        if started is None or event.reason != "peer-dead":
            return
        state.bump("invalid_spi_peer_restarted")
        log.warning(
            "crypto map %s: no answer %.2f s after the INVALID_SPI hint: the peer lost "
            "its SAs; %s",
            state.cmap.name, now - started,
            "waiting for it (responder)" if state.cmap.role == "responder" else "re-establishing",
        )  # fmt: skip
        if state.cmap.role != "responder" and (state.ike_sa is None or state.ike_sa.dead):
            mgr.initiate(state, now)
