"""The manager's periodic work: liveness checks, volume rekeys, NAT keepalives.

Dead-peer detection (RFC 7296 §2.4), byte/packet/sequence limits of the Child
SAs (soft: rekey, hard: delete), ``rekey lazy``, NAT keepalives (RFC 3948 §2.3)
and the expiry of lingering inbound SPIs, each by deadline in the manager's
timer heap (:attr:`Manager.deadlines`): nothing is swept.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import ike
from ipsecmgr.records import Liveness, MapState

if TYPE_CHECKING:
    from ipsecmgr.manager import Manager

log = logging.getLogger("ipsecmgr.ike")

# Time-based rekeying belongs to the IKE engine (90 % / 93 % of the lifetime in
# seconds, see ike/__init__.py); the manager only moves that soft deadline
# earlier by a random share of up to REKEY_JITTER of the lifetime (RFC 7296
# §2.8: jitter, so that two peers rarely rekey at once), and vetoes it for
# "rekey lazy" SAs that carried nothing. Volume limits are the manager's:
SOFT_VOLUME = 0.9  # soft limit = 90 % (minus jitter) of lifetime_bytes / lifetime_packets
REKEY_JITTER = 0.05
# Seconds between looks at the ESP counters (zero per-packet cost): every second
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
    mgr.deadlines.set(("volume", state.cmap.name), state.volume_at)


def _volume_period(mgr: Manager, state: MapState) -> float:
    ts = mgr.config.ipsec_transform_sets[state.cmap.ipsec_transform_sets[0]]
    return VOLUME_CHECK if ts.lifetime_bytes or ts.lifetime_packets else SEQUENCE_CHECK


def periodic(mgr: Manager, now: float) -> None:
    """Start what is due: liveness checks (§2.4), volume rekeys, NAT keepalives
    (RFC 3948 §2.3). Time-based rekeys are the engine's (see REKEY_JITTER)."""
    mgr.failover.periodic(now)  # preemption probes, retiring a backup's IKE SA
    # Only what is due, earliest first (ike.timers): each handler sets its next time
    for kind, key in mgr.deadlines.pop_due(now):
        if kind == "linger":
            _linger_expired(mgr, int(key), now)
        elif kind == "liveness":
            _liveness_due(mgr, str(key), now)
        elif kind == "silence":  # ESP went out SILENCE ago: answered? (§2.4)
            mgr.invalid_spi.silence_due(mgr, str(key), now)
        else:
            _map_work_due(mgr, kind, str(key), now)


def _linger_expired(mgr: Manager, spi: int, now: float) -> None:
    until = mgr.lingering.get(spi)
    if until is None:
        return
    if now < until:
        mgr.deadlines.set(("linger", spi), until)
        return
    del mgr.lingering[spi]
    mgr.datapath.remove(spi, None)


def _liveness_due(mgr: Manager, name: str, now: float) -> None:
    lv = mgr.liveness.get(name)
    ike_sa = mgr.endpoint.find_sa(name)
    if lv is None or ike_sa is None or not ike_sa.established:
        return  # gone (its IkeSaDeleted dropped the record) or not up any more
    if now < lv.check_at:
        mgr.deadlines.set(("liveness", name), lv.check_at)
        return
    owner = mgr._state_for_name(name)
    if owner is not None:
        _check_liveness(mgr, owner, ike_sa, lv, now)
        mgr.deadlines.set(("liveness", name), lv.check_at)


def _map_work_due(mgr: Manager, kind: str, name: str, now: float) -> None:
    state = mgr.maps.get(name)
    sa = state.ike_sa if state is not None else None
    if state is None or sa is None or not sa.established:
        return  # _schedule starts it again with the next IKE SA
    if kind == "volume" and state.volume_at is not None:
        if now >= state.volume_at:
            state.volume_at = now + _volume_period(mgr, state)
            _check_volume(mgr, state, sa, now)
        mgr.deadlines.set(("volume", name), state.volume_at)
    elif kind == "keepalive" and state.keepalive_at is not None:
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


def _check_volume(mgr: Manager, state: MapState, sa: ike.IkeSA, now: float) -> None:
    """Soft byte/packet/sequence limits → rekey (make-before-break); hard → delete."""
    for (ike_name, child_id), rec in list(state.children.items()):
        if ike_name != sa.name or rec.rekey_started or child_id not in sa.children:
            continue
        out, inb = rec.outbound.status(now), rec.inbound.status(now)
        if out.hard_expired or inb.hard_expired:
            rec.rekey_started = True
            state.bump("child_hard_expired")
            log.warning(
                "crypto map %s: Child SA %d reached its hard limit (%s), deleting",
                state.cmap.name,
                child_id,
                ",".join(sorted(out.hard | inb.hard)),
            )
            sa.delete_child(child_id, now)
        elif out.soft_expired or inb.soft_expired:
            rec.rekey_started = True
            why = ",".join(sorted(out.soft | inb.soft))
            state.bump("child_rekey_volume")
            state.bump("child_rekey_started")
            log.info(
                "crypto map %s: Child SA %d reached its soft limit (%s), rekeying",
                state.cmap.name,
                child_id,
                why,
            )
            child = sa.children[child_id]
            child.rekey_at = None  # one rekey only: the engine's timer stands down
            sa.rekey_child(child_id, now)


def before_engine_timers(mgr: Manager, now: float) -> None:
    """The engine is about to start the rekeys due at ``now``: count them, and
    apply ``rekey lazy``: at the soft lifetime an SA that carried nothing is
    not rekeyed; the engine deletes it at the hard lifetime and the next
    packet creates a new one (``rekey keepalive`` rekeys regardless, as StarOS)."""
    # Only the IKE SAs whose engine timer is due (ike.timers), not every map
    for owner in mgr.endpoint.due(now):
        state = mgr._state_for_name(owner.name)
        if state is None:
            continue
        ts = mgr.config.ipsec_transform_sets[state.cmap.ipsec_transform_sets[0]]
        sa = state.ike_sa
        due = sa is owner and sa.established and sa.ike_rekey_at is not None
        if due and sa is not None and sa.ike_rekey_at is not None and now >= sa.ike_rekey_at:
            state.bump("ike_rekey_started")
            log.info("crypto map %s: IKE SA soft lifetime, rekeying", state.cmap.name)
        for (ike_name, child_id), rec in state.children.items():
            if ike_name != owner.name:
                continue
            child = owner.children.get(child_id)
            if child is None or child.rekey_at is None or now < child.rekey_at:
                continue
            if child.expire_at is not None and now >= child.expire_at:
                continue  # hard lifetime: the engine deletes it
            idle = rec.inbound.counters.packets == 0 and rec.outbound.counters.packets == 0
            if ts.rekey == "lazy" and idle:
                child.rekey_at = None
                state.bump("child_lazy_expiry")
                log.info(
                    "crypto map %s: Child SA %d idle, left to expire (rekey lazy)",
                    state.cmap.name,
                    child_id,
                )
            elif child.state == "installed":
                state.bump("child_rekey_started")
                log.info(
                    "crypto map %s: Child SA %d soft lifetime, rekeying",
                    state.cmap.name,
                    child_id,
                )


def jittered(mgr: Manager, soft: float | None, lifetime: float) -> float | None:
    return None if soft is None else soft - mgr.jitter() * REKEY_JITTER * lifetime


def _send_keepalive(mgr: Manager, state: MapState, sa: ike.IkeSA) -> None:
    try:
        mgr.datapath.send_keepalive(sa.peer_addr)
        state.bump("nat_keepalives_sent")
    except OSError as exc:
        state.bump("nat_keepalive_errors")
        log.debug("NAT keepalive to %s failed: %s", sa.peer_addr, exc)
