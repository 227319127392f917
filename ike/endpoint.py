"""Many IKE SAs behind one pair of UDP sockets: routing by SPI, responders, COOKIEs.

``IkeEndpoint`` is what the daemon drives: it owns every :class:`IkeSA`,
creates responders for new IKE_SA_INIT requests (after the COOKIE check of
§2.6 once too many SAs are half-open), routes later datagrams by our SPI and
merges the SAs' datagrams, timers and events.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from .buffer import DecodeError
from .caches import EngineCaches
from .config import IkeConfig
from .constants import (
    NON_ESP_MARKER,
    ExchangeType,
    HeaderFlag,
    NotifyType,
)
from .cookies import CookieJar, _cookie_and_nonce
from .events import IkeEvent, InitialContactReceived, InvalidSpiReceived
from .invalid_spi import (
    SourceLimit,
    build_invalid_spi,
    is_unprotected_request,
    unprotected_invalid_spis,
)
from .payloads import (
    NotifyPayload,
    build_plain_message,
    parse_header,
)
from .sa import Address, IkeSA, UsageFn
from .sa_index import ZERO_SPI, SaIndex, _linked

ConfigLookup = Callable[[Address, Address | None], IkeConfig | None]


class IkeEndpoint(SaIndex):
    """Owns IKE SAs; the daemon's single entry point to the IKE engine.

    Everything looked up per datagram, per handshake or per timer is indexed:
    configs by peer address, SAs by SPI, by name, by peer (identity and
    address) and by config, inbound Child SPIs in a set, half-open responders
    counted, and each SA's next deadline in a heap (``ike.timers``); the SAs'
    indexes are kept by :class:`ike.sa_index.SaIndex`. The indexes are brought
    up to date in ``_collect``, which looks only at the SAs that woke up
    (``IkeSA.wake``).
    """

    def __init__(
        self,
        configs: Sequence[IkeConfig] = (),
        *,
        rng: Callable[[int], bytes] = os.urandom,
        find_config: ConfigLookup | None = None,
        cookie_rotation: float = 300.0,
        log: Callable[[str], None] | None = None,
        usage: UsageFn | None = None,
    ) -> None:
        # Decoded identities, selectors, addresses and PSK-derived keys of this
        # endpoint's SAs (ike.caches): never shared with another endpoint
        self.caches = EngineCaches()
        # Handed to every IkeSA: what the data path counted per Child SA (volume
        # lifetimes and rekey lazy, ike.lifetimes); None: volume limits never trigger
        self.usage = usage
        self.configs = list(configs)
        self.rng = rng
        self._find_config = find_config
        self.cookies = CookieJar(rng, cookie_rotation)
        # The live SAs and the indexes they are filed in (ike.sa_index)
        super().__init__()
        # (datagram, peer, our address it leaves from; None: the engine does not know)
        self._out: list[tuple[bytes, Address, Address | None]] = []
        self._events: deque[IkeEvent] = deque()
        self.counters: dict[str, int] = {}
        self.log = log  # handed to every IkeSA: one line per IKE message
        # Bound once: each SA holds it, and a bound method is 72 bytes per SA
        self._spi_taken_fn = self._spi_taken
        # INVALID_SPI (RFC 7296 §1.5): the rate limit of what we send (§2.21.4)
        self.invalid_spi_limit = SourceLimit()
        # Told of every live SA that _collect looked at (the daemon's manager follows
        # peers that moved, per SA rather than over all of them)
        self.on_change: Callable[[IkeSA], None] | None = None

    @property
    def configs(self) -> list[IkeConfig]:
        """The configs responders are matched against: those that answer for their
        peer address, then those another config shadows."""
        more = [c for group in self._cfg_shadowed.values() for c in group]
        return [*self._cfg_by_text.values(), *more]

    @configs.setter
    def configs(self, configs: Sequence[IkeConfig]) -> None:
        """New configs, all of them: indexed by peer address, the first one wins.

        The keys derived from PSKs are dropped: a replaced PSK's must not outlive
        its configuration (those still in use are derived again on demand). A
        reload that changes a few maps uses :meth:`update_configs` instead."""
        self.caches.forget_secrets()
        # peer address (text, packed) -> the config that answers for it
        self._cfg_by_text: dict[str, IkeConfig] = {}
        self._cfg_by_packed: dict[bytes, IkeConfig] = {}
        # peer address (text) -> configs indexed after the one that answers, in
        # order (two maps for one peer: rare, so nothing is kept per config here)
        self._cfg_shadowed: dict[str, list[IkeConfig]] = {}
        self._index_configs(configs)

    def update_configs(
        self, added: Sequence[IkeConfig], removed: Sequence[IkeConfig]
    ) -> list[IkeConfig]:
        """A reload that changed a few maps: ``removed`` (by identity) are no longer
        matched, ``added`` are, after the configs already indexed. The cost follows
        the change, not the number of configs (issue #19 item 7).

        Existing SAs keep the config object they were built with. The keys derived
        from the removed configs' PSKs are dropped (a replaced PSK's must not outlive
        its configuration; a kept config sharing the PSK derives it again on demand).
        Returns the added configs that another config shadows (indexed first under
        the same peer address): the caller decides whether the order is right."""
        psks: set[bytes] = set()
        for c in removed:
            text = c.peer_addr[0]
            more = self._cfg_shadowed.get(text, [])
            if self._cfg_by_text.get(text) is c:
                if more:  # the next one for this address answers from now on
                    self._cfg_by_text[text] = more.pop(0)
                else:
                    del self._cfg_by_text[text]
            elif any(o is c for o in more):
                more[:] = [o for o in more if o is not c]
            else:
                continue  # not indexed (or removed already)
            if not more:
                self._cfg_shadowed.pop(text, None)
            psks.update((c.local_psk, c.peer_psk))
            with contextlib.suppress(ValueError):
                packed = _packed(text)
                if self._cfg_by_packed.get(packed) is c:
                    if text in self._cfg_by_text:
                        self._cfg_by_packed[packed] = self._cfg_by_text[text]
                    else:
                        del self._cfg_by_packed[packed]
        self.caches.forget_psks(psks)
        self._index_configs(added)
        return [c for c in added if self._cfg_by_text[c.peer_addr[0]] is not c]

    def _index_configs(self, configs: Iterable[IkeConfig]) -> None:
        for c in configs:
            text = c.peer_addr[0]
            first = self._cfg_by_text.setdefault(text, c)
            if first is not c:
                more = self._cfg_shadowed.setdefault(text, [])
                if not any(o is c for o in more):
                    more.append(c)
                continue
            try:
                self._cfg_by_packed.setdefault(_packed(text), c)
            except ValueError:
                continue  # not an address: never matches a datagram's source

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def config_for(self, addr: Address, local: Address | None) -> IkeConfig | None:
        if self._find_config is not None:
            return self._find_config(addr, local)
        c = self._cfg_by_text.get(addr[0])
        if c is not None:
            return c
        try:  # another spelling of the same address (e.g. IPv6 with leading zeros)
            return self._cfg_by_packed.get(_packed(addr[0]))
        except ValueError:
            return None

    def half_open(self) -> int:
        """Responder SAs that answered IKE_SA_INIT and wait for IKE_AUTH."""
        if self._dirty:
            self._collect()
        return len(self._half_open)

    def sas_of(self, config: IkeConfig) -> list[IkeSA]:
        """The live SAs built from ``config`` (the object, not an equal one)."""
        if self._dirty:
            self._collect()
        return list(_linked(self._by_config, id(config)))

    # --- commands ------------------------------------------------------------

    def _spi_taken(self, spi: int) -> bool:
        return spi in self._child_spis

    def initiate(self, config: IkeConfig, now: float) -> IkeSA:
        """Start an IKE SA; INITIAL_CONTACT only if no other SA with that peer is alive."""
        sa = IkeSA(config, True, self.rng, caches=self.caches)
        sa.usage = self.usage
        if self._dirty:
            self._collect()
        if (config.remote_id, config.peer_addr[0]) in self._by_peer:
            sa.initial_contact = False
        sa.spi_taken = self._spi_taken_fn
        sa.log = self.log
        self._register(sa)
        sa.initiate(now)
        self._collect()
        return sa

    def find_sa(self, name: str) -> IkeSA | None:
        found = _linked(self._by_name, name)
        return found[0] if found else None

    def sa_by_spis(self, spi_i: bytes, spi_r: bytes) -> IkeSA | None:
        """The live IKE SA one of these IKE SPIs is ours in (an index lookup: the
        trace's summary of each datagram, at any number of SAs)."""
        return self._by_spi.get(spi_i) or self._by_spi.get(spi_r)

    # --- input -----------------------------------------------------------------

    def receive_datagram(
        self, data: bytes, addr: Address, now: float, local_addr: Address | None = None
    ) -> None:
        try:
            body = data[4:] if data[:4] == NON_ESP_MARKER else data
            hdr = parse_header(body)
        except DecodeError:
            self._count("malformed")
            return
        ours = hdr.spi_r if hdr.flags & HeaderFlag.INITIATOR else hdr.spi_i
        sa = self._by_spi.get(ours)
        if sa is None and hdr.exchange == ExchangeType.IKE_SA_INIT and hdr.spi_r == ZERO_SPI:
            sa = self._by_init.get((hdr.spi_i, addr))
            if sa is None and not hdr.flags & HeaderFlag.RESPONSE and hdr.msg_id == 0:
                self._new_responder(data, body, addr, now, local_addr)
                self._collect()
                return
        if sa is None and is_unprotected_request(hdr.next_payload, hdr.exchange, hdr.flags):
            self._unprotected_informational(body, addr)
            return
        if sa is None:
            self._count("unknown_spi")
            return
        sa.receive_datagram(data, addr, now)
        self._collect()

    def _unprotected_informational(self, body: bytes, addr: Address) -> None:
        """§1.5: a one-way message outside any IKE SA. INVALID_SPI for an SPI we send
        on to that address becomes a hint (``InvalidSpiReceived``, unauthenticated);
        anything else is ignored. Never answered (§1.5: that could loop)."""
        spis = unprotected_invalid_spis(body)
        if not spis:
            self._count("unknown_spi" if spis is None else "unprotected_ignored")
            return
        for spi in spis:
            sa = self._by_child_out.get((addr[0], spi))
            children = sa.children.values() if sa is not None and sa.established else ()
            child = next((c for c in children if c.outbound_spi == spi), None)
            if sa is None or child is None:
                self._count("invalid_spi_ignored")  # not an SPI we send on to that peer
                continue
            self._count("invalid_spi_received")
            self._events.append(InvalidSpiReceived(sa.name, spi, child.child_id, False))

    def send_invalid_spi(self, spi: int, peer: Address, now: float, nat_t: bool = False) -> bool:
        """ESP with the unknown SPI ``spi`` came from ``peer`` (§1.5): tell it, at most
        once per second per source address (§2.21.4). Inside our established IKE SA
        with that address if there is one; else in the unprotected one-way message,
        to ``peer`` (the ESP-in-UDP source port, with the non-ESP marker, if
        ``nat_t``). False when the rate limit held it back."""
        if not self.invalid_spi_limit.allow(peer[0], now):
            self._count("invalid_spi_rate_limited")
            return False
        sa = self._by_peer_ip.get(peer[0])
        if sa is not None and sa.established and sa.peer_addr[0] == peer[0]:
            self._count("invalid_spi_sent_protected")
            sa.send_invalid_spi(spi, now)
            self._collect()
            return True
        pkt = build_invalid_spi(spi, self.rng)
        # The ESP's destination (our address) is not known here: the daemon picks one
        self._out.append(((NON_ESP_MARKER + pkt) if nat_t else pkt, peer, None))
        self._count("invalid_spi_sent")
        return True

    def _new_responder(
        self, data: bytes, body: bytes, addr: Address, now: float, local: Address | None
    ) -> None:
        cfg = self.config_for(addr, local)
        if cfg is None:
            self._count("no_config")
            return
        if self.half_open() >= cfg.cookie_threshold:
            try:
                echoed, nonce = _cookie_and_nonce(body)
            except DecodeError:
                self._count("malformed")
                return
            ok = echoed is not None and self.cookies.check(echoed, nonce, addr[0], body[:8], now)
            if not ok:
                # §2.6: answer statelessly with a COOKIE to echo
                cookie = self.cookies.make(nonce, addr[0], body[:8], now)
                pkt = build_plain_message(
                    body[:8],
                    ZERO_SPI,
                    ExchangeType.IKE_SA_INIT,
                    HeaderFlag.RESPONSE,
                    0,
                    [NotifyPayload(NotifyType.COOKIE, cookie)],
                )
                marker = NON_ESP_MARKER if data[:4] == NON_ESP_MARKER else b""
                self._out.append((marker + pkt, addr, local))
                self._count("cookie_sent")
                return
            self._count("cookie_accepted")
        sa = IkeSA.respond_to(cfg, data, addr, now, self.rng, local, self.log, self.caches)
        sa.spi_taken = self._spi_taken_fn
        sa.usage = self.usage
        self._out.extend((d, p, sa.local_addr) for d, p in sa.datagrams_to_send(now))
        if not sa.dead:
            filed = self._register(sa)
            filed.init = (sa.ch.spi_i, addr)
            self._by_init[filed.init] = sa
        else:
            self._count("refused_init")
            self._fold(sa)
            while (e := sa.next_event()) is not None:
                self._events.append(e)

    def handle_timer(self, now: float) -> None:
        """Run the timers of the SAs due at ``now`` (only those: a heap, not a sweep)."""
        if self._dirty:
            self._collect()
        for sa in self.timers.pop_due(now):
            if sa.wake is None:
                continue  # forgotten meanwhile
            sa.handle_timer(now)
            # Its next deadline, and its new Child SPIs indexed before the next SA
            # picks one (_spi_taken)
            self._dirty[sa] = None
            self._collect()

    # --- outputs ---------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """What to send, as (datagram, peer): :meth:`datagrams_from` without our address."""
        return [(d, p) for d, p, _ in self.datagrams_from(now)]

    def datagrams_from(self, now: float) -> list[tuple[bytes, Address, Address | None]]:
        """What to send, as (datagram, peer, our address): an SA's datagrams leave from
        its ``local_addr`` (a responder's: where the peer's request arrived). RFC 7296
        §2.11: a response "MUST specify the address and port at which the request was
        received as the source address and port", which matters with several local
        addresses. None for the unprotected INVALID_SPI (§1.5): the caller picks one."""
        if self._dirty:
            self._collect()
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        if self._dirty:
            self._collect()
        return self.timers.next()

    def next_event(self) -> IkeEvent | None:
        if self._dirty:
            self._collect()
        return self._events.popleft() if self._events else None

    def _initial_contact(self, new: IkeSA) -> None:
        """§2.4: the peer restarted; every other IKE SA with it is stale."""
        for sa in list(_linked(self._by_peer, (new.config.remote_id, new.peer_addr[0]))):
            if (
                sa is not new
                and sa.established  # half-open SAs are not authenticated yet
                and sa.config.remote_id == new.config.remote_id
                and sa.peer_addr[0] == new.peer_addr[0]
            ):
                self._count("replaced_by_initial_contact")
                sa.abandon("replaced (INITIAL_CONTACT)")
                while (e := sa.next_event()) is not None:
                    self._events.append(e)

    def _fold(self, sa: IkeSA) -> None:
        """Keep the counters of an SA that goes away (``sa_`` prefix)."""
        for k, v in sa.counters.items():
            self.counters["sa_" + k] = self.counters.get("sa_" + k, 0) + v

    def _collect(self) -> None:
        """Pull datagrams and events from the SAs that changed, re-index them, drop the
        dead ones."""
        dirty = self._dirty
        while dirty:
            sa = next(iter(dirty))
            del dirty[sa]
            if sa.wake is None:
                continue  # already forgotten
            self._out.extend((d, p, sa.local_addr) for d, p in sa.datagrams_to_send(0.0))
            while (e := sa.next_event()) is not None:
                self._events.append(e)
                if isinstance(e, InitialContactReceived):
                    self._initial_contact(sa)
            if sa.dead:
                self._fold(sa)
                self._forget(sa)
                continue
            self._index(sa)
            if self.on_change is not None:
                self.on_change(sa)


def _packed(text: str) -> bytes:
    """An address as bytes (a datagram's source may be spelled another way than
    the config's: IPv6 zeros, an IPv4-mapped form is not the same address)."""
    return ipaddress.ip_address(text).packed
