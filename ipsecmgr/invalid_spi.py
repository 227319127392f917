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
* **Only outgoing traffic.** A peer that sends no INVALID_SPI (strongSwan, a
  kernel's xfrm) gives no hint; RFC 7296 §2.4: "If there has only been
  outgoing traffic on all of the SAs associated with an IKE SA, it is
  essential to confirm liveness". At each dead-peer-detection sample
  (``dpd.interval / 10``, and :data:`SILENCE` after a sample that saw ESP go
  out) :meth:`InvalidSpiHints.sample` compares the Child SAs' packet
  counters: ESP went out and nothing (ESP or IKE) came back for
  :data:`SILENCE` seconds → the same probe (same hold-down).
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

import ike
from ike import events as ev

if TYPE_CHECKING:
    from ipsecmgr.manager import Manager
    from ipsecmgr.records import MapState

log = logging.getLogger("ipsecmgr.ike")

PROBE_TIMEOUT = 0.25  # s between the probe's resends (a LAN peer answers in ms)
PROBE_TRIES = 2  # resends after the first: no answer 0.75 s after the hint → dead
HOLD_DOWN = 5.0  # s after an answered probe during which hints for that IKE SA are ignored
# s: a peer found dead this soon after a probe started was found by the probe (which
# gives up PROBE_TIMEOUT × (PROBE_TRIES + 1) = 0.75 s after it started), with slack
PROBE_VERDICT = PROBE_TIMEOUT * (PROBE_TRIES + 1) + 1.0
SILENCE = 1.0  # s: ESP went out and nothing came back for at least this long → probe
# s: an authenticated INVALID_SPI for a Child SA younger than this is ignored: its ESP
# may have overtaken the peer's installation (split data path: over a socketpair)
INSTALL_GRACE = 1.0

Address = tuple[str, int]


class InvalidSpiHints:
    """The manager's fast liveness probes, per IKE SA (by name): after an INVALID_SPI
    hint, and after only outgoing ESP (:meth:`sample`)."""

    def __init__(self) -> None:
        # IKE SA name → when its probe started (kept while the SA lives, for HOLD_DOWN)
        self.probes: dict[str, float] = {}
        # IKE SA name → (packets out, packets in, last heard, when ESP went out
        # unanswered) at the previous dead-peer-detection sample
        self.traffic: dict[str, tuple[int, int, float, float | None]] = {}

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
            rec = state.children.get((event.ike_sa, event.child_id))
            if rec is not None and now - rec.installed_at < INSTALL_GRACE:
                state.bump("invalid_spi_ignored")
                return
            state.bump("invalid_spi_authenticated")
            log.warning("crypto map %s: peer does not know SPI %#010x (RFC 7296 §1.5), "
                        "deleting Child SA %d", name, event.spi, event.child_id)  # fmt: skip
            if sa is not None:
                sa.delete_child(event.child_id, now)
            return
        state.bump("invalid_spi_hints")
        if sa is None or not sa.established or not self._may_probe(sa, now):
            state.bump("invalid_spi_ignored")  # a probe is running, or just proved it
            return
        state.bump("invalid_spi_probes")
        log.warning(
            "crypto map %s: %s says it does not know SPI %#010x (unauthenticated hint, "
            "RFC 7296 §1.5): checking at once whether it restarted",
            name, state.cmap.peer, event.spi,
        )  # fmt: skip
        self._probe(sa, now)

    def _may_probe(self, sa: ike.IkeSA, now: float) -> bool:
        started = self.probes.get(sa.name)
        if started is None:
            return True
        answered = sa.last_heard is not None and sa.last_heard >= started
        return answered and now - started >= HOLD_DOWN

    def _probe(self, sa: ike.IkeSA, now: float) -> None:
        self.probes[sa.name] = now
        sa.probe(now, PROBE_TIMEOUT, PROBE_TRIES)

    def sample(
        self, mgr: Manager, state: MapState, sa: ike.IkeSA, packets_in: int, now: float
    ) -> float | None:
        """One dead-peer-detection sample of ``sa`` (RFC 7296 §2.4, only outgoing
        traffic): ``packets_in`` is what its Child SAs received so far. Returns when
        to look again, if sooner than the next sample: :data:`SILENCE` after ESP went
        out (the counters cannot tell whether it went before or after what came in)."""
        out = sum(rec.outbound.counters.packets for rec in state.children_of(sa.name))
        heard = sa.last_heard or 0.0
        # The first look compares with the SA's start (no packet, nothing heard)
        prev = self.traffic.get(sa.name) or (0, 0, 0.0, None)
        noticed = prev[3]
        again: float | None = None
        if packets_in != prev[1] or heard != prev[2]:
            noticed = None  # something came back
            if out != prev[0]:
                again = now + SILENCE  # and something went out: was it answered?
        elif noticed is None:
            if out != prev[0]:
                noticed, again = now, now + SILENCE
        elif now - noticed < SILENCE:
            again = noticed + SILENCE
        elif self._may_probe(sa, now):
            noticed = None
            state.bump("silence_probes")
            log.warning(
                "crypto map %s: ESP to %s unanswered for %.1f s (RFC 7296 §2.4: only "
                "outgoing traffic): checking at once whether it is alive",
                state.cmap.name, state.cmap.peer, now - (prev[3] or now),
            )  # fmt: skip
            self._probe(sa, now)
        self.traffic[sa.name] = (out, packets_in, heard, noticed)
        return again

    def on_ike_deleted(
        self, mgr: Manager, state: MapState, event: ev.IkeSaDeleted, now: float
    ) -> None:
        """A probed IKE SA went; if the probe found the peer dead, start again at once."""
        self.traffic.pop(event.ike_sa, None)
        started = self.probes.pop(event.ike_sa, None)
        if started is None or event.reason != "peer-dead" or now - started > PROBE_VERDICT:
            return  # not the probe's verdict (e.g. DPD's, long after an answered probe)
        state.bump("probe_peer_dead")
        log.warning(
            "crypto map %s: no answer %.2f s after the probe started: the peer lost "
            "its SAs; %s",
            state.cmap.name, now - started,
            "waiting for it (responder)" if state.cmap.role == "responder" else "re-establishing",
        )  # fmt: skip
        if state.cmap.role != "responder" and (state.ike_sa is None or state.ike_sa.dead):
            mgr.initiate(state, now)
