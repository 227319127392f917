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
  essential to confirm liveness". Event-driven, per crypto map: the data path
  reports the first ESP sent on a watched outbound binding
  (``OutboundBinding.watch``: one compare per packet; the flag is then off),
  :meth:`InvalidSpiHints.on_esp_out` arms a deadline :data:`SILENCE` later in
  the manager's timer heap (O(log n), only while traffic flows, nothing is
  swept), and :meth:`InvalidSpiHints.silence_due` compares the Child SAs'
  counters with those at that moment: nothing (ESP or IKE) came back → the
  same probe (same hold-down); something did → the watch is on again, and the
  next ESP arms the next deadline. A bare TCP ACK expects no answer
  (:func:`answer_expected`): it only turns the watch off for SILENCE. In the
  split data path the inbound counters are the INBOUND worker's: a "nothing
  came back" is confirmed with a fresh count of that map's inbound SAs first
  (``SaSink.refresh_inbound``).
* **Hold while probing.** With ``first_packet = "queue"`` the map's outbound
  binding is taken out of the data path while a probe runs: packets wait in
  the map's bounded queue (``Manager.on_no_sa``) instead of going into an SA
  the peer may have lost. An answer puts the binding back and sends them
  (:meth:`InvalidSpiHints.release`); a dead peer's new Child SA sends them.
  :data:`SILENCE` + the probe (0.5 + 0.75 s) puts the new SA before the
  client's second SYN retransmission (RFC 6298 §2.1, §5.5: 1 s, then 3 s
  after the first SYN), and the first retransmission is the held packet.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

import ike
from ike import events as ev
from ipsecmgr.packets import ip_header_length

if TYPE_CHECKING:
    from ipsecmgr.manager import Manager
    from ipsecmgr.packets import OutboundBinding
    from ipsecmgr.records import MapState

log = logging.getLogger("ipsecmgr.ike")

PROBE_TIMEOUT = 0.25  # s between the probe's resends (a LAN peer answers in ms)
PROBE_TRIES = 2  # resends after the first: no answer 0.75 s after the hint → dead
HOLD_DOWN = 5.0  # s after an answered probe during which hints for that IKE SA are ignored
# s: a peer found dead this soon after a probe started was found by the probe (which
# gives up PROBE_TIMEOUT × (PROBE_TRIES + 1) = 0.75 s after it started), with slack
PROBE_VERDICT = PROBE_TIMEOUT * (PROBE_TRIES + 1) + 1.0
# s: ESP went out and nothing came back for this long → probe. Below TCP's initial
# retransmission timeout (1 s, RFC 6298 §2.1), so that the probe runs when the client
# retransmits its SYN and that retransmission is held, not lost (see above).
SILENCE = 0.5
# s: an authenticated INVALID_SPI for a Child SA younger than this is ignored: its ESP
# may have overtaken the peer's installation (split data path: over a socketpair)
INSTALL_GRACE = 1.0

Address = tuple[str, int]


def answer_expected(packet: bytes) -> bool:
    """Whether the peer's side answers ``packet``: not a bare TCP ACK (no SYN, FIN or
    data: it occupies no sequence space, so nothing acknowledges it, RFC 9293 §3.4),
    nor an RST (§3.5.2). A connection's last segment is such an ACK; without this
    every TACACS+ transaction would end in a probe."""
    if len(packet) < 20:
        return True
    hlen, proto = ip_header_length(packet)
    # the IP total length (IPv6: the fixed header + its payload length)
    v4 = packet[0] >> 4 == 4
    total = int.from_bytes(packet[2:4]) if v4 else 40 + int.from_bytes(packet[4:6])
    if proto != 6 or len(packet) < hlen + 14:
        return True  # UDP, ICMP, ...: assume a request
    flags = packet[hlen + 13]
    if flags & 0x04:  # RST
        return False
    return bool(flags & 0x03) or total > hlen + (packet[hlen + 12] >> 4) * 4  # SYN/FIN, data


class InvalidSpiHints:
    """The manager's fast liveness probes, per IKE SA (by name): after an INVALID_SPI
    hint, and after only outgoing ESP (:meth:`on_esp_out`, :meth:`silence_due`)."""

    def __init__(self) -> None:
        # IKE SA name → when its probe started (kept while the SA lives, for HOLD_DOWN)
        self.probes: dict[str, float] = {}
        # crypto map name → (IKE SA name, when, packets in, last heard) at the first
        # ESP sent after a quiet spell; its deadline is ("silence", map name)
        self.armed: dict[str, tuple[str, float, int, float]] = {}
        # crypto map name → (IKE SA name, the binding taken out) while a probe holds
        self.held: dict[str, tuple[str, OutboundBinding]] = {}

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
            rec = state.child(event.ike_sa, event.child_id)
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
        self._probe(sa, now, mgr, state)

    def _may_probe(self, sa: ike.IkeSA, now: float) -> bool:
        started = self.probes.get(sa.name)
        if started is None:
            return True
        answered = sa.last_heard is not None and sa.last_heard >= started
        return answered and now - started >= HOLD_DOWN

    def _probe(self, sa: ike.IkeSA, now: float, mgr: Manager, state: MapState) -> None:
        self.probes[sa.name] = now
        sa.probe(now, PROBE_TIMEOUT, PROBE_TRIES)
        self._hold(mgr, state, sa)

    # -- only outgoing traffic (RFC 7296 §2.4), event-driven --------------------------

    def _counts(self, mgr: Manager, state: MapState, sa: ike.IkeSA) -> tuple[int, float]:
        """What came back so far: ESP packets on ``sa``'s Child SAs, the last IKE heard."""
        inb = sum(rec.inbound.counters.packets for rec in state.children_of(sa.name))
        return inb, sa.last_heard or 0.0

    def on_esp_out(self, mgr: Manager, name: str, packet: bytes, now: float) -> None:
        """The data path sent ESP carrying ``packet`` on crypto map ``name``'s watched
        binding (its watch is off now): the answer is due within :data:`SILENCE`."""
        state = mgr.maps.get(name)
        if state is None or state.cmap.dpd.interval <= 0 or name in self.armed:
            return  # dead-peer detection off: stay off; armed: its deadline re-enables
        sa = state.ike_sa
        if sa is not None and sa.established and answer_expected(packet):
            self.armed[name] = (sa.name, now, *self._counts(mgr, state, sa))
            state.bump("silence_armed")
        # else (nothing answers it, or no IKE SA up to check): the deadline only turns
        # the watch on again, so a stream of bare ACKs costs one look per SILENCE
        mgr.deadlines.set(("silence", name), now + SILENCE)

    def silence_due(self, mgr: Manager, name: str, now: float, confirmed: bool = False) -> None:
        """:data:`SILENCE` after ESP went out on ``name``: did anything come back?"""
        armed = self.armed.pop(name, None)
        state = mgr.maps.get(name)
        sa = mgr.endpoint.find_sa(armed[0]) if armed is not None else None
        if armed is None or state is None or sa is None or not sa.established:
            if state is not None:
                mgr.datapath.watch_outbound(name)  # (a new IKE SA: watch its traffic)
            return
        _, since, in0, heard0 = armed
        if self._counts(mgr, state, sa) != (in0, heard0):
            # Something came back: watch for the next ESP. (Not re-armed at once for
            # what went out meanwhile: counters cannot tell whether it left before or
            # after the answer, and a connection's last ACK would look unanswered.)
            mgr.datapath.watch_outbound(name)
            return
        spis = [rec.inbound.spi for rec in state.children]
        if not confirmed and not mgr.datapath.refresh_inbound(name, spis):
            # Split data path: these inbound counters were up to a second old; the
            # fresh ones come with Manager.on_inbound_counted (then confirmed)
            self.armed[name] = armed
            return
        mgr.datapath.watch_outbound(name)
        if not self._may_probe(sa, now):
            return  # a probe runs, or one was answered less than HOLD_DOWN ago
        state.bump("silence_probes")
        log.warning(
            "crypto map %s: ESP to %s unanswered for %.2f s (RFC 7296 §2.4: only "
            "outgoing traffic): checking at once whether it is alive",
            state.cmap.name, state.cmap.peer, now - since,
        )  # fmt: skip
        self._probe(sa, now, mgr, state)

    def confirmed(self, mgr: Manager, name: str, now: float) -> None:
        """``SaSink.refresh_inbound``'s later answer: ``name``'s inbound counters are
        fresh now."""
        self.silence_due(mgr, name, now, confirmed=True)
        mgr.pump(now)  # the probe's request, if one started

    # -- hold while probing --------------------------------------------------------------

    def _hold(self, mgr: Manager, state: MapState, sa: ike.IkeSA) -> None:
        """``first_packet = "queue"``: the map's packets wait for the probe's verdict in
        its bounded queue instead of going into an SA the peer may have lost."""
        name = state.cmap.name
        binding = mgr.datapath.binding(name)
        if state.cmap.first_packet != "queue" or binding is None or name in self.held:
            return
        if state.ike_sa is not sa or not any(
            rec.outbound is binding.sa for rec in state.children_of(sa.name)
        ):
            return  # the probed IKE SA does not carry the map's traffic
        mgr.datapath.unbind(name)
        self.held[name] = (sa.name, binding)
        state.bump("probe_holds")

    def release(self, mgr: Manager, now: float) -> None:
        """After IKE input: a held map whose probe was answered sends again, the held
        packets first (the peer is alive; its SA stays)."""
        for name, (ike_name, binding) in list(self.held.items()):
            state = mgr.maps.get(name)
            sa = mgr.endpoint.find_sa(ike_name)
            started = self.probes.get(ike_name)
            if state is None or sa is None or not sa.established or started is None:
                del self.held[name]  # gone: the next Child SA sends the queue
                continue
            if sa.last_heard is None or sa.last_heard < started:
                continue  # not answered yet
            del self.held[name]
            if mgr.datapath.binding(name) is not None or not any(
                rec.outbound is binding.sa for rec in state.children
            ):
                continue  # a newer Child SA took over (and sent the queue)
            # The same SA, socket and peer again (raw ESP: port 0; UDP 4500 otherwise)
            mgr.datapath.bind(name, binding.sa, binding.peer, binding.peer[1] != 0)
            state.bump("probe_released")
            while state.queue:
                mgr.datapath.send(name, state.queue.popleft())
                state.bump("queued_sent")

    def on_ike_deleted(
        self, mgr: Manager, state: MapState, event: ev.IkeSaDeleted, now: float
    ) -> None:
        """A probed IKE SA went; if the probe found the peer dead, start again at once."""
        started = self.probes.pop(event.ike_sa, None)
        held = self.held.get(state.cmap.name)
        if held is not None and held[0] == event.ike_sa:
            del self.held[state.cmap.name]  # its Child SAs went: the next one sends the queue
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
