"""Many IKE SAs behind one pair of UDP sockets: routing by SPI, responders, COOKIEs.

``IkeEndpoint`` is what the daemon drives: it owns every :class:`IkeSA`,
creates responders for new IKE_SA_INIT requests (after the COOKIE check of
§2.6 once too many SAs are half-open), routes later datagrams by our SPI and
merges the SAs' datagrams, timers and events.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections import deque
from collections.abc import Callable, Sequence

from .buffer import DecodeError
from .config import IkeConfig
from .constants import NON_ESP_MARKER, ExchangeType, HeaderFlag, NotifyType
from .events import IkeEvent, InitialContactReceived, InvalidSpiReceived
from .invalid_spi import (
    SourceLimit,
    build_invalid_spi,
    is_unprotected_request,
    unprotected_invalid_spis,
)
from .payloads import (
    NoncePayload,
    NotifyPayload,
    build_plain_message,
    find,
    parse_header,
    parse_message,
)
from .sa import Address, IkeSA, State
from .state import packed_ip

ZERO_SPI = b"\x00" * 8
ConfigLookup = Callable[[Address, Address | None], IkeConfig | None]


class CookieJar:
    """Stateless COOKIEs (§2.6): Cookie = VersionIDofSecret | Hash(Ni | IPi | SPIi | secret).

    The secret is replaced every ``rotation`` seconds; cookies made with the
    previous secret stay valid for one more period.
    """

    def __init__(self, rng: Callable[[int], bytes], rotation: float = 300.0) -> None:
        self._rng = rng
        self.rotation = rotation
        self._version = 0
        self._secrets: dict[int, bytes] = {}
        self._rotated_at: float | None = None

    def _rotate(self, now: float) -> None:
        if self._rotated_at is None or now - self._rotated_at >= self.rotation:
            self._version = (self._version + 1) & 0xFFFFFFFF
            self._secrets = {
                self._version: self._rng(32),
                **{k: v for k, v in self._secrets.items() if k == self._version - 1},
            }
            self._rotated_at = now

    def _make(self, version: int, ni: bytes, ip: str, spi_i: bytes) -> bytes | None:
        secret = self._secrets.get(version)
        if secret is None:
            return None
        digest = hashlib.sha256(ni + ipaddress.ip_address(ip).packed + spi_i + secret).digest()
        return version.to_bytes(4, "big") + digest

    def make(self, ni: bytes, ip: str, spi_i: bytes, now: float) -> bytes:
        self._rotate(now)
        cookie = self._make(self._version, ni, ip, spi_i)
        assert cookie is not None
        return cookie

    def check(self, cookie: bytes, ni: bytes, ip: str, spi_i: bytes, now: float) -> bool:
        self._rotate(now)
        if len(cookie) != 36:
            return False
        want = self._make(int.from_bytes(cookie[:4], "big"), ni, ip, spi_i)
        return want is not None and hmac.compare_digest(want, cookie)


class IkeEndpoint:
    """Owns IKE SAs; the daemon's single entry point to the IKE engine."""

    def __init__(
        self,
        configs: Sequence[IkeConfig] = (),
        *,
        rng: Callable[[int], bytes] = os.urandom,
        find_config: ConfigLookup | None = None,
        cookie_rotation: float = 300.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.configs = list(configs)
        self.rng = rng
        self._find_config = find_config
        self.cookies = CookieJar(rng, cookie_rotation)
        self.sas: list[IkeSA] = []
        self._by_spi: dict[bytes, IkeSA] = {}
        self._by_init: dict[tuple[bytes, Address], IkeSA] = {}
        self._by_name: dict[str, IkeSA] = {}
        # What each live SA is indexed under in _by_spi, and its _by_init key
        self._spis: dict[IkeSA, tuple[bytes, ...]] = {}
        self._init_key: dict[IkeSA, tuple[bytes, Address]] = {}
        # SAs that may have news since the last _collect (IkeSA.wake), in that order:
        # only those are looked at, so a message costs the same with 10 or 10,000 SAs.
        self._dirty: dict[IkeSA, None] = {}
        self._out: list[tuple[bytes, Address]] = []
        self._events: deque[IkeEvent] = deque()
        self.counters: dict[str, int] = {}
        self.log = log  # handed to every IkeSA: one line per IKE message
        # INVALID_SPI (RFC 7296 §1.5): the rate limit of what we send (§2.21.4), and
        # the Child SAs by (peer address, SPI we send on) and the established SAs by
        # peer address, for what we receive and send: O(1) whatever the number of SAs
        self.invalid_spi_limit = SourceLimit()
        self._by_child_out: dict[tuple[str, int], IkeSA] = {}
        self._child_keys: dict[IkeSA, tuple[tuple[str, int], ...]] = {}
        self._by_peer_ip: dict[str, IkeSA] = {}

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def config_for(self, addr: Address, local: Address | None) -> IkeConfig | None:
        if self._find_config is not None:
            return self._find_config(addr, local)
        for c in self.configs:
            if packed_ip(c.peer_addr[0]) == packed_ip(addr[0]):
                return c
        return None

    # --- commands ------------------------------------------------------------

    def _spi_taken(self, spi: int) -> bool:
        return any(c.inbound_spi == spi for s in self.sas for c in s.children.values())

    def initiate(self, config: IkeConfig, now: float) -> IkeSA:
        """Start an IKE SA; INITIAL_CONTACT only if no other SA with that peer is alive."""
        sa = IkeSA(config, True, self.rng)
        if any(
            s.config.remote_id == config.remote_id and s.peer_addr[0] == config.peer_addr[0]
            for s in self.sas
        ):
            sa.initial_contact = False
        sa.spi_taken = self._spi_taken
        sa.log = self.log
        self._register(sa)
        sa.initiate(now)
        self._collect()
        return sa

    def find_sa(self, name: str) -> IkeSA | None:
        sa = self._by_name.get(name)
        if sa is None:
            # Two live SAs may share a name (the peer chose the same SPIi twice, from
            # two addresses): the one registered first is indexed; after it went,
            # the other is found here (and indexed).
            sa = next((s for s in self.sas if s.name == name), None)
            if sa is not None:
                self._by_name[name] = sa
        return sa

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
        self._out.append(((NON_ESP_MARKER + pkt) if nat_t else pkt, peer))
        self._count("invalid_spi_sent")
        return True

    def _new_responder(
        self, data: bytes, body: bytes, addr: Address, now: float, local: Address | None
    ) -> None:
        cfg = self.config_for(addr, local)
        if cfg is None:
            self._count("no_config")
            return
        half_open = sum(1 for s in self.sas if not s.initiator and s.state == State.INIT_DONE)
        if half_open >= cfg.cookie_threshold:
            try:
                _, payloads, _ = parse_message(body)
            except DecodeError:
                self._count("malformed")
                return
            nonce = find(payloads, NoncePayload)
            if nonce is None:
                self._count("malformed")
                return
            first = payloads[0] if payloads else None
            ok = (
                isinstance(first, NotifyPayload)
                and first.notify_type == NotifyType.COOKIE
                and self.cookies.check(first.data, nonce.nonce, addr[0], body[:8], now)
            )
            if not ok:
                # §2.6: answer statelessly with a COOKIE to echo
                cookie = self.cookies.make(nonce.nonce, addr[0], body[:8], now)
                pkt = build_plain_message(
                    body[:8],
                    ZERO_SPI,
                    ExchangeType.IKE_SA_INIT,
                    HeaderFlag.RESPONSE,
                    0,
                    [NotifyPayload(NotifyType.COOKIE, cookie)],
                )
                marker = NON_ESP_MARKER if data[:4] == NON_ESP_MARKER else b""
                self._out.append((marker + pkt, addr))
                self._count("cookie_sent")
                return
            self._count("cookie_accepted")
        sa = IkeSA.respond_to(cfg, data, addr, now, self.rng, local, self.log)
        sa.spi_taken = self._spi_taken
        self._out.extend(sa.datagrams_to_send(now))
        if not sa.dead:
            self._register(sa)
            self._by_init[(sa.ch.spi_i, addr)] = sa
            self._init_key[sa] = (sa.ch.spi_i, addr)
        else:
            self._count("refused_init")
            self._fold(sa)
            while (e := sa.next_event()) is not None:
                self._events.append(e)

    def handle_timer(self, now: float) -> None:
        for sa in list(self.sas):  # (IkeSA.handle_timer wakes the SA for _collect)
            t = sa.get_timer()
            if t is not None and t <= now:
                sa.handle_timer(now)
        self._collect()

    # --- outputs ---------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        if self._dirty:
            self._collect()
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        best: float | None = None
        for sa in self.sas:
            t = sa.get_timer()
            if t is not None and (best is None or t < best):
                best = t
        return best

    def next_event(self) -> IkeEvent | None:
        if self._dirty:
            self._collect()
        return self._events.popleft() if self._events else None

    def _initial_contact(self, new: IkeSA) -> None:
        """§2.4: the peer restarted; every other IKE SA with it is stale."""
        for sa in self.sas:
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

    def _register(self, sa: IkeSA) -> None:
        """A new live SA: listed, found by name, and looked at by the next _collect."""
        self.sas.append(sa)
        self._by_name.setdefault(sa.name, sa)
        sa.wake = self._wake
        self._dirty[sa] = None

    def _wake(self, sa: IkeSA) -> None:
        self._dirty[sa] = None

    def _forget(self, sa: IkeSA) -> None:
        """A dead SA leaves the list and every index."""
        sa.wake = None
        self.sas.remove(sa)
        for spi in self._spis.pop(sa, ()):
            if self._by_spi.get(spi) is sa:
                del self._by_spi[spi]
        key = self._init_key.pop(sa, None)
        if key is not None and self._by_init.get(key) is sa:
            del self._by_init[key]
        if self._by_name.get(sa.name) is sa:
            del self._by_name[sa.name]
        for ck in self._child_keys.pop(sa, ()):
            if self._by_child_out.get(ck) is sa:
                del self._by_child_out[ck]
        if self._by_peer_ip.get(sa.peer_addr[0]) is sa:
            del self._by_peer_ip[sa.peer_addr[0]]

    def _collect(self) -> None:
        """Pull datagrams and events from the SAs that changed, re-index their SPIs,
        drop the dead ones."""
        dirty = self._dirty
        while dirty:
            sa = next(iter(dirty))
            del dirty[sa]
            if sa.wake is None:
                continue  # already forgotten
            self._out.extend(sa.datagrams_to_send(0.0))
            while (e := sa.next_event()) is not None:
                self._events.append(e)
                if isinstance(e, InitialContactReceived):
                    self._initial_contact(sa)
            if sa.dead:
                self._fold(sa)
                self._forget(sa)
                continue
            spis = tuple(spi for spi in sa.local_spis() if spi and spi != ZERO_SPI)
            old = self._spis.get(sa, ())
            if spis != old:
                for spi in old:
                    if spi not in spis and self._by_spi.get(spi) is sa:
                        del self._by_spi[spi]
                for spi in spis:
                    self._by_spi[spi] = sa
                self._spis[sa] = spis
            self._index_children(sa)

    def _index_children(self, sa: IkeSA) -> None:
        """(peer address, outbound Child SPI) → SA, and peer address → SA: what an
        INVALID_SPI is looked up by (§1.5). Only for SAs that changed (_collect)."""
        peer = sa.peer_addr[0]
        keys = tuple((peer, c.outbound_spi) for c in sa.children.values())
        old = self._child_keys.get(sa, ())
        if keys != old:
            for key in old:
                if key not in keys and self._by_child_out.get(key) is sa:
                    del self._by_child_out[key]
            for key in keys:
                self._by_child_out[key] = sa
            self._child_keys[sa] = keys
        if keys and sa.established:
            self._by_peer_ip[peer] = sa
