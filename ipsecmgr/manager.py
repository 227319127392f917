"""The IKE side of IpsecMgr: crypto maps, their IKE SAs and Child SAs.

The manager owns one :class:`MapState` per crypto map. It turns a PROTECT
verdict without a Child SA into an IKE initiation (reference step 4), drops or
queues that first packet (step 5), feeds IKE datagrams to the engine, and turns
the engine's events into ESP SAs installed in the data path and the SA-flow
table. It does no I/O itself: the daemon gives it a ``send`` function and a
clock, so the tests can drive it like the engines.

Its parts: :mod:`ipsecmgr.translate` (configuration → engine configuration),
:mod:`ipsecmgr.records` (per map, Child SA and liveness records),
:mod:`ipsecmgr.lifecycle` (the engine's events → ESP SAs), :mod:`ipsecmgr.periodic`
(liveness, volume rekeys, keepalives) and :mod:`ipsecmgr.show_rows` (``show``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import ike
import npusim
from ike import events as ev
from ike.timers import TimerHeap
from ipsecmgr import config as cfg
from ipsecmgr import failover, lifecycle, periodic, reload, show, show_rows
from ipsecmgr.invalid_spi import InvalidSpiHints
from ipsecmgr.records import Address, Liveness, MapState, MapStatus, SendFn
from ipsecmgr.sasink import SaSink, TraceHook, esp_peer
from ipsecmgr.trace import trace_ike_datagram, trace_ike_event
from ipsecmgr.translate import build_ike_config

log = logging.getLogger("ipsecmgr.ike")


class Manager:
    """Crypto maps → IKE SAs → ESP SAs in the data path."""

    def __init__(
        self,
        config: cfg.Config,
        acls: dict[str, npusim.Acl],
        datapath: SaSink,
        send: SendFn,
        *,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        """``jitter``: uniform in [0, 1), the source of the engine's rekey jitter,
        put into every IKE config (a constant in tests: rekeys at known times)."""
        self.config = config
        self._jitter = jitter
        # The data path, single or split (ipsecmgr.sasink): SA pairs, bindings, counters
        self.datapath = datapath
        self.send = send
        self.maps: dict[str, MapState] = {}
        for name, cmap in config.crypto_maps.items():
            acl = acls[cmap.match_address]
            self.maps[name] = MapState.build(cmap, build_ike_config(config, cmap, acl, jitter))
        # One log line per IKE message (exchange, payloads, size, peer), at -v. Without
        # -v the engine gets no hook and so builds no line (the level is set before the
        # daemon builds its manager and stays; logging.basicConfig in ipsecmgr.cli).
        self.endpoint = ike.IkeEndpoint(
            [c for m in self.maps.values() for c in m.peers.configs],
            log=(lambda line: log.info("%s", line)) if log.isEnabledFor(logging.INFO) else None,
            usage=self._usage,  # the engine asks what the data path counted (lifetimes)
        )
        # The daemon's Tracer while someone traces (steps 4, 5 and IKE events), else None.
        self.trace: TraceHook | None = None
        # Dead-peer detection per IKE SA name (a map can have a stale SA and a new one)
        self.liveness: dict[str, Liveness] = {}
        # Inbound SPIs of rekeyed Child SAs still in the SA-flow table, and until when
        self.lingering: dict[int, float] = {}
        # Failover, fail-fast answers and rate-limited noise (ipsecmgr.failover)
        self.failover = failover.Failover(self)
        # Set by ipsecmgr.metrics: observe(histogram, crypto map, seconds) for the
        # IKE handshake latency and the first-packet wait (queue mode).
        self.observe: Callable[[str, str, float], None] | None = None
        # INVALID_SPI (RFC 7296 §1.5): sent for ESP with unknown SPIs, hints received
        self.invalid_spi = InvalidSpiHints()
        # The periodic work by deadline: nothing is swept (see ike.timers). Each map's
        # looks: the earlier of its volume look and its IKE SAs' liveness looks, keyed
        # by the MapState (ipsecmgr.periodic.arm: one heap entry per peer and no key
        # tuple, instead of two of each: ~200 bytes per peer). The rarer work, keyed
        # by (kind, map name or SPI): NAT keepalives, lingering SPIs, silence checks.
        # Two heaps: keys due at the same time are compared, and a MapState and a
        # tuple do not compare.
        self.looks: TimerHeap[MapState] = TimerHeap()
        self.deadlines: TimerHeap[tuple[str, str | int]] = TimerHeap()
        # IKE SAs the engine looked at since the last pump: only their maps can
        # have a peer that moved (_follow_peers)
        self._changed: dict[ike.IkeSA, None] = {}
        self.endpoint.on_change = self._sa_changed

    def reconfigure(
        self, config: cfg.Config, acls: dict[str, npusim.Acl], keep: set[str], now: float
    ) -> None:
        """SIGHUP: maps in ``keep`` keep their SAs; the others are deleted
        (DELETE sent to the peer) and rebuilt from the new configuration. The
        work follows the changed maps, not all of them (ipsecmgr.reload)."""
        self.config = config
        self.maps, work = reload.rebuild_states(
            self.maps,
            config.crypto_maps,
            keep,
            lambda cmap: MapState.build(
                cmap, build_ike_config(config, cmap, acls[cmap.match_address], self._jitter)
            ),
        )
        for state in work.dropped:
            for sa in self._sas_of_map(state):
                sa.delete(now)
                work.sas_deleted += 1
            for rec in state.children:
                self._remove_child(state, rec.ike_name, rec.child_id)
                work.children_removed += 1
            self.datapath.unbind(state.cmap.name)
            self.looks.cancel(state)  # (keyed by the object: a rebuilt map has its own)
            log.info("crypto map %s: changed or removed by reload, SAs deleted", state.cmap.name)
        # Responders are matched against the new configs from now on; the IKE SAs
        # of kept maps keep the config object they were built with. Only the built
        # and dropped maps' configs are (un)indexed, and their PSK-derived keys dropped.
        added = [c for name in work.built for c in self.maps[name].peers.configs]
        removed = [c for state in work.dropped for c in state.peers.configs]
        if self.endpoint.update_configs(added, removed):
            # A new config shares its peer address with another map's: the first map
            # in the configuration answers, so the index follows the file's order
            # (rare: two maps for one peer)
            self.endpoint.configs = [c for m in self.maps.values() for c in m.peers.configs]
            work.index_rebuilt = True
        work.configs_indexed, work.configs_dropped = len(added), len(removed)
        # Every peer's hold-down ends, kept maps' too: SIGHUP is the operator's "try
        # again" (#15.5); only the maps with one are looked at
        work.hold_downs_ended = self.failover.end_hold_downs()
        self.last_reload = work
        self.pump(now)

    # -- steps 4 and 5 ------------------------------------------------------------

    def on_no_sa(self, name: str, packet: bytes, now: float) -> None:
        state = self.maps[name]
        tr = self.trace
        responder = state.cmap.role == "responder"
        if not responder and self.failover.held_down(state, packet, now):
            return  # every peer dead or held down: dropped (and answered), no IKE
        initiating = not responder and (state.ike_sa is None or state.ike_sa.dead)
        if tr is not None and initiating:
            chosen = state.peers.choose(now)  # the peer initiate() will take
            addr = chosen.address if chosen is not None else str(state.cmap.peer)
            tr("4", "ike_triggered", packet, crypto_map=name, peer=(addr, 0))
        if state.cmap.first_packet == "queue":
            if len(state.queue) < state.cmap.queue_size:
                if not state.queue:
                    state.queued_at = now
                state.queue.append(packet)
                state.bump("first_packet_queued")
                what = "first_packet_queued"
            else:
                state.bump("queue_overflow_drops")
                what = "queue_full_dropped"
        else:
            state.bump("first_packet_drops")
            what = "first_packet_dropped"
        if tr is not None:
            peer = state.cmap.peer
            why = f"responder: waiting for {peer}" if responder else f"IKE with {peer} not up"
            if name in self.invalid_spi.held:
                why = f"held while a liveness probe asks whether {peer} lost its SAs"
            tr("5", what, packet, crypto_map=name, reason=why)
        if what == "first_packet_dropped" and not responder and state.peers.failed_once():
            self.failover.answer(state, packet, now, "IKE already failed once")
        if responder:
            # A responder waits for its peer to build the tunnel (e.g. the
            # TACACS+ server side: replies only follow a client's request).
            state.bump("no_sa_waiting_for_peer")
        elif initiating or state.ike_sa is None:
            self.initiate(state, now)
        elif (
            state.ike_sa.established
            and not state.creating_child
            and not state.children_of(state.ike_sa.name)
        ):
            # "rekey lazy": the idle Child SA expired; the IKE SA lives on, so a
            # CREATE_CHILD_SA (§1.3) is enough to carry traffic again
            state.creating_child = True
            state.bump("child_created_on_demand")
            state.ike_sa.create_child(now)
            self.pump(now)

    def initiate(self, state: MapState, now: float) -> None:
        peer = state.peers.choose(now) or state.peers.peers[0]
        sa = self.endpoint.initiate(peer.config, now)
        state.peers.active = peer
        state.peers.bind(sa.name, peer)
        state.ike_sa = sa
        state.status = MapStatus.CONNECTING
        state.initiated_at = now
        state.bump("ike_initiated")
        log.info("crypto map %s: no SA, initiating IKE with %s", state.cmap.name, peer.address)
        self.pump(now)

    # -- IKE input -------------------------------------------------------------------

    def on_ike_datagram(self, data: bytes, local: Address, peer: Address, now: float) -> None:
        if self.trace is not None:  # before the engine: it may drop the SA (and its keys)
            trace_ike_datagram(self.trace, "received", data, peer, self.endpoint.sa_by_spis)
        self.endpoint.receive_datagram(data, peer, now, local)
        self.pump(now)

    def on_timer(self, now: float) -> None:
        self.endpoint.handle_timer(now)
        self.periodic(now)
        self.pump(now)

    def next_deadline(self) -> float | None:
        times = [
            t
            for t in (
                self.endpoint.get_timer(),
                self.looks.next(),
                self.deadlines.next(),
                self.failover.next_time(),
            )
            if t is not None
        ]
        return min(times) if times else None

    def _sas_of_map(self, state: MapState) -> list[ike.IkeSA]:
        """The live IKE SAs of a map, with each of its peers (ordered peers, #20):
        looked up per config in the engine's index, never by a scan of every SA."""
        return [sa for c in state.peers.configs for sa in self.endpoint.sas_of(c)]

    def pump(self, now: float) -> None:
        # Events first: a responder installs the Child SA before its IKE_AUTH answer
        # leaves, so the initiator's first ESP packet finds it (in split mode the
        # INBOUND worker is told over its socketpair before the answer is sent).
        while (event := self.endpoint.next_event()) is not None:
            self.on_event(event, now)
        self.failover.after_events(now)  # fail over to the next peer, preempt
        for data, peer, local in self.endpoint.datagrams_from(now):
            self.send(data, peer, local)
            if self.trace is not None:
                trace_ike_datagram(self.trace, "sent", data, peer, self.endpoint.sa_by_spis)
        if self.invalid_spi.held:  # a probe held a map's packets: answered?
            self.invalid_spi.release(self, now)
        self._follow_peers()

    def periodic(self, now: float) -> None:
        """Start what is due: liveness checks, volume looks, NAT keepalives
        (:func:`ipsecmgr.periodic.periodic`)."""
        periodic.periodic(self, now)

    def _usage(self, ike_name: str, child_id: int, now: float) -> ike.ChildUsage | None:
        """What the data path counted for a Child SA, when the engine asks
        (:func:`ipsecmgr.periodic.usage`)."""
        return periodic.usage(self, ike_name, child_id, now)

    def on_unknown_spi(
        self, spi: int, src: bytes, family: int, udp: Address | None, now: float
    ) -> bool:
        """ESP with an SPI we do not know (``Datapath.on_unknown_spi``): INVALID_SPI to
        its sender (RFC 7296 §1.5), rate-limited. True if one left."""
        return self.invalid_spi.on_unknown_spi(self, spi, src, family, udp, now)

    def on_esp_out(self, name: str, packet: bytes, now: float) -> None:
        """The first ESP on crypto map ``name`` after a quiet spell (``Datapath.on_esp_out``;
        ``packet``: what it carried): was it answered? (RFC 7296 §2.4, ipsecmgr.invalid_spi)"""
        self.invalid_spi.on_esp_out(self, name, packet, now)

    def on_inbound_counted(self, name: str, now: float) -> None:
        """Crypto map ``name``'s inbound counters are fresh (``SaSink.refresh_inbound``
        answered later: the split data path): did anything come back?"""
        self.invalid_spi.confirmed(self, name, now)

    def on_esp_from(self, name: str, peer: Address) -> None:
        """An authentic ESP-in-UDP packet of crypto map ``name`` came from ``peer``.

        RFC 7296 §2.23: a host that is not behind a NAT SHOULD move the SA to
        the address and port of a validated packet (the peer's NAT rebound).
        """
        state = self.maps.get(name)
        binding = self.datapath.binding(name)
        sa = state.ike_sa if state is not None else None
        if state is None or sa is None or binding is None or binding.peer == peer:
            return
        if binding.peer[1] == 0 or sa.nat_detected_local or not sa.established:
            return  # raw ESP, or we are the one behind the NAT: keep our mapping
        sa.peer_addr = peer  # IKE follows too (its next request goes there)
        self._changed[sa] = None
        self._follow_peers()

    def _sa_changed(self, sa: ike.IkeSA) -> None:
        self._changed[sa] = None

    def _follow_peers(self) -> None:
        """NAT rebinding (RFC 7296 §2.23): the engine follows the peer's address
        when an authenticated request arrives from a new one; ESP follows it.
        Only the maps of the IKE SAs that changed since the last look."""
        changed, self._changed = self._changed, {}
        for changed_sa in changed:
            state = self._state_for_name(changed_sa.name)
            if state is None or state.ike_sa is not changed_sa:
                continue
            name = state.cmap.name
            sa, binding = state.ike_sa, self.datapath.binding(name)
            if sa is None or binding is None or not sa.established:
                continue
            addr = esp_peer(sa.peer_addr, sa.nat_t)
            if addr != binding.peer:
                log.info(
                    "crypto map %s: peer moved from %s:%d to %s:%d, ESP follows",
                    name,
                    *binding.peer,
                    *addr,
                )
                state.bump("nat_rebinding")
                self.datapath.bind(name, binding.sa, sa.peer_addr, sa.nat_t)

    # -- events -----------------------------------------------------------------------

    def _state_for(self, event: ev.IkeEvent) -> MapState | None:
        return self._state_for_name(event.ike_sa)

    def _state_for_name(self, ike_name: str) -> MapState | None:
        # The engine names an IKE SA "<config name>-<SPIi hex>".
        return self.maps.get(ike_name.rsplit("-", 1)[0])

    def on_event(self, event: ev.IkeEvent, now: float) -> None:
        state = self._state_for(event)
        if state is None:
            log.warning("event for an IKE SA without a crypto map: %s", type(event).__name__)
            return
        if self.trace is not None:
            trace_ike_event(self.trace, event, state.cmap.name)
        # One handler per event class (the engine's events are final dataclasses:
        # the exact type decides); events without one (NatDetected) need nothing here.
        handler = lifecycle.EVENT_HANDLERS.get(type(event))
        if handler is not None:
            handler(self, state, event, now)

    def _remove_child(
        self, state: MapState, ike_name: str, child_id: int, linger: float | None = None
    ) -> None:
        lifecycle.remove_child(self, state, ike_name, child_id, linger)

    # -- commands ------------------------------------------------------------------

    def clear(self, now: float, peer: str | None = None) -> int:
        """``clear crypto sa``: DELETE every (or one peer's) IKE SA."""
        n = 0
        for state in self.maps.values():
            if peer is not None and peer not in (p.address for p in state.peers.peers):
                continue
            state.peers.reset()  # `clear crypto` ends every hold-down (#15.5)
            self.failover.hold_down_ended(state.peers)
            # Every IKE SA of the map, a stale one (no INITIAL_CONTACT) included
            for sa in self.endpoint.sas_of(state.ike_config):
                if sa.established:
                    sa.delete(now)
                    n += 1
        self.pump(now)
        return n

    def export_keys(self) -> dict[str, list[dict[str, str]]]:
        """Every live SA's keys, for Wireshark (``trace --wireshark-keys`` only)."""
        return show_rows.export_keys(self)

    # -- show -----------------------------------------------------------------------

    def ike_sa_states(self, now: float, wall: float) -> list[show.IkeSaState]:
        """The ``ike_sas`` part of a snapshot (:func:`ipsecmgr.show_rows.ike_sa_states`)."""
        return show_rows.ike_sa_states(self, now, wall)

    def child_sa_states(self, now: float, wall: float) -> list[show.ChildSaState]:
        return show_rows.child_sa_states(self, now, wall)

    def map_errors(self) -> dict[str, str]:
        return show_rows.map_errors(self)

    def map_status(self, now: float | None = None) -> dict[str, str]:
        return show_rows.map_status(self, now)

    def set_observer(self, observe: Callable[[str, str, float], None] | None) -> None:
        """``observe(histogram, crypto map, seconds)`` is told the IKE handshake
        latency and the first-packet wait (queue mode) from now on (ipsecmgr.metrics)."""
        self.observe = observe

    def map_names(self) -> set[str]:
        """The configured crypto maps (a reload may add or remove some)."""
        return set(self.maps)

    def set_trace(self, hook: TraceHook | None) -> None:
        """The Tracer while someone traces (``ipsecmgr trace``), None when none does."""
        self.trace = hook
