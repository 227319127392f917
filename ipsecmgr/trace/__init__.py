"""``ipsecmgr trace``: structured events with the reference's step numbers.

The package: this module is the daemon side (the :class:`Tracer` hook, event
format, filters, subscriptions); the client side is :mod:`ipsecmgr.trace.cli`
(the command), :mod:`~ipsecmgr.trace.io` (control-socket client, JSON lines
files), :mod:`~ipsecmgr.trace.render` (timelines, inferred steps),
:mod:`~ipsecmgr.trace.pcap` (pcap and Wireshark key files) and
:mod:`~ipsecmgr.trace.svg` (the sequence diagram).

The data path and the manager call a hook ``trace(step, event, packet,
**fields)`` at every stage; the hook is ``None`` unless someone is tracing, so
tracing off costs one ``is not None`` branch per stage. The daemon installs a
:class:`Tracer` on them while at least one client is subscribed over the
control socket (``ipsecmgr trace``) and removes it when the last one leaves.

An event is a flat JSON object::

    {"t": 1234.567890,            monotonic seconds (time.monotonic)
     "wall": 1764110000.123,      the same instant as epoch seconds (for pcap)
     "step": "3a",                the reference's step ("ike" for IKE events off the
                                  packet path)
     "event": "acl_match",        what happened
     "flow": "6c1d0e2a",          flow id: the same for both directions of a 5-tuple
     "five_tuple": "tcp 192.0.2.1:40001 > 203.0.113.49:49",
     "proto": 6, "src": ..., "dst": ..., "sport": ..., "dport": ...,
     "tcp_flags": "S", "tcp_seq": 123, "len": 60,
     "packet": "<hex>",           the clear packet (only where it is read from or
                                  written to the TUN, or dropped in clear)
     ...fields of the stage: crypto_map, rule, spi, seq, reason, peer, wire (hex ESP/IKE)}

How events find their flow: a clear packet's 5-tuple gives the flow id
(direction-independent, so the SYN-ACK joins the SYN's flow). A step-2 event
waits for the packet's step 3 to learn its crypto map (for filters). Inbound ESP is
only a SPI at steps 8 and 9, so those events are held back until step 10
decrypts the packet and then emitted with its flow; if step 9 or 10 drops the
packet, they go to the flow ``spi:<SPI>``. IKE exchanges triggered by a packet
(step 4) join that packet's flow until the Child SA is installed; later IKE
traffic goes to ``ike:<crypto map>``.

Secrets: events carry packets (a TACACS+ body is obfuscated with the TACACS+
key, not encrypted) but never keys. Keys leave the daemon only through the
separate ``trace-keys`` command, for ``--wireshark-keys``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import socket
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ike import events as ev
from ike.summary import SaLookup, summarize

Event = dict[str, Any]

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 50: "esp", 58: "icmp6"}
_TCP_FLAGS = "FSRPAUEC"  # bit 0 (FIN) .. bit 7 (CWR)
QUEUE_SIZE = 10000  # events held per subscriber before it is counted as lost

#: The events that carry the packet's bytes: where it enters or leaves the clear
#: side, or dies there (the other stages of the same packet only add fields).
_PACKET_EVENTS = {"tun_read", "tun_write", "policy_drop", "classify_drop"}
#: IKE events after which IKE no longer belongs to the packet that triggered it.
_TRIGGER_ENDS = {"child_sa_installed", "ike_sa_deleted", "ike_auth_failed",
                 "ike_exchange_failed", "peer_dead"}  # fmt: skip

#: The steps whose events have no clear packet yet (inbound ESP before decryption).
_INBOUND_PENDING = {("8", "esp_received"), ("9", "saflow_match")}


def tcp_flag_text(flags: int) -> str:
    return "".join(c for i, c in enumerate(_TCP_FLAGS) if flags & (1 << i))


def packet_info(packet: bytes) -> Event:
    """5-tuple, length and TCP flags of a clear IPv4/IPv6 packet; ``{}`` if unparsable."""
    try:
        version = packet[0] >> 4
        if version == 4:
            hlen, proto = (packet[0] & 0x0F) * 4, packet[9]
            src, dst = socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20])
        elif version == 6:
            hlen, proto = 40, packet[6]
            src = socket.inet_ntop(socket.AF_INET6, packet[8:24])
            dst = socket.inet_ntop(socket.AF_INET6, packet[24:40])
        else:
            return {}
        info: Event = {"proto": proto, "src": src, "dst": dst, "len": len(packet)}
        if proto in (6, 17) and len(packet) >= hlen + 4:
            info["sport"], info["dport"] = struct.unpack_from("!HH", packet, hlen)
        if proto == 6 and len(packet) >= hlen + 14:
            info["tcp_seq"] = struct.unpack_from("!I", packet, hlen + 4)[0]
            info["tcp_flags"] = tcp_flag_text(packet[hlen + 13])
            info["tcp_payload"] = max(len(packet) - hlen - (packet[hlen + 12] >> 4) * 4, 0)
    except (IndexError, ValueError, OSError, struct.error):
        return {}
    return info


def five_tuple_text(info: Mapping[str, Any]) -> str:
    proto = PROTO_NAMES.get(info["proto"], str(info["proto"]))
    if "sport" in info:
        return f"{proto} {info['src']}:{info['sport']} > {info['dst']}:{info['dport']}"
    return f"{proto} {info['src']} > {info['dst']}"


def flow_id(info: Mapping[str, Any]) -> str:
    """Same id for both directions: the two endpoints are sorted."""
    a = (info["src"], info.get("sport", 0))
    b = (info["dst"], info.get("dport", 0))
    lo, hi = sorted((a, b))
    key = f"{info['proto']}|{lo[0]}|{lo[1]}|{hi[0]}|{hi[1]}".encode()
    return hashlib.blake2s(key, digest_size=4).hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, tuple):
        return list(value)
    return value


# -- filters -------------------------------------------------------------------------

FILTER_KEYS = ("crypto_map", "spi", "proto", "host", "port", "src", "dst", "sport", "dport", "flow")


@dataclass
class TraceFilter:
    """``--filter key=value`` terms, all of which must hold.

    Keys: ``crypto_map`` (or ``crypto-map``, ``map``), ``spi`` (0x.. or decimal),
    ``proto`` (tcp, udp, icmp or a number), ``host``/``port`` (either end),
    ``src``, ``dst``, ``sport``, ``dport`` (one direction of the 5-tuple),
    ``flow`` (a flow id). An event that carries none of a term's attributes
    (IKE events, ESP not yet decrypted) passes when its flow matched before.
    """

    terms: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, items: Iterable[str]) -> TraceFilter:
        terms: dict[str, str] = {}
        for item in items:
            for part in item.split(","):
                if not part.strip():
                    continue
                key, sep, value = part.partition("=")
                key = key.strip().replace("-", "_")
                key = "crypto_map" if key == "map" else key
                if not sep or key not in FILTER_KEYS or not value.strip():
                    raise ValueError(
                        f"bad filter {part!r}: use key=value with key one of "
                        + ", ".join(FILTER_KEYS)
                    )
                terms[key] = value.strip()
        return cls.from_dict(terms)

    @classmethod
    def from_dict(cls, terms: Mapping[str, Any]) -> TraceFilter:
        out = cls({str(k): str(v) for k, v in terms.items()})
        for key, value in out.terms.items():
            if key not in FILTER_KEYS:
                raise ValueError(f"unknown filter key {key!r}")
            if key in ("spi", "port", "sport", "dport"):
                int(value, 0)  # ValueError names the bad value
            if key in ("host", "src", "dst"):
                ipaddress.ip_address(value)
        return out

    def __bool__(self) -> bool:
        return bool(self.terms)

    def _term(self, key: str, value: str, e: Event) -> bool:
        if key == "crypto_map":
            return e.get("crypto_map") == value
        if key == "spi":
            want = int(value, 0)
            return want in (e.get("spi"), e.get("spi_in"), e.get("spi_out"))
        if key == "flow":
            return e.get("flow") == value
        if key == "proto":
            if "proto" not in e:
                return False
            names = {v: k for k, v in PROTO_NAMES.items()}
            return bool(e["proto"] == (names[value] if value in names else int(value, 0)))
        if key in ("host", "src", "dst"):
            want_ip = ipaddress.ip_address(value)
            sides = ("src", "dst") if key == "host" else (key,)
            return any(s in e and ipaddress.ip_address(e[s]) == want_ip for s in sides)
        sides = ("sport", "dport") if key == "port" else (key,)
        return any(e.get(s) == int(value, 0) for s in sides)

    def match(self, e: Event, matched_flows: set[str]) -> bool:
        if all(self._term(k, v, e) for k, v in self.terms.items()):
            if e.get("flow"):
                matched_flows.add(e["flow"])
            return True
        return e.get("flow") in matched_flows


# -- subscribers -----------------------------------------------------------------------


class Subscription:
    """One client's stream: filter, rate limit and a bounded queue (an async iterator)."""

    def __init__(self, tracer: Tracer, tfilter: TraceFilter, rate: float | None) -> None:
        self.tracer = tracer
        self.filter = tfilter
        self.rate = rate
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE_SIZE)
        self.matched_flows: set[str] = set()
        self.lost = 0
        self._tokens = rate or 0.0
        self._last = time.monotonic()
        self.closed = False

    def offer(self, e: Event) -> None:
        if self.filter and not self.filter.match(e, self.matched_flows):
            return
        if self.rate is not None:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens < 1.0:
                self.lost += 1
                return
            self._tokens -= 1.0
        if self.lost and self.queue.qsize() < QUEUE_SIZE - 1:
            self.queue.put_nowait({"t": e["t"], "step": "-", "event": "lost", "count": self.lost})
            self.lost = 0
        try:
            self.queue.put_nowait(e)
        except asyncio.QueueFull:
            self.lost += 1

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.tracer.unsubscribe(self)


class Traced(Protocol):
    """What the tracer switches on and off: the data path (``SaSink.set_trace``), the
    manager and the TLS service."""

    def set_trace(self, hook: Tracer | None) -> None: ...


@dataclass
class Peer:
    """What the tracer knows about a configured peer, for outer headers and map names."""

    local: str
    crypto_map: str


def peers_from_config(config: Any) -> dict[str, Peer]:
    """Peer address -> (our address, crypto map), from an :class:`ipsecmgr.config.Config`."""
    return {str(m.peer): Peer(str(m.local_address), n) for n, m in config.crypto_maps.items()}


class PeerTable:
    """:func:`peers_from_config` kept up to date by a reload, per touched crypto map
    (SIGHUP costs O(changed), issue #19 item 7): ``peers`` is the table the
    :class:`Tracer` reads. A peer address of two maps names the last one in the
    file; only when a touched map has such a peer is the table built again (the
    maps per shared address are counted; nothing is kept per unshared one)."""

    def __init__(self, config: Any) -> None:
        self._build(config)

    def _build(self, config: Any) -> None:
        self.peers = peers_from_config(config)
        self._shared: dict[str, int] = {}
        if len(self.peers) < len(config.crypto_maps):
            counts: dict[str, int] = {}
            for m in config.crypto_maps.values():
                counts[str(m.peer)] = counts.get(str(m.peer), 0) + 1
            self._shared = {a: k for a, k in counts.items() if k > 1}

    def update(self, old: Any, new: Any, touched: Iterable[str]) -> bool:
        """The maps ``touched`` (changed, added, removed) from ``old`` to ``new``.
        Returns True when the table was built again (a peer of two maps)."""
        gone = [(str(m.peer), n) for n in touched if (m := old.crypto_maps.get(n)) is not None]
        came = [
            (str(m.peer), str(m.local_address), n)
            for n in touched
            if (m := new.crypto_maps.get(n)) is not None
        ]
        if not any(a in self._shared for a, *_ in (*gone, *came)):
            for addr, name in gone:  # (not shared: the entry is this map's)
                if (p := self.peers.get(addr)) is not None and p.crypto_map == name:
                    del self.peers[addr]
            for addr, local, name in came:
                if addr in self.peers:
                    break  # another map has this peer: now shared
                self.peers[addr] = Peer(local, name)
            else:
                return False
        self._build(new)
        return True


class Tracer:
    """The hook installed on the data path and the manager while tracing is on."""

    def __init__(self, targets: Iterable[Traced] = (), peers: Mapping[str, Peer] = {}) -> None:
        self.targets = list(targets)
        self.peers = dict(peers)
        self.subscribers: list[Subscription] = []
        # Per source (a split worker, "" for this process): events waiting for the
        # next stage of the same packet, which only the same process reports.
        self._pending: dict[str, list[Event]] = {}
        self._map_flow: dict[str, str] = {}  # crypto map -> flow whose packet triggered IKE
        self._wall_offset = time.time() - time.monotonic()

    # -- subscription (the control command "trace") ----------------------------------

    def subscribe(self, request: Mapping[str, Any]) -> Subscription:
        """Register at once (so no event is missed after the client got its answer)."""
        tfilter = TraceFilter.from_dict(request.get("filter") or {})
        rate = request.get("rate")
        sub = Subscription(self, tfilter, float(rate) if rate else None)
        self.subscribers.append(sub)
        self._install(self)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)
        if not self.subscribers:
            self._install(None)

    def close_all(self) -> None:
        for sub in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)  # ends the client's stream
            sub.close()

    def _install(self, hook: Tracer | None) -> None:
        for t in self.targets:
            t.set_trace(hook)
        if hook is None:
            self._pending.clear()
            self._map_flow.clear()

    # -- the hook -----------------------------------------------------------------------

    def __call__(
        self,
        step: str,
        event: str,
        packet: bytes | None,
        *,
        at: float | None = None,
        source: str = "",
        **fields: Any,
    ) -> None:
        """One stage. ``at``: when it happened (monotonic; default now), for events a
        split worker reports; ``source``: which process reported it."""
        t = time.monotonic() if at is None else at
        e: Event = {"t": t, "wall": t + self._wall_offset, "step": step, "event": event}
        if packet is not None:
            info = packet_info(packet)
            if info:
                e["flow"] = flow_id(info)
                e["five_tuple"] = five_tuple_text(info)
                e.update(info)
            else:
                e["flow"] = "unparsed"
            if event in _PACKET_EVENTS:
                e["packet"] = bytes(packet).hex()
        for key, value in fields.items():
            if key == "src":  # step 8: the outer source of the ESP packet
                e["outer_src"] = socket.inet_ntop(
                    socket.AF_INET if len(value) == 4 else socket.AF_INET6, value
                )
            elif key == "peer" and isinstance(value, tuple):
                e["peer"], e["peer_port"] = value[0], value[1]
            else:
                e[key] = _jsonable(value)
        self._annotate(e)
        if (packet is None and (step, event) in _INBOUND_PENDING) or step == "2":
            # Held until the next stage of the same packet says more: the flow of
            # inbound ESP (step 10), the crypto map of a packet read from the TUN (3a).
            self._pending.setdefault(source, []).append(e)
            return
        self._emit(e, source)

    def _annotate(self, e: Event) -> None:
        """Crypto map and local address from the configured peer (pcap outer headers)."""
        addr = e.get("peer") or e.get("outer_src")
        peer = self.peers.get(addr) if isinstance(addr, str) else None
        if peer is not None:
            e.setdefault("crypto_map", peer.crypto_map)
            e.setdefault("local", peer.local)

    def _emit(self, e: Event, source: str = "") -> None:
        flow = e.get("flow")
        cmap = e.get("crypto_map")
        if e["step"] == "4" and e["event"] == "ike_triggered" and flow and cmap:
            self._map_flow[cmap] = flow
        if flow is None:
            if e["step"] == "ike" and cmap in self._map_flow:
                # IKE while the tunnel forms for a packet: part of that flow's step 4
                e["step"] = "4"
                e["flow"] = self._map_flow[cmap]
                if e["event"] in _TRIGGER_ENDS:
                    del self._map_flow[cmap]
            elif e["step"] == "ike":
                e["flow"] = f"ike:{cmap or '?'}"
            elif "spi" in e:
                e["flow"] = f"spi:{int(e['spi']):08x}"
        pending = self._pending.pop(source, None)
        if pending:
            for p in pending:
                if not p.get("flow"):
                    p["flow"] = e.get("flow") or _spi_flow(p)
                for key in ("crypto_map", "spi", "five_tuple"):
                    if key in e:
                        p.setdefault(key, e[key])
                self._deliver(p)
        self._deliver(e)

    def _deliver(self, e: Event) -> None:
        for sub in self.subscribers:
            sub.offer(e)


def _spi_flow(e: Event) -> str:
    wire = e.get("wire")
    if isinstance(wire, str) and len(wire) >= 8:
        return f"spi:{wire[:8]}"
    return "spi:?"


# -- helpers for the manager (IKE side) -------------------------------------------------


def trace_ike_datagram(
    tr: Any, direction: str, data: bytes, peer: tuple[str, int], find: SaLookup | None
) -> None:
    """Step 4 (or ``ike``): one IKE message sent or received, with its payload summary
    (``find``: the IKE SA by SPIs, whose keys open the SK payload)."""
    s = summarize(data, find)
    fields: Event = {"peer": peer, "wire": data, "size": len(data)}
    if s is None:
        tr("ike", f"ike_{direction}", None, summary="not an IKE message", **fields)
        return
    if s.sa_name:
        fields["crypto_map"] = s.sa_name.rsplit("-", 1)[0]
    tr(
        "ike",
        f"ike_{direction}",
        None,
        exchange=s.exchange,
        response=s.response,
        msg_id=s.msg_id,
        payloads=s.payload_text,
        ike_spi_i=s.spi_i,
        ike_spi_r=s.spi_r,
        summary=str(s),
        **fields,
    )


def trace_ike_event(tr: Any, event: ev.IkeEvent, crypto_map: str) -> None:
    """IKE events: SA up, rekeyed, deleted, peer dead (never any key)."""
    f: Event = {"crypto_map": crypto_map}
    if isinstance(event, ev.IkeSaEstablished):
        name = "ike_sa_up"
        f.update(ike_spi_i=event.spi_i.hex(), ike_spi_r=event.spi_r.hex())
        f.update(algorithms=event.algorithms, remote_id=event.remote_id)
    elif isinstance(event, ev.IkeSaRekeyed):
        name = "ike_sa_rekeyed"
        f.update(ike_spi_i=event.spi_i.hex(), ike_spi_r=event.spi_r.hex())
    elif isinstance(event, ev.ChildSaInstalled):
        name = "child_sa_installed"
        f.update(spi_in=event.inbound_spi, spi_out=event.outbound_spi, mode=event.mode)
        if event.rekeyed_from is not None:
            f["rekeyed_from"] = event.rekeyed_from
    elif isinstance(event, ev.ChildSaRekeyed):
        name = "child_sa_rekeyed"
        f.update(old_child=event.old_child_id, new_child=event.new_child_id)
    elif isinstance(event, ev.ChildSaDeleted):
        name = "child_sa_deleted"
        f.update(spi_in=event.inbound_spi, spi_out=event.outbound_spi, reason=event.reason)
    elif isinstance(event, ev.IkeSaDeleted):
        name, f["reason"] = "ike_sa_deleted", event.reason
    elif isinstance(event, ev.PeerDead):
        name = "peer_dead"
    elif isinstance(event, ev.InvalidSpiReceived):  # RFC 7296 §1.5: a hint unless authenticated
        name = "invalid_spi"
        f.update(spi_out=event.spi, authenticated=event.authenticated)
    elif isinstance(event, ev.AuthenticationFailed):
        name, f["reason"] = "ike_auth_failed", event.detail
    elif isinstance(event, ev.ExchangeFailed):
        name = "ike_exchange_failed"
        f.update(exchange=event.exchange, reason=event.notify, by_peer=event.by_peer)
    else:
        name = type(event).__name__
    tr("ike", name, None, **f)
