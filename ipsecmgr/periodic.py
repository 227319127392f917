"""The manager's periodic work: liveness checks, volume looks, NAT keepalives.

Dead-peer detection (RFC 7296 §2.4), the engine's looks at what the Child SAs
carried (:meth:`ike.IkeSA.check_usage`: the engine asks :func:`usage` and
decides on the byte/packet/sequence limits), NAT keepalives (RFC 3948 §2.3)
and the expiry of lingering inbound SPIs, each by deadline in the manager's
timer heaps (:attr:`Manager.looks`: a map's volume and liveness looks, one
deadline per map; :attr:`Manager.deadlines`: the rest): nothing is swept.
Lifetimes themselves (seconds, volume, jitter, ``rekey lazy``) are the
engine's policy (``ike.lifetimes``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import ike
from ipsecmgr.records import Liveness, MapState

if TYPE_CHECKING:
    from ipsecmgr.manager import Manager

log = logging.getLogger("ipsecmgr.ike")

# Seconds between the engine's looks at the ESP counters (zero per-packet cost): every second
# with byte/packet lifetimes, else every 5 s for the sequence number only (its
# soft limit leaves 2^20 packets: 5 s at 200 kpps, more than this gateway sends).
VOLUME_CHECK = 1.0
SEQUENCE_CHECK = 5.0
# Look at the inbound ESP counters interval/10 apart: a heartbeat then leaves at
# most interval/10 later than "interval after the last packet" (no per-packet cost).
DPD_SAMPLES = 10


def schedule(mgr: Manager, state: MapState, now: float) -> None:
    """(Re)start the periodic work of a newly established or rekeyed IKE SA."""
    sa = state.ike_sa
    behind_nat = sa is not None and sa.nat_t and sa.nat_detected_local
    # RFC 3948 §4 / RFC 7296 §2.23: only the side behind the NAT keeps its mapping open
    ka = state.cmap.nat_keepalive
    state.keepalive_at = now + ka if behind_nat and ka > 0 else None
    state.volume_at = now + _volume_period(mgr, state)
    mgr.deadlines.set(("keepalive", state.cmap.name), state.keepalive_at)
    arm(mgr, state)


def arm(
    mgr: Manager, state: MapState, lives: list[tuple[ike.IkeSA, Liveness]] | None = None
) -> None:
    """The map's deadline: its next volume look (while its IKE SA is up) or liveness
    look of one of its established IKE SAs (``lives``, if known), whichever comes
    first (None: neither)."""
    sa = state.ike_sa
    times = [lv.check_at for _, lv in (_liveness_of(mgr, state) if lives is None else lives)]
    if sa is not None and sa.established and state.volume_at is not None:
        times.append(state.volume_at)
    mgr.looks.set(state, min(times) if times else None)


def _liveness_of(mgr: Manager, state: MapState) -> list[tuple[ike.IkeSA, Liveness]]:
    """The map's established IKE SAs under dead-peer detection (a stale one and its
    replacement may both be), with their records."""
    out = []
    for sa in mgr._sas_of_map(state):
        lv = mgr.liveness.get(sa.name)
        if lv is not None and sa.established:
            out.append((sa, lv))
    return out


def _volume_period(mgr: Manager, state: MapState) -> float:
    ts = mgr.config.ipsec_transform_sets[state.cmap.ipsec_transform_sets[0]]
    return VOLUME_CHECK if ts.lifetime_bytes or ts.lifetime_packets else SEQUENCE_CHECK


def periodic(mgr: Manager, now: float) -> None:
    """Start what is due: liveness checks (§2.4), volume rekeys, NAT keepalives
    (RFC 3948 §2.3). Rekeys and expiry are the engine's (ike.lifetimes)."""
    mgr.failover.periodic(now)  # preemption probes, retiring a backup's IKE SA
    # Only what is due, earliest first (ike.timers): each handler sets its next time
    for state in mgr.looks.pop_due(now):
        _map_due(mgr, state, now)
    for kind, key in mgr.deadlines.pop_due(now):
        if kind == "linger":
            _linger_expired(mgr, int(key), now)
        elif kind == "silence":  # ESP went out SILENCE ago: answered? (§2.4)
            mgr.invalid_spi.silence_due(mgr, str(key), now)
        else:
            _keepalive_due(mgr, str(key), now)


def _linger_expired(mgr: Manager, spi: int, now: float) -> None:
    until = mgr.lingering.get(spi)
    if until is None:
        return
    if now < until:
        mgr.deadlines.set(("linger", spi), until)
        return
    del mgr.lingering[spi]
    mgr.datapath.remove(spi, None)


def _map_due(mgr: Manager, state: MapState, now: float) -> None:
    """The volume look and the liveness looks that are due, then the next deadline."""
    sa, volume_at = state.ike_sa, state.volume_at
    # (no IKE SA up: schedule starts the volume looks again with the next one)
    if sa is not None and sa.established and volume_at is not None and now >= volume_at:
        state.volume_at = now + _volume_period(mgr, state)
        sa.check_usage(now)  # the engine asks usage() and decides (ike.lifetimes)
    lives = _liveness_of(mgr, state)
    for ike_sa, lv in lives:
        if now >= lv.check_at:
            _check_liveness(mgr, state, ike_sa, lv, now)
    arm(mgr, state, lives)


def _keepalive_due(mgr: Manager, name: str, now: float) -> None:
    state = mgr.maps.get(name)
    sa = state.ike_sa if state is not None else None
    if state is None or sa is None or not sa.established:
        return  # _schedule starts it again with the next IKE SA
    if state.keepalive_at is not None:
        if now >= state.keepalive_at:
            state.keepalive_at = now + state.cmap.nat_keepalive
            _send_keepalive(mgr, state, sa)
        mgr.deadlines.set(("keepalive", name), state.keepalive_at)


def _check_liveness(mgr: Manager, state: MapState, sa: ike.IkeSA, lv: Liveness, now: float) -> None:
    """RFC 7296 §2.4: an empty INFORMATIONAL only when nothing has arrived from
    the peer for ``dpd.interval``; it is resent every ``dpd.timeout`` seconds,
    ``dpd.retries`` times, and the peer is dead ``dpd.timeout`` after the last."""
    dpd = state.cmap.dpd
    packets = sum(rec.inbound.counters.packets for rec in state.children_of(sa.name))
    esp_seen = packets != lv.packets_in
    if esp_seen:
        lv.packets_in = packets
        lv.last_activity = now
    if sa.last_heard is not None and sa.last_heard > lv.last_activity:
        lv.last_activity = sa.last_heard
    if lv.sent_at is not None and lv.last_activity >= lv.sent_at:
        lv.sent_at = None  # answered (or ESP arrived): the peer is alive
    due = lv.last_activity + dpd.interval
    if now >= due and lv.sent_at is None:
        lv.sent_at = now
        lv.last_activity = now  # the next heartbeat one interval after this one
        state.bump("liveness_checks")
        # timeout 0: the map's retransmission settings (exponential) apply
        sa.liveness_check(now, dpd.timeout or None, dpd.retries)
        due = now + dpd.interval
    lv.check_at = min(due, now + dpd.interval / DPD_SAMPLES)


def usage(mgr: Manager, ike_name: str, child_id: int, now: float) -> ike.ChildUsage | None:
    """What the data path counted for a Child SA (the engine asks: volume lifetimes,
    ``rekey lazy``): the larger direction, and whether the sequence numbers run out."""
    state = mgr._state_for_name(ike_name)
    rec = state.child(ike_name, child_id) if state is not None else None
    if rec is None:
        return None
    out, inb = rec.outbound, rec.inbound
    # The ESP SAs carry no volume limits (the engine's), only the sequence number's
    # (RFC 4303 §3.3.3: it never wraps)
    so, si = out.status(now), inb.status(now)
    return ike.ChildUsage(
        max(out.counters.packets, inb.counters.packets),
        max(out.counters.bytes, inb.counters.bytes),
        "seq" in so.soft or "seq" in si.soft,
        "seq" in so.hard or "seq" in si.hard,
    )


def _send_keepalive(mgr: Manager, state: MapState, sa: ike.IkeSA) -> None:
    try:
        mgr.datapath.send_keepalive(sa.peer_addr)
        state.bump("nat_keepalives_sent")
    except OSError as exc:
        state.bump("nat_keepalive_errors")
        log.debug("NAT keepalive to %s failed: %s", sa.peer_addr, exc)
