"""What the manager keeps per crypto map, per Child SA and per IKE SA liveness.

Plain records: :class:`MapState` per crypto map, :class:`ChildRecord` per
installed Child SA, :class:`Liveness` per IKE SA under dead-peer detection.
The manager (:mod:`ipsecmgr.manager`) and its helpers (:mod:`ipsecmgr.lifecycle`,
:mod:`ipsecmgr.periodic`, :mod:`ipsecmgr.show_rows`) read and write them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import esp
import ike
from ipsecmgr import config as cfg
from ipsecmgr.counters import Counters
from ipsecmgr.peers import PeerList, peer_configs

Address = tuple[str, int]
SendFn = Callable[[bytes, Address, Address | None], None]  # (datagram, peer, our address)


class MapStatus(StrEnum):
    """Where a crypto map's IKE stands (``MapState.status``); ``show`` words it
    its own way (:data:`ipsecmgr.show_rows.MAP_STATUS_SHOWN`)."""

    IDLE = "idle"  # no IKE SA (none yet, or it was deleted)
    CONNECTING = "connecting"  # our IKE_SA_INIT / IKE_AUTH is under way
    ESTABLISHED = "established"
    FAILED = "failed"  # refused (AUTHENTICATION_FAILED, a hold-down notify)
    DEAD = "dead"  # the peer stopped answering (RFC 7296 §2.4)


class ChildState(StrEnum):
    """A Child SA as ``show`` names it: the one the map sends on, or one being replaced."""

    INSTALLED = "INSTALLED"
    REKEYED = "REKEYED"  # a newer Child SA of the map carries the outbound traffic


@dataclass(slots=True)  # one per Child SA, 10,000s on a responder
class ChildRecord:
    ike_name: str  # its IKE SA: child ids are only unique per IKE SA
    child_id: int
    inbound: esp.InboundSA
    outbound: esp.OutboundSA
    installed_at: float
    # The engine's selectors (the same objects its Child SA holds), formatted for
    # ``show`` when asked: strings per Child SA were ~400 bytes per peer
    local_ts: Sequence[ike.TrafficSelector]
    remote_ts: Sequence[ike.TrafficSelector]
    # AES key ‖ salt of each direction, kept only for ``trace --wireshark-keys``
    # (two slots: a tuple of the two was 56 bytes more per Child SA)
    inbound_key: bytes = field(default=b"", repr=False)
    outbound_key: bytes = field(default=b"", repr=False)

    # Mode, ESN and key size are the ESP SAs' own (not a copy per record)
    @property
    def mode(self) -> str:
        return self.inbound.mode

    @property
    def esn(self) -> bool:
        return self.inbound.esn

    @property
    def key_bits(self) -> int:
        return self.inbound.key_bits


@dataclass(eq=False)  # hashed by identity: the key of its deadline (Manager.looks)
class MapState:
    """Everything the gateway knows about one crypto map."""

    cmap: cfg.CryptoMap
    ike_config: ike.IkeConfig
    ike_sa: ike.IkeSA | None = None
    status: MapStatus = MapStatus.IDLE
    last_error: str = ""
    # The installed Child SAs, oldest first: one as a rule, two while a rekey
    # replaces one (RFC 7296 §2.8). A tuple, found by (IKE SA name, child id) with
    # child(): a dict of one entry and its key tuple were ~280 bytes per peer.
    children: tuple[ChildRecord, ...] = ()
    queue: deque[bytes] = field(default_factory=deque)
    counters: Counters = field(default_factory=Counters)
    established_at: float | None = None
    # Periodic work on the established IKE SA (absolute loop times, None: off); the
    # liveness looks are its IKE SAs' (Manager.liveness)
    keepalive_at: float | None = None
    volume_at: float | None = None  # next look at the Child SAs' byte/packet/sequence limits
    creating_child: bool = False  # CREATE_CHILD_SA for a new Child SA under way
    # Ordered peers, dead marking, hold-down and preemption (ipsecmgr.peers)
    peers: PeerList = field(default_factory=lambda: PeerList(()))
    # For Manager.observe (ipsecmgr.metrics): when our IKE_SA_INIT went out, and
    # when the first packet of the current queue (first_packet = "queue") arrived.
    initiated_at: float | None = None
    queued_at: float | None = None

    @classmethod
    def build(cls, cmap: cfg.CryptoMap, base: ike.IkeConfig) -> MapState:
        """A map's state with one IKE config per peer (the first one is ``base``)."""
        return cls(cmap, base, peers=PeerList(peer_configs(cmap.peers, base), cmap.preempt))

    def child(self, ike_name: str, child_id: int) -> ChildRecord | None:
        """The Child SA ``child_id`` of the IKE SA named ``ike_name``, if installed."""
        for rec in self.children:
            if rec.child_id == child_id and rec.ike_name == ike_name:
                return rec
        return None

    def children_of(self, ike_name: str) -> list[ChildRecord]:
        """The Child SAs of the map's IKE SA named ``ike_name``."""
        return [rec for rec in self.children if rec.ike_name == ike_name]

    def add_child(self, rec: ChildRecord) -> None:
        """A newly installed Child SA (the newest: the last one)."""
        self.children = (*self.children, rec)

    def pop_child(self, ike_name: str, child_id: int) -> ChildRecord | None:
        """Forget a Child SA; the record, or None if it was not installed."""
        rec = self.child(ike_name, child_id)
        if rec is not None:
            self.children = tuple(r for r in self.children if r is not rec)
        return rec

    def bump(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def __lt__(self, other: MapState) -> bool:
        # Orders maps whose deadlines tie in the Manager's timer heap (ike.timers
        # may compare keys): by name, not by address in memory
        return self.cmap.name < other.cmap.name


@dataclass(slots=True)
class Liveness:
    """Dead-peer detection of one IKE SA (RFC 7296 §2.4).

    ``last_activity`` is the last time we know something arrived from the peer:
    an authenticated IKE message (the engine's ``last_heard``) or inbound ESP
    (the Child SAs' packet counters changed since the previous look).
    """

    last_activity: float
    check_at: float
    packets_in: int = 0
    sent_at: float | None = None  # the liveness request not yet answered
