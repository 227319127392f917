"""SA lifetime policy: when the engine rekeys or deletes an IKE or Child SA.

The engine alone decides (the daemon configures it through :class:`IkeConfig`
and reports what its data path counted, never edits these deadlines):

* Seconds. A soft deadline at a share of the lifetime (``REKEY_SHARE``: the
  original initiator a little earlier than the responder, so the two rarely
  collide), moved earlier by a random share of up to ``IkeConfig.rekey_jitter``
  of the lifetime (RFC 7296 §2.8: "it is recommended that the SA lifetime be
  randomized", so that two peers rarely rekey at once). At the soft deadline
  the SA is rekeyed once (one rekey per generation: the deadline is cleared
  when it fires, the new SA gets its own). At the hard deadline (the lifetime
  itself) a Child SA still there is deleted, and an IKE SA that was not
  replaced is deleted with its Child SAs.
* ``IkeConfig.rekey_lazy`` (StarOS "rekey lazy"): at the soft deadline a Child
  SA that carried no packet either way is not rekeyed; it is deleted at its
  hard deadline and the daemon creates a new one for the next packet.
* Volume (bytes, packets, and the ESP sequence number space, RFC 4303 §3.3.3).
  The data path counts; the daemon calls :meth:`IkeSA.check_usage` now and
  then, and the engine asks the SA's ``usage(ike_sa_name, child_id, now)``
  what each Child SA carried (:class:`ChildUsage`). A soft limit (``VOLUME_SHARE`` minus jitter of
  the configured one) starts a rekey, a hard one deletes the Child SA; each
  only once per Child SA.
* Make-before-break (§2.8): a rekey installs the new Child SA
  (``ChildSaInstalled`` with ``rekeyed_from``) before the old one's DELETE is
  sent, and the old SA stays in ``IkeSA.children`` until that DELETE is done.

Every decision is reported as a :class:`ike.events.LifetimeExpired` event (for
the daemon's logs and counters) and counted in ``IkeSA.counters``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import events as ev
from .state import ChildSA, ChildState, State

if TYPE_CHECKING:
    from .sa import IkeSA

__all__ = [
    "REKEY_JITTER",
    "REKEY_SHARE",
    "VOLUME_SHARE",
    "ChildUsage",
    "arm_child",
    "arm_ike",
    "check_usage",
    "on_timer",
]

# Share of a lifetime in seconds after which we rekey: (original initiator, responder)
REKEY_SHARE = (0.90, 0.93)
# Soft volume limit: this share of lifetime_bytes / lifetime_packets (minus jitter)
VOLUME_SHARE = 0.90
# Default IkeConfig.rekey_jitter: up to 5 % of the lifetime comes off a soft limit
REKEY_JITTER = 0.05


@dataclass(frozen=True, slots=True)
class ChildUsage:
    """What the data path counted for one Child SA, as of now.

    ``packets``/``bytes``: the larger of the two directions (each direction is an
    SA with the same lifetime, RFC 4301 §4.4.2.1). ``seq_soft``: the outbound
    sequence numbers are nearly used up; ``seq_hard``: they are (RFC 4303 §3.3.3:
    a sequence number never wraps, so the SA must be replaced or deleted).
    """

    packets: int
    bytes: int
    seq_soft: bool = False
    seq_hard: bool = False


def _soft_share(sa: IkeSA) -> float:
    """This SA's share of a lifetime in seconds at which it rekeys (jitter drawn now)."""
    cfg = sa.config
    return REKEY_SHARE[0 if sa.initiator else 1] - cfg.jitter() * cfg.rekey_jitter


def arm_ike(sa: IkeSA, now: float) -> None:
    """Deadlines of an IKE SA established or rekeyed (a new generation) at ``now``."""
    lifetime = sa.config.ike_lifetime
    if lifetime <= 0:
        sa.ike_rekey_at = sa.ike_expire_at = None
        return
    sa.ike_rekey_at = now + lifetime * _soft_share(sa)
    sa.ike_expire_at = now + lifetime


def arm_child(sa: IkeSA, child: ChildSA, now: float) -> None:
    """Deadlines and volume limits of a Child SA installed at ``now``."""
    cfg = sa.config
    jitter = cfg.jitter() * cfg.rekey_jitter  # one draw per Child SA
    if cfg.child_lifetime > 0:
        share = REKEY_SHARE[0 if sa.initiator else 1] - jitter
        child.rekey_at = now + cfg.child_lifetime * share
        child.expire_at = now + cfg.child_lifetime
    volume = VOLUME_SHARE - jitter
    if cfg.child_lifetime_packets > 0:
        child.soft_packets = max(1, int(cfg.child_lifetime_packets * volume))
    if cfg.child_lifetime_bytes > 0:
        child.soft_bytes = max(1, int(cfg.child_lifetime_bytes * volume))


def on_timer(sa: IkeSA, now: float) -> None:
    """Act on the deadlines in seconds that are due (from ``IkeSA.handle_timer``)."""
    if sa.state != State.ESTABLISHED:
        return
    if sa.ike_expire_at is not None and now >= sa.ike_expire_at:
        # §2.8: not replaced in time (rekeys kept failing): it must not be used longer
        sa.ike_expire_at = sa.ike_rekey_at = None
        sa.count("ike_expired")
        sa.emit(ev.LifetimeExpired(sa.name, None, True, "seconds", "delete"))
        sa.delete(now)
        return
    if sa.ike_rekey_at is not None and now >= sa.ike_rekey_at:
        sa.ike_rekey_at = None
        sa.count("ike_rekey_timer")
        sa.emit(ev.LifetimeExpired(sa.name, None, False, "seconds", "rekey"))
        sa.rekey_ike(now)
    for c in list(sa.children.values()):
        if c.expire_at is not None and now >= c.expire_at:
            c.expire_at = c.rekey_at = None
            sa.count("child_expired")
            sa.emit(ev.LifetimeExpired(sa.name, c.child_id, True, "seconds", "delete"))
            sa.delete_child(c.child_id, now)
        elif c.rekey_at is not None and now >= c.rekey_at:
            c.rekey_at = None
            if c.state != ChildState.INSTALLED:
                continue  # being rekeyed or deleted already
            if sa.config.rekey_lazy and _idle(sa, c, now):
                sa.count("child_lazy_expiry")
                sa.emit(ev.LifetimeExpired(sa.name, c.child_id, False, "seconds", "idle"))
                continue
            sa.count("child_rekey_timer")
            sa.emit(ev.LifetimeExpired(sa.name, c.child_id, False, "seconds", "rekey"))
            sa.rekey_child(c.child_id, now)


def _idle(sa: IkeSA, child: ChildSA, now: float) -> bool:
    """The Child SA carried nothing either way (unknown usage counts as busy)."""
    usage = sa.usage(sa.name, child.child_id, now) if sa.usage is not None else None
    return usage is not None and usage.packets == 0


def check_usage(sa: IkeSA, now: float) -> None:
    """Volume limits: ask ``sa.usage`` about each Child SA; soft → rekey, hard → delete."""
    if sa.state != State.ESTABLISHED or sa.usage is None:
        return
    cfg = sa.config
    for c in list(sa.children.values()):
        if c.volume_done or c.state == ChildState.DELETING:
            continue
        usage = sa.usage(sa.name, c.child_id, now)
        if usage is None:
            continue
        hard = _reached(usage, cfg.child_lifetime_packets, cfg.child_lifetime_bytes, True)
        if hard:
            c.volume_done = True
            c.rekey_at = c.expire_at = None
            sa.count("child_volume_expired")
            sa.emit(ev.LifetimeExpired(sa.name, c.child_id, True, hard, "delete"))
            sa.delete_child(c.child_id, now)
            continue
        soft = _reached(usage, c.soft_packets, c.soft_bytes, False)
        if soft and c.state == ChildState.INSTALLED:
            c.volume_done = True
            c.rekey_at = None  # one rekey per generation: the timer stands down
            sa.count("child_rekey_volume")
            sa.emit(ev.LifetimeExpired(sa.name, c.child_id, False, soft, "rekey"))
            sa.rekey_child(c.child_id, now)


def _reached(usage: ChildUsage, packets: int, nbytes: int, hard: bool) -> str:
    """The limits reached, as "bytes,packets,seq" (a subset, sorted); "" for none."""
    names = []
    if nbytes > 0 and usage.bytes >= nbytes:
        names.append("bytes")
    if packets > 0 and usage.packets >= packets:
        names.append("packets")
    if usage.seq_hard or (usage.seq_soft and not hard):
        names.append("seq")
    return ",".join(names)
