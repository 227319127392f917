"""One IKE SA as a sans-I/O state machine (RFC 7296).

Theory of operation
-------------------
Three kinds of input drive an :class:`IkeSA`: commands (``initiate``,
``rekey_child``, ...), ``receive_datagram(data, addr, now)`` and
``handle_timer(now)``. Output is pulled: ``datagrams_to_send(now)``,
``next_event()`` and ``get_timer()``. Nothing here reads a clock or opens a
socket.

This module holds the IKE SA's state (keys, Child SAs, identities, deadlines,
counters) and its commands; the exchanges themselves (the task queue, sending,
receiving and dispatch, after libcharon's task_manager) are in
:mod:`ike.task_manager`, whose functions are bound here as methods of :class:`IkeSA`.

Wire state (SPIs, keys, message IDs, the request in flight, the response
cache) lives in a :class:`Channel`. An IKE rekey (§2.18) builds a new channel
and swaps it in; the old one lives on only to carry its DELETE exchange.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from . import events as ev
from . import lifetimes, task_manager
from . import tasks as _t
from .caches import EngineCaches
from .config import IkeConfig
from .constants import NON_ESP_MARKER
from .crypto import IkeSuite
from .state import (
    Address,
    Channel,
    Children,
    ChildSA,
    ChildState,
    SaCounters,
    State,
)

__all__ = ["Address", "ChildSA", "ChildState", "IkeSA", "State"]

# What the daemon's data path counted for a Child SA: (IKE SA name, child id, now) -> usage
UsageFn = Callable[[str, int, float], lifetimes.ChildUsage | None]

# Read per timer and by the SA's state checks: an enum member read through its class costs
# ~0.2 µs in Python 3.11 (EnumType.__getattr__ defeats the attribute cache)
_DEAD = State.DEAD
_ESTABLISHED = State.ESTABLISHED
_NEW = State.NEW


class IkeSA:
    """A sans-I/O IKEv2 SA with PSK authentication. See ``ike/__init__.py``."""

    # A responder holds one per peer (10,000 and more): no per-instance dict
    __slots__ = (
        "_events",
        "_next_child",
        "_out",
        "_queue",
        "_switch_after_response",
        "caches",
        "ch",
        "children",
        "config",
        "counters",
        "half_open_deadline",
        "ike_expire_at",
        "ike_rekey_at",
        "init_request",
        "init_response",
        "initial_contact",
        "initiator",
        "last_heard",
        "local_addr",
        "log",
        "name",
        "nat_detected_local",
        "nat_detected_remote",
        "nat_t",
        "ni",
        "nr",
        "peer_addr",
        "retiring",
        "rng",
        "spi_taken",
        "state",
        "usage",
        "wake",
        "xch",
    )

    def __init__(
        self,
        config: IkeConfig,
        initiator: bool,
        rng: Callable[[int], bytes] = os.urandom,
        name: str | None = None,
        caches: EngineCaches | None = None,
    ) -> None:
        self.config = config
        self.rng = rng
        # The endpoint's lookup tables (ike.caches); a lone SA gets its own
        self.caches = caches if caches is not None else EngineCaches()
        self.initiator = initiator  # original initiator of the first IKE SA
        self.state = _NEW
        self.peer_addr: Address = config.peer_addr
        self.local_addr: Address = config.local_addr
        self.nat_t = False  # floated to UDP 4500 (§2.23): datagrams carry the non-ESP marker
        self.nat_detected_local = False
        self.nat_detected_remote = False
        self.children = Children()  # by child ID (a dict while there are two or more)
        # §2.4: send INITIAL_CONTACT in IKE_AUTH (the endpoint turns it off when
        # another IKE SA with the same peer is already up)
        self.initial_contact = config.initial_contact
        self.counters = SaCounters()  # (a dict to read)
        self.ch = Channel(self._new_spi() if initiator else b"", b"\x00" * 8, initiator)
        # Other IKE SAs of this connection: replaced ones until their DELETE is done,
        # and, during a simultaneous IKE rekey, the peer's new one until it is decided
        self.retiring: tuple[Channel, ...] = ()
        self.xch: Channel | None = None  # the channel of the exchange being processed
        self.name = name or f"{config.name or 'ike'}-{self.ch.spi_i.hex()}"
        # IKE_SA_INIT material kept for AUTH (§2.15)
        self.ni = b""
        self.nr = b""
        self.init_request = b""
        self.init_response = b""
        self.half_open_deadline: float | None = None
        # When the last authenticated message from the peer arrived (§2.4: a
        # liveness check is only needed when nothing has been heard for a while)
        self.last_heard: float | None = None
        # Lifetime deadlines of the current IKE SA (ike.lifetimes; soft, hard)
        self.ike_rekey_at: float | None = None
        self.ike_expire_at: float | None = None
        # The data path's counts per Child SA (volume lifetimes, rekey lazy), or None
        self.usage: UsageFn | None = None
        # Tuples, rebuilt on change: they hold a task, datagram or event or two, and
        # are empty most of an SA's life. The empty tuple is shared; an empty list is
        # 56 bytes per SA (four of them: 224 of an SA's ~4 KB), a deque ~760.
        self._queue: tuple[_t.Task, ...] = ()
        self._out: tuple[tuple[bytes, Address], ...] = ()
        self._events: tuple[ev.IkeEvent, ...] = ()
        self._next_child = 1
        self._switch_after_response: Callable[[], None] | None = None
        # One readable line per message sent or received (no secrets), or None
        self.log: Callable[[str], None] | None = None
        # Set by IkeEndpoint: is an inbound Child SPI already used by another SA?
        self.spi_taken: Callable[[int], bool] = lambda spi: False
        # Set by IkeEndpoint: told that this SA may have news (datagrams, events, SPIs,
        # death), so the endpoint looks at the SAs that changed, not at all of them.
        self.wake: Callable[[IkeSA], None] | None = None

    def __lt__(self, other: IkeSA) -> bool:
        # Orders SAs whose deadlines tie in the endpoint's timer heap (ike.timers):
        # by name, so the order does not depend on addresses in memory
        return self.name < other.name

    @classmethod
    def respond_to(
        cls,
        config: IkeConfig,
        data: bytes,
        addr: Address,
        now: float,
        rng: Callable[[int], bytes] = os.urandom,
        local_addr: Address | None = None,
        log: Callable[[str], None] | None = None,
        caches: EngineCaches | None = None,
    ) -> IkeSA:
        """A responder for the IKE_SA_INIT request ``data`` from ``addr``.

        Check ``sa.dead`` afterwards: a refused request (NO_PROPOSAL_CHOSEN,
        INVALID_KE_PAYLOAD, a malformed message) leaves only the answer in
        ``datagrams_to_send`` and no state (§1.2).
        """
        body = data[4:] if data[:4] == NON_ESP_MARKER else data
        spi_i = body[:8]
        sa = cls(config, False, rng, name=f"{config.name or 'ike'}-{spi_i.hex()}", caches=caches)
        sa.ch.spi_i = spi_i
        sa.log = log
        if local_addr is not None:
            sa.local_addr = local_addr
        # §2.11: answer to the address and port the request came from (a NAT
        # in front of the initiator shows another source port than 500)
        sa.peer_addr = addr
        if data[:4] == NON_ESP_MARKER:
            sa.nat_t = True
        sa.receive_datagram(data, addr, now)
        if sa.state == State.NEW:
            sa.state = State.DEAD  # nothing usable arrived
        return sa

    # --- small helpers used by tasks ---------------------------------------

    def _new_spi(self) -> bytes:
        while True:
            spi = self.rng(8)
            if spi != b"\x00" * 8:
                return spi

    def new_child_spi(self) -> int:
        # RFC 4303 §2.1: SPIs 1-255 are reserved
        while True:
            spi = int.from_bytes(self.rng(4), "big")
            if (
                spi > 255
                and all(c.inbound_spi != spi for c in self.children.values())
                and not self.spi_taken(spi)
            ):
                return spi

    def new_child_id(self) -> int:
        n = self._next_child
        self._next_child += 1
        return n

    def count(self, what: str) -> None:
        self.counters.add(what)

    def emit(self, event: ev.IkeEvent) -> None:
        self._events = (*self._events, event)
        if self.wake is not None:
            self.wake(self)

    def local_spis(self) -> list[bytes]:
        return [self.ch.local_spi] + [c.local_spi for c in self.retiring]

    def retire(self, ch: Channel) -> None:
        """Keep ``ch`` (a replaced IKE SA, or the peer's new one during a simultaneous
        rekey) reachable until it is deleted or decided (§2.18, §2.8.1)."""
        self.retiring = (*self.retiring, ch)

    def unretire(self, ch: Channel) -> None:
        """Forget the retiring channel ``ch`` (if it is one)."""
        self.retiring = tuple(c for c in self.retiring if c is not ch)

    @property
    def old_ch(self) -> Channel | None:
        """The (first) replaced IKE SA still waiting for its DELETE, if any."""
        return self.retiring[0] if self.retiring else None

    @property
    def established(self) -> bool:
        return self.state is _ESTABLISHED

    # Read-only facts of the current IKE SA (after a rekey, the new one), for show

    @property
    def spi_i(self) -> bytes:
        return self.ch.spi_i

    @property
    def spi_r(self) -> bytes:
        return self.ch.spi_r

    @property
    def role(self) -> str:
        """Our part in the current IKE SA, "initiator" or "responder" (the
        initiator of an IKE rekey is the new SA's original initiator, §2.18)."""
        return "initiator" if self.ch.initiator else "responder"

    @property
    def suite(self) -> IkeSuite | None:
        """The negotiated algorithms, None before IKE_SA_INIT completes."""
        return self.ch.suite

    @property
    def dead(self) -> bool:
        return self.state is _DEAD

    def abandon(self, reason: str) -> None:
        """Forget this IKE SA without telling the peer (e.g. after INITIAL_CONTACT, §2.4)."""
        self.die(reason)

    def die(self, reason: str) -> None:
        """Tear down locally: one IkeSaDeleted covers every Child SA."""
        if self.state == State.DEAD:
            return
        was_up = self.state in (State.ESTABLISHED, State.DELETING)
        self.state = State.DEAD
        if self.wake is not None:
            self.wake(self)
        self.ch.pending = None
        self._queue = ()
        if was_up or self.initiator:
            self.emit(ev.IkeSaDeleted(self.name, reason, sorted(self.children)))
        self.children.clear()

    # --- commands --------------------------------------------------------------

    def initiate(self, now: float) -> None:
        """Start IKE_SA_INIT + IKE_AUTH (with the first Child SA)."""
        if not self.initiator or self.state != State.NEW:
            raise RuntimeError("initiate() only once, on an initiator")
        self.queue_task(_t.IkeInit(self), now)

    def rekey_child(self, child_id: int, now: float) -> None:
        if child_id in self.children:
            self.queue_task(_t.ChildRekey(child_id), now)

    def create_child(self, now: float) -> None:
        """An additional Child SA with the configured selectors (CREATE_CHILD_SA)."""
        self.queue_task(_t.ChildCreate(), now)

    def rekey_ike(self, now: float) -> None:
        self.queue_task(_t.IkeRekey(), now)

    def liveness_check(
        self, now: float, timeout: float | None = None, tries: int | None = None
    ) -> None:
        """An empty INFORMATIONAL request (§2.4); no answer after retries → PeerDead.

        ``timeout``/``tries`` (DPD timeout and retries): resend every ``timeout``
        seconds, ``tries`` times, and give up ``timeout`` after the last one; by
        default the configured exponential retransmission applies.
        """
        self.queue_task(_t.Liveness(timeout, tries), now)

    def probe(self, now: float, timeout: float, tries: int) -> None:
        """A liveness check at once, on a short schedule (after an INVALID_SPI hint, §1.5).

        With nothing in flight: an empty INFORMATIONAL (§2.4) ahead of any queued
        task, resent every ``timeout`` seconds, ``tries`` times; no answer
        ``timeout`` after the last → PeerDead. With a request in flight (window
        size 1, §2.3: nothing else may leave) its answer proves liveness just as
        well (§2.4), so that request is resent now on the same short schedule.
        """
        if self.state != State.ESTABLISHED:
            return
        self.count("probes")
        p = self.ch.pending
        if p is None:
            self.queue_task(_t.Liveness(timeout, tries), now, front=True)
            return
        p.task.retransmit_timeout = timeout
        p.task.retransmit_tries = tries
        p.tries = 0
        p.deadline = now + timeout
        self.count("retransmitted")
        self._send(p.packet)

    def delete_child(self, child_id: int, now: float) -> None:
        if child_id in self.children:
            self.queue_task(_t.ChildDelete(child_id), now)

    def delete(self, now: float) -> None:
        """Delete the IKE SA (and so every Child SA) with an INFORMATIONAL DELETE."""
        if self.state in (State.NEW, State.INIT_SENT, State.INIT_DONE):
            self.die("deleted")
            return
        if self.state == State.ESTABLISHED:
            self._queue = ()
            self.queue_task(_t.IkeDelete(), now, front=True)

    def info(self) -> dict[str, object]:
        """Plain, secret-free facts for ``show crypto ...`` (JSON-serialisable)."""
        ch = self.ch
        return {
            "name": self.name,
            "state": self.state,
            "initiator": self.initiator,
            "local": list(self.local_addr),
            "peer": list(self.peer_addr),
            "local_id": str(self.config.local_id),
            "remote_id": str(self.config.remote_id),
            "spi_i": ch.spi_i.hex(),
            "spi_r": ch.spi_r.hex(),
            "algorithms": _t.algorithms(ch.suite) if ch.suite else None,
            "nat_t": self.nat_t,
            "nat_local": self.nat_detected_local,
            "nat_remote": self.nat_detected_remote,
            "next_message_id": ch.next_id,
            "children": [
                {
                    "child_id": c.child_id,
                    "state": c.state,
                    "inbound_spi": f"{c.inbound_spi:08x}",
                    "outbound_spi": f"{c.outbound_spi:08x}",
                    "mode": c.mode,
                    "esn": c.esn,
                    "encryption": f"AES_GCM_16_{c.key_bits}",
                    "local_ts": [str(t) for t in c.local_ts],
                    "remote_ts": [str(t) for t in c.remote_ts],
                    "installed_at": c.installed_at,
                    "rekey_at": c.rekey_at,
                }
                for c in self.children.values()
            ],
            "counters": dict(self.counters),
        }

    def export_keys(self) -> dict[str, str]:
        """The IKE SA keys for Wireshark's ikev2_decryption_table (hex strings).

        The only place IKE keys leave the engine; meant for debugging captures.
        """
        ch = self.ch
        if ch.keys is None or ch.suite is None:
            raise RuntimeError("no keys yet")
        encr, integ = _t.wireshark_names(ch.suite)
        return {
            "spi_i": ch.spi_i.hex(),
            "spi_r": ch.spi_r.hex(),
            "sk_ei": ch.keys.sk_ei.hex(),
            "sk_er": ch.keys.sk_er.hex(),
            "sk_ai": ch.keys.sk_ai.hex(),
            "sk_ar": ch.keys.sk_ar.hex(),
            "encryption": encr,
            "integrity": integ,
        }

    # --- outputs ------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out, self._out = self._out, ()
        return list(out)

    def next_event(self) -> ev.IkeEvent | None:
        if not self._events:
            return None
        event = self._events[0]
        self._events = self._events[1:]
        return event

    def linger(self, now: float) -> float:
        """Until when to keep an IKE SA the peer is expected to delete: twice its give-up time."""
        cfg = self.config
        return now + 2.0 * cfg.retransmit_timeout * float(2 ** (cfg.retransmit_tries + 1))

    def get_timer(self) -> float | None:
        # The earliest of: retransmissions, retiring channels' expiry, the half-open
        # limit, and once established the IKE and Child SA lifetimes. The daemon asks
        # after every datagram, for every SA: one pass, no lists.
        if self.state is _DEAD:
            return None
        t = self.half_open_deadline
        if self.ch.pending is not None:
            t = _earliest(t, self.ch.pending.deadline)
        for c in self.retiring:
            if c.pending is not None:
                t = _earliest(t, c.pending.deadline)
            t = _earliest(t, c.expire_at)
        if self.state is _ESTABLISHED:
            t = _earliest(_earliest(t, self.ike_rekey_at), self.ike_expire_at)
            for child in self.children.values():
                t = _earliest(_earliest(t, child.rekey_at), child.expire_at)
        return t

    def check_usage(self, now: float) -> None:
        """Ask ``usage`` what each Child SA carried and act on its volume lifetimes
        (soft: rekey, hard: delete; ``ike.lifetimes``). The daemon calls it now
        and then (its data path counts; the engine decides)."""
        lifetimes.check_usage(self, now)

    def handle_timer(self, now: float) -> None:
        if self.state == State.DEAD:
            return
        if self.wake is not None:
            self.wake(self)  # e.g. a retired channel (and its SPI) goes
        lifetimes.on_timer(self, now)
        for c in self.retiring:  # (a tuple: unretire replaces it, this loop goes on)
            if c.expire_at is not None and now >= c.expire_at and c.pending is None:
                # the peer never deleted it (or never will, §2.8.2): forget it
                self.count("retired_expired")
                self.unretire(c)
        if self.half_open_deadline is not None and now >= self.half_open_deadline:
            # A responder that never saw IKE_AUTH forgets the half-open SA
            self.count("half_open_expired")
            self.half_open_deadline = None
            self.die("half-open timeout")
            return
        self._retransmit(now)
        if not self.dead:  # (the lifetimes or a give-up above may have ended it)
            self._start_next(now)  # e.g. an IKE rekey that waited for the old SA to go

    # --- exchanges: ike.task_manager (functions of the IKE SA, bound as its methods) ----

    # the task queue
    queue_task = task_manager.queue_task
    drop_queued = task_manager.drop_queued
    retry_task = task_manager.retry_task
    _start_next = task_manager._start_next
    _retransmit = task_manager._retransmit
    # sending and encoding
    send_on = task_manager.send_on
    send_invalid_spi = task_manager.send_invalid_spi
    send_once = task_manager.send_once
    encode = task_manager.encode
    _log = task_manager._log
    _send = task_manager._send
    # receiving
    channel_for = task_manager.channel_for
    receive_datagram = task_manager.receive_datagram
    _receive = task_manager._receive
    _decode = task_manager._decode
    _receive_response = task_manager._receive_response
    _receive_request = task_manager._receive_request
    _forget_init = task_manager._forget_init


def _earliest(a: float | None, b: float | None) -> float | None:
    """The earlier of two optional times (None: no deadline)."""
    if a is None:
        return b
    if b is None or a <= b:
        return a
    return b
