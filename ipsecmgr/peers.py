"""Ordered peers of a crypto map, dead marking and hold-down (issues #20 and #15.5).

One mechanism serves both: every peer of a map has a :class:`HoldDown`. A
peer is held down when

* IKE to it gave up (retransmissions exhausted while connecting, or DPD found
  it dead, RFC 7296 §2.4): it is *dead*;
* it refused us with AUTHENTICATION_FAILED, NO_PROPOSAL_CHOSEN or
  TS_UNACCEPTABLE (RFC 7296 §2.21): trying again at once would only cost a
  Diffie-Hellman per triggering packet and fail the same way.

The hold-down lasts 1 s after the first failure and doubles with every
failure in a row up to 60 s (``HOLD_DOWN_FIRST``, ``HOLD_DOWN_MAX``); an IKE
SA established with the peer, SIGHUP and ``clear crypto`` reset it. IKE goes
to the first peer (in configuration order) that is not held down; when all of
them are, the map is in hold-down: protected packets are dropped and counted
(and answered, ``on_unreachable``), never sent in clear, and no IKE starts.

With ``preempt = true`` a map that runs on a backup peer tries the preferred
one again once its hold-down ends, while the backup keeps carrying traffic
(make-before-break): the manager switches only when the new SA is up.

Pure: no clock reads (``now`` is passed in), no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypedDict

import ike
from ipsecmgr.config import IPAddress

HOLD_DOWN_FIRST = 1.0  # seconds after the first failure
HOLD_DOWN_MAX = 60.0  # doubling stops here
#: RFC 7296 §3.10.1 notifies after which the map waits before trying that peer again
HOLD_DOWN_NOTIFIES = frozenset(("AUTHENTICATION_FAILED", "NO_PROPOSAL_CHOSEN", "TS_UNACCEPTABLE"))
DEAD = "dead (IKE gave up: no answer)"


def peer_configs(addresses: Sequence[IPAddress], base: ike.IkeConfig) -> list[ike.IkeConfig]:
    """One engine config per peer: ``base`` for the first, the same with another
    peer address for the others. A remote identity left at its default (the first
    peer's address) becomes each peer's own address (RFC 7296 §3.5: ID_IPV4_ADDR)."""
    out = [base]
    default_id = base.remote_id == ike.Identity.address(base.peer_addr[0])
    for addr in addresses[1:]:
        remote_id = ike.Identity.address(str(addr)) if default_id else base.remote_id
        out.append(
            dataclasses.replace(base, peer_addr=(str(addr), base.peer_addr[1]), remote_id=remote_id)
        )
    return out


class PeerRow(TypedDict):
    """One peer in ``show crypto map`` (snapshot schema)."""

    address: str
    state: str  # "active" | "standby" | "connecting" | "dead" | "hold-down"
    active: bool
    hold_down_left: float | None  # seconds, None: not held down
    failures: int  # in a row since the last success
    reason: str  # why it is held down ("" if it is not)


@dataclass
class HoldDown:
    """Exponential hold-down: ``first`` seconds after one failure, doubled per
    further failure in a row, at most ``cap``; :meth:`reset` on success."""

    first: float = HOLD_DOWN_FIRST
    cap: float = HOLD_DOWN_MAX
    failures: int = 0
    until: float | None = None
    reason: str = ""

    def fail(self, now: float, reason: str) -> float:
        """Count a failure; returns the hold-down's length."""
        self.failures += 1
        delay = min(self.cap, self.first * 2.0 ** (self.failures - 1))
        self.until = now + delay
        self.reason = reason
        return delay

    def reset(self) -> None:
        self.failures, self.until, self.reason = 0, None, ""

    def held(self, now: float) -> bool:
        return self.until is not None and now < self.until

    def left(self, now: float) -> float | None:
        return self.until - now if self.until is not None and now < self.until else None


@dataclass(eq=False)
class Peer:
    address: str
    config: ike.IkeConfig
    hold: HoldDown = field(default_factory=HoldDown)


class PeerList:
    """The peers of one crypto map, in order of preference."""

    def __init__(self, configs: Sequence[ike.IkeConfig], preempt: bool = True) -> None:
        self.peers = [Peer(c.peer_addr[0], c) for c in configs]
        self.preempt = preempt
        self.active: Peer | None = None  # the peer of the map's current IKE SA
        # IKE SA name -> the peer it was built with (ours and the peers' SAs)
        self._by_sa: dict[str, Peer] = {}
        self._by_config = {id(p.config): p for p in self.peers}

    @property
    def configs(self) -> list[ike.IkeConfig]:
        return [p.config for p in self.peers]

    def owns(self, config: ike.IkeConfig) -> bool:
        return id(config) in self._by_config

    def peer_for_config(self, config: ike.IkeConfig) -> Peer | None:
        return self._by_config.get(id(config))

    def bind(self, sa_name: str, peer: Peer) -> None:
        self._by_sa[sa_name] = peer

    def peer_of(self, sa_name: str) -> Peer | None:
        return self._by_sa.get(sa_name)

    def forget(self, sa_name: str) -> None:
        self._by_sa.pop(sa_name, None)

    def choose(self, now: float) -> Peer | None:
        """The first peer not held down (None: every peer is)."""
        for p in self.peers:
            if not p.hold.held(now):
                return p
        return None

    def all_held(self, now: float) -> bool:
        return all(p.hold.held(now) for p in self.peers)

    def failed_once(self) -> bool:
        """Some peer failed since its last success (IKE has already failed once)."""
        return any(p.hold.failures for p in self.peers)

    def hold_down_left(self, now: float) -> float | None:
        """While every peer is held down: seconds until the first may be tried."""
        if not self.all_held(now):
            return None
        return min(p.hold.left(now) or 0.0 for p in self.peers)

    def hold_reason(self) -> str:
        return next((p.hold.reason for p in self.peers if p.hold.reason), "")

    def better_than_active(self, now: float) -> Peer | None:
        """With ``preempt``: a peer preferred to the active one whose hold-down is over."""
        if not self.preempt or self.active is None:
            return None
        for p in self.peers:
            if p is self.active:
                return None
            if not p.hold.held(now):
                return p
        return None

    def preempt_at(self) -> float | None:
        """When a peer preferred to the active one comes out of hold-down."""
        if not self.preempt or self.active is None:
            return None
        times = []
        for p in self.peers:
            if p is self.active:
                break
            if p.hold.until is not None:
                times.append(p.hold.until)
        return min(times) if times else None

    def reset(self) -> None:
        for p in self.peers:
            p.hold.reset()

    def rows(self, now: float, established: bool, connecting: bool) -> list[PeerRow]:
        out: list[PeerRow] = []
        for p in self.peers:
            left = p.hold.left(now)
            is_active = p is self.active and (established or connecting)
            if is_active:
                state = "active" if established else "connecting"
            elif left is not None:
                state = "dead" if p.hold.reason == DEAD else "hold-down"
            else:
                state = "standby"
            out.append(
                {
                    "address": p.address,
                    "state": state,
                    "active": is_active,
                    "hold_down_left": left,
                    "failures": p.hold.failures,
                    "reason": p.hold.reason if left is not None else "",
                }
            )
        return out
