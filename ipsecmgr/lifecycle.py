"""SA lifecycle: the IKE engine's events turned into ESP SAs in the data path.

One handler per event class (:data:`EVENT_HANDLERS`, dispatched by
:meth:`Manager.on_event`): IKE SA up, rekeyed, deleted, dead peer, refusals;
Child SA installed (ESP SAs in the SA-flow table and the outbound binding),
rekeyed and deleted (make-before-break, RFC 7296 §2.8); the engine's lifetime
decisions (``LifetimeExpired``) as log lines and counters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import esp
import ike
from ike import events as ev
from ike.state import State
from ipsecmgr.peers import DEAD, HOLD_DOWN_NOTIFIES
from ipsecmgr.periodic import DPD_SAMPLES, schedule
from ipsecmgr.records import Address, ChildRecord, Liveness, MapState, MapStatus
from ipsecmgr.sasink import SaPair
from ipsecmgr.translate import npu_selectors

if TYPE_CHECKING:
    from ipsecmgr.manager import Manager

log = logging.getLogger("ipsecmgr.ike")

# A rekeyed-away inbound SA still decrypts this long after its DELETE: ESP the peer
# sent on it before it saw the DELETE may be read after the IKE answer (another socket).
REKEY_LINGER = 1.0
# A responder's IKE SA before IKE_AUTH: the peer has not proved who it is (§2.4, §2.6)
_UNAUTHENTICATED = (State.NEW, State.INIT_DONE)


# RFC 7296 §3.10.1 error notifies in plain words, as seen from the side that
# received them ("the peer ..."); a notify we sent reads "we ..." instead.
_NOTIFY_MEANING = {
    "NO_PROPOSAL_CHOSEN": "{who} accepted none of the offered algorithms (or could not use them)",
    "TS_UNACCEPTABLE": "{who} refused the traffic selectors (which addresses the tunnel carries)",
    "AUTHENTICATION_FAILED": "{who} rejected the identity or the pre-shared key",
    "INVALID_KE_PAYLOAD": "{who} wants another Diffie-Hellman group",
    "INVALID_SYNTAX": "{who} could not parse the message",
    "SINGLE_PAIR_REQUIRED": "{who} wants exactly one pair of traffic selectors",
    "NO_ADDITIONAL_SAS": "{who} accepts no more Child SAs on this IKE SA",
    "INTERNAL_ADDRESS_FAILURE": "{who} could not assign an internal address",
    "FAILED_CP_REQUIRED": "{who} requires a configuration payload",
    "TEMPORARY_FAILURE": "{who} is busy (e.g. a rekey in progress); retry later",
    "CHILD_SA_NOT_FOUND": "{who} does not know the Child SA to rekey",
    "INVALID_SPI": "{who} does not know the SPI",
    "UNSUPPORTED_CRITICAL_PAYLOAD": "{who} does not support a payload marked critical",
    "INVALID_MAJOR_VERSION": "{who} does not speak IKEv2",
}


def notify_meaning(notify: str, by_peer: bool) -> str:
    """What an error NOTIFY means, in words, for the log line that reports it."""
    who = "the peer" if by_peer else "we"
    text = _NOTIFY_MEANING.get(notify, "{who} reported an error")
    return text.format(who=who)


def _on_ike_established(
    mgr: Manager, state: MapState, event: ev.IkeSaEstablished, now: float
) -> None:
    mgr.failover.established(state, event.ike_sa, now)
    state.ike_sa = mgr.endpoint.find_sa(event.ike_sa)
    state.status = MapStatus.ESTABLISHED
    state.last_error = ""
    state.established_at = now
    state.bump("ike_established")
    if mgr.observe is not None and state.initiated_at is not None:
        mgr.observe("ike_handshake", state.cmap.name, now - state.initiated_at)
    state.initiated_at = None
    if (sa := state.ike_sa) is not None and (interval := state.cmap.dpd.interval) > 0:
        mgr.liveness[sa.name] = Liveness(now, now + interval / DPD_SAMPLES)
    schedule(mgr, state, now)
    log.info(
        "crypto map %s: IKE SA up with %s (%s)",
        state.cmap.name,
        state.ike_sa.peer_addr[0] if state.ike_sa else state.cmap.peer,
        event.algorithms,
    )


def _on_ike_rekeyed(mgr: Manager, state: MapState, event: ev.IkeSaRekeyed, now: float) -> None:
    state.bump("ike_rekeyed")
    if state.ike_sa is not None:
        schedule(mgr, state, now)
    log.info(
        "crypto map %s: IKE SA rekeyed, SPIs %s/%s",
        state.cmap.name,
        event.spi_i.hex(),
        event.spi_r.hex(),
    )


def _on_child_rekeyed(mgr: Manager, state: MapState, event: ev.ChildSaRekeyed, now: float) -> None:
    state.bump("child_rekeyed")
    log.info(
        "crypto map %s: Child SA %d rekeyed as %d",
        state.cmap.name,
        event.old_child_id,
        event.new_child_id,
    )


def _on_child_deleted(mgr: Manager, state: MapState, event: ev.ChildSaDeleted, now: float) -> None:
    linger = now + REKEY_LINGER if event.reason == "rekeyed" else None
    remove_child(mgr, state, event.ike_sa, event.child_id, linger)
    log.info(
        "crypto map %s: Child SA %d deleted (%s)", state.cmap.name, event.child_id, event.reason
    )


def _on_ike_deleted(mgr: Manager, state: MapState, event: ev.IkeSaDeleted, now: float) -> None:
    mgr.liveness.pop(event.ike_sa, None)  # (the map's deadline skips it: periodic.arm)
    mgr.failover.deleted(state, event.ike_sa, event.reason, now)
    for rec in state.children_of(event.ike_sa):
        remove_child(mgr, state, rec.ike_name, rec.child_id)
    if state.ike_sa is None or state.ike_sa.name == event.ike_sa:
        if state.status != MapStatus.FAILED:
            state.status = MapStatus.DEAD if event.reason == "peer-dead" else MapStatus.IDLE
        state.ike_sa = None
        state.creating_child = False
    log.info("crypto map %s: IKE SA deleted (%s)", state.cmap.name, event.reason)
    mgr.invalid_spi.on_ike_deleted(mgr, state, event, now)


def _on_peer_dead(mgr: Manager, state: MapState, event: ev.PeerDead, now: float) -> None:
    state.bump("peer_dead")
    if state.status == MapStatus.CONNECTING:  # no answer to our IKE_SA_INIT / IKE_AUTH
        state.bump("handshake_timeouts")
    if state.ike_sa is None or state.ike_sa.name == event.ike_sa:
        state.status = MapStatus.DEAD  # not for a stale SA a newer one replaced
    peer = mgr.failover.failed(state, event.ike_sa, DEAD, now)
    log.warning("crypto map %s: peer %s is dead", state.cmap.name, peer or state.cmap.peer)


def _on_auth_failed(
    mgr: Manager, state: MapState, event: ev.AuthenticationFailed, now: float
) -> None:
    if mgr.failover.unauthenticated_noise(state, event, "AUTHENTICATION_FAILED", now):
        return  # #15.4: rate-limited, never the Last Error of a map that is up
    mgr.failover.failed(state, event.ike_sa, "AUTHENTICATION_FAILED", now)
    if state.ike_sa is None or state.ike_sa.name == event.ike_sa:
        state.status = MapStatus.FAILED  # not for a preemption probe while the backup is up
    state.last_error = f"AUTHENTICATION_FAILED: {event.detail}"
    state.bump("auth_failed")
    log.error(
        "crypto map %s: authentication failed: %s (%s)",
        state.cmap.name,
        event.detail,
        "the identity or the pre-shared key did not match",
    )


def _on_exchange_failed(
    mgr: Manager, state: MapState, event: ev.ExchangeFailed, now: float
) -> None:
    if event.exchange == "CREATE_CHILD_SA":
        state.creating_child = False  # the next packet may try again
    if mgr.failover.unauthenticated_noise(state, event, event.notify, now):
        return  # #15.4: rate-limited, never the Last Error of a map that is up
    if event.notify in HOLD_DOWN_NOTIFIES:
        mgr.failover.failed(state, event.ike_sa, event.notify, now)
    if state.status != MapStatus.ESTABLISHED:
        state.status = MapStatus.FAILED
    who = "peer sent" if event.by_peer else "we sent"
    state.last_error = f"{event.exchange}: {who} {event.notify}"
    state.bump("exchange_failed")
    state.bump("exchange_failed_" + event.notify.lower())  # by reason (metrics)
    log.error(
        "crypto map %s: %s failed: %s %s (%s)",
        state.cmap.name,
        event.exchange,
        who,
        event.notify,
        notify_meaning(event.notify, event.by_peer),
    )


def _on_initial_contact(
    mgr: Manager, state: MapState, event: ev.InitialContactReceived, now: float
) -> None:
    _drop_others(mgr, state, event.ike_sa)
    log.info("crypto map %s: INITIAL_CONTACT from %s", state.cmap.name, event.remote_id)


def _on_invalid_spi(
    mgr: Manager, state: MapState, event: ev.InvalidSpiReceived, now: float
) -> None:
    mgr.invalid_spi.on_hint(mgr, state, event, now)


def _on_lifetime(mgr: Manager, state: MapState, event: ev.LifetimeExpired, now: float) -> None:
    """The engine reached a lifetime limit and acted (ike.lifetimes): say so, count it."""
    name, child = state.cmap.name, event.child_id
    if child is None:
        if event.hard:
            state.bump("ike_hard_expired")
            log.warning("crypto map %s: IKE SA hard lifetime, deleting", name)
        elif state.ike_sa is not None and state.ike_sa.name == event.ike_sa:
            state.bump("ike_rekey_started")
            log.info("crypto map %s: IKE SA soft lifetime, rekeying", name)
    elif event.action == "idle":
        state.bump("child_lazy_expiry")
        log.info("crypto map %s: Child SA %d idle, left to expire (rekey lazy)", name, child)
    elif event.limits == "seconds":
        if not event.hard:
            state.bump("child_rekey_started")
        what = "hard lifetime, deleting" if event.hard else "soft lifetime, rekeying"
        log.info("crypto map %s: Child SA %d %s", name, child, what)
    elif event.hard:
        state.bump("child_hard_expired")
        log.warning(
            "crypto map %s: Child SA %d reached its hard limit (%s), deleting",
            name,
            child,
            event.limits,
        )
    else:
        state.bump("child_rekey_volume")
        state.bump("child_rekey_started")
        log.info(
            "crypto map %s: Child SA %d reached its soft limit (%s), rekeying",
            name,
            child,
            event.limits,
        )


def _install_child(mgr: Manager, state: MapState, event: ev.ChildSaInstalled, now: float) -> None:
    # Mode and ESN only: the lifetimes (seconds, bytes, packets) are the engine's
    opts: esp.SaOptions = {"mode": event.mode, "esn": event.esn}
    inbound = esp.InboundSA(event.inbound_spi, event.inbound_key, **opts)
    outbound = esp.OutboundSA(event.outbound_spi, event.outbound_key, **opts)
    state.creating_child = False
    sa = mgr.endpoint.find_sa(event.ike_sa)
    if mgr.lingering.pop(event.inbound_spi, None) is not None:  # reused: the new SA wins
        mgr.deadlines.cancel(("linger", event.inbound_spi))
    name = state.cmap.name
    mgr.datapath.install(
        SaPair(
            name,
            inbound,
            outbound,
            event.inbound_key,
            event.outbound_key,
            npu_selectors(event.remote_ts),
            npu_selectors(event.local_ts),
        )
    )
    old = sa.children.get(event.rekeyed_from) if sa and event.rekeyed_from else None
    rekeyed = old is not None and old.state == ike.ChildState.REKEYED
    if rekeyed and mgr.datapath.binding(name) is not None:
        # We answered the peer's rekey ("rekeyed": the peer deletes the old SA
        # next; had we started it, our DELETE would be out: "deleting"). The
        # peer may not have the new SA yet, so keep sending on the old one until
        # its DELETE (make-before-break, RFC 7296 §2.8); _remove_child then
        # moves sending to the newest Child SA.
        state.bump("rekey_send_deferred")
    else:
        _bind(mgr, state, event.ike_sa, outbound)
    state.add_child(
        ChildRecord(
            event.ike_sa,
            event.child_id,
            inbound,
            outbound,
            now,
            event.local_ts,
            event.remote_ts,
            event.inbound_key,
            event.outbound_key,
        )
    )
    state.bump("child_sa_installed")
    log.info(
        "crypto map %s: Child SA %d installed, SPI in %#010x out %#010x, %s",
        state.cmap.name,
        event.child_id,
        event.inbound_spi,
        event.outbound_spi,
        event.mode,
    )
    if state.queue and mgr.observe is not None and state.queued_at is not None:
        mgr.observe("first_packet_wait", state.cmap.name, now - state.queued_at)
    while state.queue:
        mgr.datapath.send(name, state.queue.popleft())
        state.bump("queued_sent")


def remove_child(
    mgr: Manager, state: MapState, ike_name: str, child_id: int, linger: float | None = None
) -> None:
    record = state.pop_child(ike_name, child_id)
    if record is None:
        return
    # Per-map ESP totals outlive the SA (metrics: live SAs + these)
    state.bump("retired_packets_in", record.inbound.counters.packets)
    state.bump("retired_bytes_in", record.inbound.counters.bytes)
    state.bump("retired_packets_out", record.outbound.counters.packets)
    state.bump("retired_bytes_out", record.outbound.counters.bytes)
    if linger is not None:
        mgr.lingering[record.inbound.spi] = linger  # make-before-break, receive side
        mgr.deadlines.set(("linger", record.inbound.spi), linger)
    # The outbound SA goes now; a lingering inbound SA when it expires (periodic).
    in_spi = None if linger is not None else record.inbound.spi
    mgr.datapath.remove(in_spi, record.outbound.spi)
    binding = mgr.datapath.binding(state.cmap.name)
    if binding is not None and binding.sa is record.outbound:
        mgr.datapath.unbind(state.cmap.name)
        # The most recently installed child of the same map takes over sending.
        if state.children:
            newer = state.children[-1]
            _bind(mgr, state, newer.ike_name, newer.outbound)


def _bind(mgr: Manager, state: MapState, ike_name: str, outbound: esp.OutboundSA) -> None:
    """The crypto map's packets go out on ``outbound``, to its IKE SA's peer (watched
    from the first packet: ipsecmgr.invalid_spi)."""
    sa = mgr.endpoint.find_sa(ike_name)
    nat_t = bool(sa is not None and sa.nat_t)
    peer: Address = sa.peer_addr if sa is not None else (str(state.cmap.peer), 500)
    mgr.datapath.bind(state.cmap.name, outbound, peer, nat_t)


def _drop_others(mgr: Manager, state: MapState, keep: str) -> None:
    """RFC 7296 §2.4 INITIAL_CONTACT: the peer has no other SA with us any more.

    Only SAs that were authenticated (and our own half-open initiations, which
    the peer's new SA makes redundant). A responder SA still between IKE_SA_INIT
    and IKE_AUTH is not "an IKE SA between the authenticated identities" of
    §2.4 yet: it may be another handshake of the same peer in flight (the
    engine's endpoint spares it too), and dropping it silently would leave
    that handshake hanging until the peer's retransmissions give up."""
    for sa in mgr._sas_of_map(state):
        if sa.name != keep and (sa.initiator or sa.state not in _UNAUTHENTICATED):
            sa.die("replaced (INITIAL_CONTACT)")
            state.bump("replaced_by_initial_contact")


# Manager.on_event: event class -> handler
EVENT_HANDLERS: dict[type[ev.IkeEvent], Callable[[Manager, MapState, Any, float], None]] = {
    ev.IkeSaEstablished: _on_ike_established,
    ev.ChildSaInstalled: _install_child,
    ev.IkeSaRekeyed: _on_ike_rekeyed,
    ev.ChildSaRekeyed: _on_child_rekeyed,
    ev.ChildSaDeleted: _on_child_deleted,
    ev.IkeSaDeleted: _on_ike_deleted,
    ev.PeerDead: _on_peer_dead,
    ev.AuthenticationFailed: _on_auth_failed,
    ev.ExchangeFailed: _on_exchange_failed,
    ev.InitialContactReceived: _on_initial_contact,
    ev.InvalidSpiReceived: _on_invalid_spi,
    ev.LifetimeExpired: _on_lifetime,
}
