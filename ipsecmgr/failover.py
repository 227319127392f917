"""The manager's failover glue: which peer IKE goes to, what a packet gets when no
peer can be reached, and how unauthenticated noise is logged (issues #20, #15.4,
#15.5; docs/recovery.md "Failover", docs/security.md "Refusals and noise").

The decisions live in :mod:`ipsecmgr.peers` (ordered peers and their hold-downs)
and :mod:`ipsecmgr.reject` (the answer's bytes); this module applies them to the
manager's maps on its events, so that ``manager.py`` only calls in at a few
points:

* ``on_no_sa``: :meth:`Failover.held_down` (every peer dead or held down: drop,
  count, answer) and :meth:`Failover.answer` (``first_packet = "drop"`` after IKE
  already failed once);
* the IKE events: :meth:`established`, :meth:`failed` (dead peer, or a refusal in
  ``HOLD_DOWN_NOTIFIES``), :meth:`deleted`, :meth:`unauthenticated_noise`;
* ``pump``: :meth:`after_events` starts IKE with the next peer once the failed
  SA is gone; ``periodic``: preemption probes and retiring the backup's IKE SA.

Make-before-break preemption (RFC 7296 §2.8 in spirit): the probe to the
preferred peer is a second IKE SA while the backup's keeps carrying traffic.
When the probe's Child SA is installed, sending moves to it; the backup's IKE
SA (and its inbound Child SA, so answers still on their way through the backup
are decrypted) stays ``PREEMPT_GRACE`` seconds longer, then gets a DELETE.

Cost: nothing per packet while an SA exists; per timer tick, only the maps
running on a backup peer and the SAs being retired are looked at.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, TypedDict

from ipsecmgr.lifecycle import notify_meaning
from ipsecmgr.peers import DEAD, PeerList, PeerRow
from ipsecmgr.records import MapStatus
from ipsecmgr.reject import RateLimit, answer_for

if TYPE_CHECKING:
    from ipsecmgr.manager import Manager
    from ipsecmgr.records import MapState

log = logging.getLogger("ipsecmgr.ike")

#: Seconds the backup's IKE SA outlives the switch to the preferred peer: answers of
#: transactions sent through the backup just before still arrive and decrypt.
PREEMPT_GRACE = 5.0
#: Unauthenticated IKE errors (#15.4): the first per map and interval is logged, the
#: rest counted and reported as one line when the interval ends.
NOISE_INTERVAL = 10.0
#: RFC 1812 §4.3.2.8 rate limit of the answers (per gateway): average and burst
ANSWER_RATE = 10.0
ANSWER_BURST = 10


class MapFailover(TypedDict):
    """The failover part of one map in a snapshot (``show crypto map``)."""

    peers: list[PeerRow]
    hold_down_left: float | None  # every peer held down: seconds until one may be tried
    hold_down_reason: str
    preempt: bool
    on_unreachable: str


class _Noise:
    """Rate-limited log of one map's unauthenticated IKE errors."""

    __slots__ = ("last", "suppressed", "until")

    def __init__(self) -> None:
        self.until = 0.0
        self.suppressed = 0
        self.last = ""


class Failover:
    def __init__(self, manager: Manager) -> None:
        self.m = manager
        self.limit = RateLimit(ANSWER_RATE, ANSWER_BURST)
        self._due: dict[str, MapState] = {}  # maps whose current SA failed: next peer
        self._probe: dict[str, str] = {}  # map -> IKE SA name of its preemption probe
        self._on_backup: dict[str, MapState] = {}  # maps running on a non-first peer
        self._retire: dict[str, tuple[MapState, float]] = {}  # backup IKE SA -> (map, when)
        self._noise: dict[str, _Noise] = {}
        self._noise_pending: dict[str, _Noise] = {}  # with suppressed lines to report
        # The peer lists with a peer held down or counting failures (registered when a
        # hold-down starts, out again on success or reset): what SIGHUP and `clear
        # crypto` end (#15.5) without a pass over every map (#19.7)
        self.held: set[PeerList] = set()

    # -- packets without an SA ------------------------------------------------------

    def held_down(self, state: MapState, packet: bytes, now: float) -> bool:
        """Every peer dead or held down: drop (counted), answer, start no IKE."""
        peers = state.peers
        if not peers.all_held(now):
            return False
        sa = state.ike_sa
        if sa is not None and not sa.dead and not sa.established:
            # A new IKE SA is being built all the same (the INVALID_SPI probe found the
            # peer dead and re-initiates at once): the packet waits for it as usual.
            return False
        state.bump("hold_down_drops")
        left = peers.hold_down_left(now) or 0.0
        why = f"every peer dead or held down ({peers.hold_reason()}), {left:.1f} s left"
        tr = self.m.trace
        if tr is not None:
            tr("5", "hold_down_dropped", packet, crypto_map=state.cmap.name, reason=why)
        self.answer(state, packet, now, why)
        return True

    def answer(self, state: MapState, packet: bytes, now: float, why: str) -> None:
        """``on_unreachable``: a RST or an ICMP admin-prohibited into the TUN the packet
        came from (never onto the network), rate-limited (RFC 1812 §4.3.2.8)."""
        how = state.cmap.on_unreachable
        if how == "drop":
            return
        reply = answer_for(packet, how)
        if reply is None:
            state.bump("unreachable_not_answered")  # not a SYN (rst), an ICMP error, ...
            return
        if not self.limit.allow(now):
            state.bump("unreachable_rate_limited")
            return
        if not self.m.datapath.write_tun(state.cmap.name, reply):
            state.bump("unreachable_write_errors")
            return
        state.bump(f"unreachable_{how}_sent")
        tr = self.m.trace
        if tr is not None:
            tr("5b", "unreachable_answered", packet, crypto_map=state.cmap.name, answer=how,
               reason=why, reply=reply)  # fmt: skip

    def end_hold_downs(self) -> int:
        """SIGHUP: every peer's hold-down and backoff end (the operator's "try
        again", #15.5). Only the peer lists that have one are looked at, not every
        map (#19.7). Returns how many lists were reset."""
        n = len(self.held)
        for peers in self.held:
            peers.reset()
        self.held.clear()
        return n

    def hold_down_ended(self, peers: PeerList) -> None:
        """``peers`` were reset by someone else (``clear crypto``)."""
        self.held.discard(peers)

    # -- IKE events -------------------------------------------------------------------

    def established(self, state: MapState, sa_name: str, now: float) -> None:
        peers = state.peers
        sa = self.m.endpoint.find_sa(sa_name)
        peer = peers.peer_of(sa_name) or (peers.peer_for_config(sa.config) if sa else None)
        if peer is None:
            return
        peer.hold.reset()  # success ends the hold-down and its backoff (#15.5)
        if not peers.failed_once():
            self.held.discard(peers)
        peers.bind(sa_name, peer)
        name = state.cmap.name
        old = state.ike_sa
        if self._probe.get(name) == sa_name:
            del self._probe[name]
            state.bump("preempted")
            log.info("crypto map %s: preferred peer %s answers again, moving to it",
                     name, peer.address)  # fmt: skip
            if old is not None and old.name != sa_name and old.established:
                self._retire[old.name] = (state, now + PREEMPT_GRACE)
        peers.active = peer
        if peers.preempt and peer is not peers.peers[0] and state.cmap.role == "initiator":
            self._on_backup[name] = state
        else:
            self._on_backup.pop(name, None)

    def failed(self, state: MapState, sa_name: str, reason: str, now: float) -> str | None:
        """The map's SA (or its probe) with a peer failed: hold that peer down, and
        fail over if it was the map's current SA. Returns the peer's address."""
        peer = state.peers.peer_of(sa_name)
        name = state.cmap.name
        probe = self._probe.get(name) == sa_name
        current = state.ike_sa is not None and state.ike_sa.name == sa_name
        if peer is None or not (probe or current):
            return peer.address if peer else None
        if probe:
            del self._probe[name]
        delay = peer.hold.fail(now, reason)
        self.held.add(state.peers)
        state.bump("peer_hold_downs")
        log.warning("crypto map %s: peer %s %s; not tried for %.0f s",
                    name, peer.address, reason, delay)  # fmt: skip
        if current and state.cmap.role == "initiator":
            self._due[name] = state
        return peer.address

    def deleted(self, state: MapState, sa_name: str, reason: str, now: float) -> None:
        if self._probe.get(state.cmap.name) == sa_name:
            del self._probe[state.cmap.name]
        self._retire.pop(sa_name, None)
        state.peers.forget(sa_name)

    def after_events(self, now: float) -> None:
        """Fail over: the failed SA is gone, IKE starts with the next peer not held
        down (none: the map is in hold-down until a packet finds one free)."""
        if not self._due:
            return
        due, self._due = self._due, {}
        for name, state in due.items():
            if self.m.maps.get(name) is not state:
                continue  # rebuilt by SIGHUP meanwhile
            if state.ike_sa is not None and not state.ike_sa.dead:
                continue
            nxt = state.peers.choose(now)
            if nxt is None:
                log.warning("crypto map %s: every peer dead or held down", name)
                continue
            state.bump("failover")
            log.warning("crypto map %s: failing over to peer %s", name, nxt.address)
            self.m.initiate(state, now)

    def unauthenticated_noise(self, state: MapState, event: Any, notify: str, now: float) -> bool:
        """#15.4: an IKE error on an SA whose peer never authenticated (a responder
        SA before IKE_AUTH succeeded, or one refused at IKE_SA_INIT) is logged at a
        rate limit and becomes the map's Last Error only while the map is not up.
        Returns False for errors of our own SAs and of authenticated ones."""
        sa_name: str = event.ike_sa
        if state.peers.peer_of(sa_name) is not None:
            return False  # ours (initiated) or established: authenticated
        sa = self.m.endpoint.find_sa(sa_name)
        if sa is not None and (sa.initiator or sa.established):
            return False
        name = state.cmap.name
        counter = "auth_failed" if notify == "AUTHENTICATION_FAILED" else "exchange_failed"
        state.bump(counter)
        state.bump("unauthenticated_errors")
        # Last Error and log line worded as the manager words them for its own SAs
        if hasattr(event, "detail"):  # AuthenticationFailed
            text = f"AUTHENTICATION_FAILED: {event.detail}"
            line = (f"authentication failed: {event.detail} "
                    "(the identity or the pre-shared key did not match)")  # fmt: skip
        else:
            who = "peer sent" if event.by_peer else "we sent"
            text = f"{event.exchange}: {who} {notify}"
            line = (f"{event.exchange} failed: {who} {notify} "
                    f"({notify_meaning(notify, event.by_peer)})")  # fmt: skip
        if state.status != MapStatus.ESTABLISHED:
            state.last_error = text
            state.status = MapStatus.FAILED
        noise = self._noise.get(name)
        if noise is None:
            noise = self._noise[name] = _Noise()
        if now < noise.until:
            noise.suppressed += 1
            noise.last = text
            self._noise_pending[name] = noise
            state.bump("unauthenticated_log_suppressed")
            return True
        noise.until = now + NOISE_INTERVAL
        log.warning("crypto map %s: %s [unauthenticated peer: further ones logged at most "
                    "once per %.0f s]", name, line, NOISE_INTERVAL)  # fmt: skip
        return True

    # -- timers -------------------------------------------------------------------------

    def next_time(self) -> float | None:
        times: list[float] = [at for _, at in self._retire.values()]
        for name, state in self._on_backup.items():
            if name not in self._probe and (t := state.peers.preempt_at()) is not None:
                times.append(t)
        times += [n.until for n in self._noise_pending.values()]
        return min(times) if times else None

    def periodic(self, now: float) -> None:
        for sa_name, (state, at) in list(self._retire.items()):
            if now < at:
                continue
            del self._retire[sa_name]
            sa = self.m.endpoint.find_sa(sa_name)
            if sa is not None and sa.established:
                state.bump("backup_sa_retired")
                sa.delete(now)  # RFC 7296 §1.4.1; its Child SAs go with it
        for name, state in list(self._on_backup.items()):
            if self.m.maps.get(name) is not state or state.peers.active is None:
                del self._on_backup[name]
                continue
            sa = state.ike_sa
            if name in self._probe or sa is None or not sa.established:
                continue
            better = state.peers.better_than_active(now)
            if better is None:
                continue
            probe = self.m.endpoint.initiate(better.config, now)
            state.peers.bind(probe.name, better)
            self._probe[name] = probe.name
            state.bump("preempt_probes")
            log.info("crypto map %s: trying preferred peer %s again (traffic stays on %s)",
                     name, better.address, state.peers.active.address)  # fmt: skip
        for name, noise in list(self._noise_pending.items()):
            if now >= noise.until:
                del self._noise_pending[name]
                log.warning("crypto map %s: %d more unauthenticated IKE errors in %.0f s "
                            "(last: %s)", name, noise.suppressed, NOISE_INTERVAL,
                            noise.last)  # fmt: skip
                noise.suppressed = 0

    # -- show ------------------------------------------------------------------------------

    def status(self, now: float) -> dict[str, str]:
        """Maps in hold-down (every peer held down, no SA up); a dead peer's map
        stays "dead" (``show`` adds its hold-down line)."""
        return {
            name: "hold-down"
            for name, state in self.m.maps.items()
            if state.cmap.role == "initiator"
            and state.status != MapStatus.DEAD
            and not state.children  # nothing carries traffic (an IKE SA alone may be up)
            and state.peers.all_held(now)
        }

    def rows(self, now: float) -> dict[str, MapFailover]:
        out: dict[str, MapFailover] = {}
        for name, state in self.m.maps.items():
            up = state.status == MapStatus.ESTABLISHED
            held = not state.children and state.peers.all_held(now)
            out[name] = {
                "peers": state.peers.rows(now, up, state.status == MapStatus.CONNECTING),
                "hold_down_left": state.peers.hold_down_left(now) if held else None,
                "hold_down_reason": state.peers.hold_reason() if held else "",
                "preempt": state.peers.preempt,
                "on_unreachable": state.cmap.on_unreachable,
            }
        return out


__all__ = ["DEAD", "PREEMPT_GRACE", "Failover", "MapFailover"]
