"""The IKE side of IpsecMgr: crypto maps, their IKE SAs and Child SAs.

The manager owns one :class:`MapState` per crypto map. It turns a PROTECT
verdict without a Child SA into an IKE initiation (reference step 4), drops or
queues that first packet (step 5), feeds IKE datagrams to the engine, and turns
the engine's events into ESP SAs installed in the data path and the SA-flow
table. It does no I/O itself: the daemon gives it a ``send`` function and a
clock, so the tests can drive it like the engines.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import esp
import ike
import npusim
from ike import events as ev
from ike.timers import TimerHeap
from ipsecmgr import config as cfg
from ipsecmgr import failover, show
from ipsecmgr.invalid_spi import InvalidSpiHints
from ipsecmgr.peers import DEAD, HOLD_DOWN_NOTIFIES, PeerList, peer_configs
from ipsecmgr.sasink import SaPair, SaSink, TraceHook, esp_peer
from ipsecmgr.trace import trace_ike_datagram, trace_ike_event

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
# A rekeyed-away inbound SA still decrypts this long after its DELETE: ESP the peer
# sent on it before it saw the DELETE may be read after the IKE answer (another socket).
REKEY_LINGER = 1.0

Address = tuple[str, int]
SendFn = Callable[[bytes, Address], None]  # (datagram, peer)

_ENCR = {
    "aes-gcm-128": (ike.EncrId.AES_GCM_16, 128),
    "aes-gcm-256": (ike.EncrId.AES_GCM_16, 256),
    "aes-cbc-256": (ike.EncrId.AES_CBC, 256),
}
_PRF = {
    "sha256": ike.PrfId.HMAC_SHA2_256,
    "sha384": ike.PrfId.HMAC_SHA2_384,
    "sha512": ike.PrfId.HMAC_SHA2_512,
}
_INTEG = {
    "sha256": ike.IntegId.HMAC_SHA2_256_128,
    "sha384": ike.IntegId.HMAC_SHA2_384_192,
    "sha512": ike.IntegId.HMAC_SHA2_512_256,
}
_ID_TYPE = {
    "ipv4": ike.IdType.ID_IPV4_ADDR,
    "ipv6": ike.IdType.ID_IPV6_ADDR,
    "fqdn": ike.IdType.ID_FQDN,
    "email": ike.IdType.ID_RFC822_ADDR,
}


_IKE_STATE = {
    "new": "CONNECTING",
    "init-sent": "CONNECTING",
    "init-done": "CONNECTING",
    "established": "ESTABLISHED",
    "deleting": "DELETING",
    "dead": "DELETING",
}
_MAP_STATUS = {"idle": "down", "established": "up", "connecting": "connecting"}
# A responder's IKE SA before IKE_AUTH: the peer has not proved who it is (§2.4, §2.6)
_UNAUTHENTICATED = ("new", "init-done")


# RFC 7296 §3.10.1 error notifies in plain words, as seen from the side that
# received them ("the peer ..."); a notify we sent reads "we ..." instead.
_NOTIFY_MEANING = {
    "NO_PROPOSAL_CHOSEN": "{who} accepted none of the offered algorithms (or could not use them)",
    "TS_UNACCEPTABLE": "{who} refused the traffic selectors (which addresses the tunnel carries)",
    "AUTHENTICATION_FAILED": "{who} rejected the identity or the pre-shared key",
    "INVALID_KE_PAYLOAD": "{who} wants another Diffie-Hellman group",
    "INVALID_SYNTAX": "{who} could not parse the message",
    "SINGLE_PAIR_REQUIRED": "{who} wants exactly one pair of traffic selectors",
    "NO_ADDITIONAL_SAS": "{who} accepts no more Child SAs on this IKE SA",
    "INTERNAL_ADDRESS_FAILURE": "{who} could not assign an internal address",
    "FAILED_CP_REQUIRED": "{who} requires a configuration payload",
    "TEMPORARY_FAILURE": "{who} is busy (e.g. a rekey in progress); retry later",
    "CHILD_SA_NOT_FOUND": "{who} does not know the Child SA to rekey",
    "INVALID_SPI": "{who} does not know the SPI",
    "UNSUPPORTED_CRITICAL_PAYLOAD": "{who} does not support a payload marked critical",
    "INVALID_MAJOR_VERSION": "{who} does not speak IKEv2",
}


def notify_meaning(notify: str, by_peer: bool) -> str:
    """What an error NOTIFY means, in words, for the log line that reports it."""
    who = "the peer" if by_peer else "we"
    text = _NOTIFY_MEANING.get(notify, "{who} reported an error")
    return text.format(who=who)


def _encr_name(encr: int, bits: int) -> str:
    return f"AES-GCM-16-{bits}" if encr == ike.EncrId.AES_GCM_16 else f"AES-CBC-{bits}"


@dataclass(slots=True)  # one per Child SA, 10,000s on a responder
class ChildRecord:
    child_id: int
    inbound: esp.InboundSA
    outbound: esp.OutboundSA
    mode: str
    installed_at: float
    local_ts: list[str]
    remote_ts: list[str]
    esn: bool
    key_bits: int
    # (inbound, outbound) AES key ‖ salt, kept only for ``trace --wireshark-keys``
    keys: tuple[bytes, bytes] = field(default=(b"", b""), repr=False)
    rekey_started: bool = False  # a volume/sequence rekey (or our delete) is under way


@dataclass
class MapState:
    """Everything the gateway knows about one crypto map."""

    cmap: cfg.CryptoMap
    ike_config: ike.IkeConfig
    ike_sa: ike.IkeSA | None = None
    status: str = "idle"  # idle, connecting, established, failed, dead
    last_error: str = ""
    # Keyed by (IKE SA name, child id): child ids are only unique per IKE SA.
    children: dict[tuple[str, int], ChildRecord] = field(default_factory=dict)
    queue: deque[bytes] = field(default_factory=deque)
    counters: dict[str, int] = field(default_factory=dict)
    established_at: float | None = None
    # Periodic work on the established IKE SA (absolute loop times, None: off)
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

    def bump(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


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


def ike_proposals(config: cfg.Config, cmap: cfg.CryptoMap) -> tuple[ike.IkeProposal, ...]:
    out = []
    for name in cmap.ike_transform_sets:
        ts = config.ike_transform_sets[name]
        encr, bits = _ENCR[ts.encryption]
        integ = _INTEG[ts.integrity or ts.prf] if encr == ike.EncrId.AES_CBC else ike.IntegId.NONE
        out.append(ike.IkeProposal(encr, bits, _PRF[ts.prf], integ, ike.DhGroup(ts.dh_group)))
    return tuple(out)


def esp_proposals(config: cfg.Config, cmap: cfg.CryptoMap) -> tuple[ike.EspProposal, ...]:
    out = []
    for name in cmap.ipsec_transform_sets:
        ts = config.ipsec_transform_sets[name]
        out.append(ike.EspProposal(_ENCR[ts.esp][1], ts.esn))
    return tuple(out)


def _rule_range(value: int, mask: int, version: int) -> tuple[int, int] | None:
    """The address range of an ACL address/mask if the mask is a prefix, else None."""
    bits = 32 if version == 4 else 128
    full = (1 << bits) - 1
    host_bits = full & ~mask
    if host_bits & (host_bits + 1):  # not contiguous: no single range
        return None
    return value & mask, (value & mask) | host_bits


def selectors_from_acl(
    acl: npusim.Acl,
) -> tuple[list[ike.TrafficSelector], list[ike.TrafficSelector]]:
    """Traffic selectors from an ACL's permit lines, as Cisco proxy identities.

    The source of a permit line is our side (TSi when we initiate), the
    destination the peer's; ``ip`` means any protocol (0) and a single port
    range becomes the selector's port range.
    """
    local: list[ike.TrafficSelector] = []
    remote: list[ike.TrafficSelector] = []
    for rule in acl.rules:
        if not rule.permit:
            continue
        versions = (4, 6) if rule.version not in (4, 6) else (rule.version,)
        for version in versions:
            proto = 0 if rule.protocol < 0 else rule.protocol
            for value, mask, ports, into in (
                (rule.src, rule.src_mask, rule.src_ports, local),
                (rule.dst, rule.dst_mask, rule.dst_ports, remote),
            ):
                rng = _rule_range(value, mask, version) or (
                    0,
                    (1 << (32 if version == 4 else 128)) - 1,
                )
                lo, hi = (0, 65535) if not ports or len(ports) != 1 else ports[0]
                sel = ike.TrafficSelector(
                    ipaddress.ip_address(rng[0])
                    if version == 6 or rng[1] > 0xFFFFFFFF
                    else ipaddress.IPv4Address(rng[0]),
                    ipaddress.IPv6Address(rng[1])
                    if version == 6
                    else ipaddress.IPv4Address(rng[1]),
                    proto,
                    lo,
                    hi,
                )
                if sel not in into:
                    into.append(sel)
    return local, remote


# Both selector types are frozen: the few selectors in use are converted once.
@functools.lru_cache(maxsize=1024)
def npu_selector(ts: ike.TrafficSelector) -> npusim.TrafficSelector:
    return npusim.TrafficSelector(
        ts.start_addr.version,
        ts.ip_proto,
        int(ts.start_addr),
        int(ts.end_addr),
        ts.start_port,
        ts.end_port,
    )


def _ts_text(selectors: Sequence[ike.TrafficSelector]) -> list[str]:
    """The selectors as ``show`` prints them (each one formatted once)."""
    return [_one_ts_text(t) for t in selectors]


@functools.lru_cache(maxsize=1024)
def _one_ts_text(ts: ike.TrafficSelector) -> str:
    return str(ts)


def build_ike_config(config: cfg.Config, cmap: cfg.CryptoMap, acl: npusim.Acl) -> ike.IkeConfig:
    ts = config.ipsec_transform_sets[cmap.ipsec_transform_sets[0]]
    local_ts, remote_ts = selectors_from_acl(acl)
    return ike.IkeConfig(
        local_addr=(str(cmap.local_address), config.gateway.ike_port),
        peer_addr=(str(cmap.peer), config.gateway.ike_port),
        local_id=ike.Identity(_ID_TYPE[cmap.local_id.type], cmap.local_id.value),
        remote_id=ike.Identity(_ID_TYPE[cmap.remote_id.type], cmap.remote_id.value),
        local_psk=cmap.local_psk.reveal(),
        remote_psk=cmap.remote_psk.reveal(),
        ike_proposals=ike_proposals(config, cmap),
        esp_proposals=esp_proposals(config, cmap),
        pfs_group=ike.DhGroup(ts.pfs_group) if ts.pfs_group else None,
        local_ts=tuple(local_ts),
        remote_ts=tuple(remote_ts),
        mode=cmap.mode,
        retransmit_timeout=cmap.retransmission_timeout_ms / 1000.0,
        retransmit_tries=cmap.max_retransmission,
        initial_contact=cmap.initial_contact,
        fake_nat=cmap.encapsulation == "always",
        nat_traversal=cmap.encapsulation != "never",
        ike_lifetime=float(config.ike_transform_sets[cmap.ike_transform_sets[0]].lifetime),
        child_lifetime=float(ts.lifetime_seconds),
        name=cmap.name,
    )


class Manager:
    """Crypto maps → IKE SAs → ESP SAs in the data path."""

    def __init__(
        self,
        config: cfg.Config,
        acls: dict[str, npusim.Acl],
        datapath: SaSink,
        send: SendFn,
    ) -> None:
        self.config = config
        # The data path, single or split (ipsecmgr.sasink): SA pairs, bindings, counters
        self.datapath = datapath
        self.send = send
        self.maps: dict[str, MapState] = {}
        for name, cmap in config.crypto_maps.items():
            acl = acls[cmap.match_address]
            self.maps[name] = MapState.build(cmap, build_ike_config(config, cmap, acl))
        # One log line per IKE message (exchange, payloads, size, peer), at -v. Without
        # -v the engine gets no hook and so builds no line (the level is set before the
        # daemon builds its manager and stays; logging.basicConfig in ipsecmgr.cli).
        self.endpoint = ike.IkeEndpoint(
            [c for m in self.maps.values() for c in m.peers.configs],
            log=(lambda line: log.info("%s", line)) if log.isEnabledFor(logging.INFO) else None,
        )
        # The daemon's Tracer while someone traces (steps 4, 5 and IKE events), else None.
        self.trace: TraceHook | None = None
        # Dead-peer detection per IKE SA name (a map can have a stale SA and a new one)
        self.liveness: dict[str, Liveness] = {}
        # Inbound SPIs of rekeyed Child SAs still in the SA-flow table, and until when
        self.lingering: dict[int, float] = {}
        # Uniform in [0, 1): the share of REKEY_JITTER taken off a soft lifetime
        self.jitter: Callable[[], float] = random.random
        # Failover, fail-fast answers and rate-limited noise (ipsecmgr.failover)
        self.failover = failover.Failover(self)
        # Set by ipsecmgr.metrics: observe(histogram, crypto map, seconds) for the
        # IKE handshake latency and the first-packet wait (queue mode).
        self.observe: Callable[[str, str, float], None] | None = None
        # INVALID_SPI (RFC 7296 §1.5): sent for ESP with unknown SPIs, hints received
        self.invalid_spi = InvalidSpiHints()
        # The periodic work (liveness per IKE SA, volume and keepalive per map, each
        # lingering SPI) by deadline: nothing is swept (see ike.timers)
        self.deadlines: TimerHeap[tuple[str, str | int]] = TimerHeap()
        # IKE SAs the engine looked at since the last pump: only their maps can
        # have a peer that moved (_follow_peers)
        self._changed: dict[ike.IkeSA, None] = {}
        self.endpoint.on_change = self._sa_changed

    def set_trace(self, hook: TraceHook | None) -> None:
        """The Tracer while someone traces (``ipsecmgr trace``), None when none does."""
        self.trace = hook

    def reconfigure(
        self, config: cfg.Config, acls: dict[str, npusim.Acl], keep: set[str], now: float
    ) -> None:
        """SIGHUP: maps in ``keep`` keep their SAs; the others are deleted
        (DELETE sent to the peer) and rebuilt from the new configuration."""
        old = self.maps
        self.config = config
        self.maps = {}
        for name, cmap in config.crypto_maps.items():
            acl = acls[cmap.match_address]
            if name in keep and name in old:
                state = old[name]
                state.cmap = cmap
                self.maps[name] = state
            else:
                self.maps[name] = MapState.build(cmap, build_ike_config(config, cmap, acl))
            self.maps[name].peers.reset()  # SIGHUP ends every hold-down (#15.5)
        for name, state in old.items():
            if self.maps.get(name) is state:
                continue
            for sa in self._sas_of_map(state):
                sa.delete(now)
            for key in list(state.children):
                self._remove_child(state, key)
            self.datapath.unbind(name)
            log.info("crypto map %s: changed or removed by reload, SAs deleted", name)
        # Responders are matched against the new configs from now on; the IKE
        # SAs of kept maps keep the config object they were built with.
        self.endpoint.configs = [c for m in self.maps.values() for c in m.peers.configs]
        self.pump(now)

    # -- steps 4 and 5 ------------------------------------------------------------

    def on_no_sa(self, name: str, packet: bytes, now: float) -> None:
        state = self.maps[name]
        tr = self.trace
        responder = state.cmap.role == "responder"
        if not responder and self.failover.held_down(state, packet, now):
            return  # every peer dead or held down: dropped (and answered), no IKE
        initiating = not responder and (state.ike_sa is None or state.ike_sa.dead)
        if tr is not None and initiating:
            chosen = state.peers.choose(now)  # the peer initiate() will take
            addr = chosen.address if chosen is not None else str(state.cmap.peer)
            tr("4", "ike_triggered", packet, crypto_map=name, peer=(addr, 0))
        if state.cmap.first_packet == "queue":
            if len(state.queue) < state.cmap.queue_size:
                if not state.queue:
                    state.queued_at = now
                state.queue.append(packet)
                state.bump("first_packet_queued")
                what = "first_packet_queued"
            else:
                state.bump("queue_overflow_drops")
                what = "queue_full_dropped"
        else:
            state.bump("first_packet_drops")
            what = "first_packet_dropped"
        if tr is not None:
            peer = state.cmap.peer
            why = f"responder: waiting for {peer}" if responder else f"IKE with {peer} not up"
            tr("5", what, packet, crypto_map=name, reason=why)
        if what == "first_packet_dropped" and not responder and state.peers.failed_once():
            self.failover.answer(state, packet, now, "IKE already failed once")
        if responder:
            # A responder waits for its peer to build the tunnel (e.g. the
            # TACACS+ server side: replies only follow a client's request).
            state.bump("no_sa_waiting_for_peer")
        elif initiating or state.ike_sa is None:
            self.initiate(state, now)
        elif (
            state.ike_sa.established
            and not state.creating_child
            and not self._children_of(state, state.ike_sa.name)
        ):
            # "rekey lazy": the idle Child SA expired; the IKE SA lives on, so a
            # CREATE_CHILD_SA (§1.3) is enough to carry traffic again
            state.creating_child = True
            state.bump("child_created_on_demand")
            state.ike_sa.create_child(now)
            self.pump(now)

    def initiate(self, state: MapState, now: float) -> None:
        peer = state.peers.choose(now) or state.peers.peers[0]
        sa = self.endpoint.initiate(peer.config, now)
        state.peers.active = peer
        state.peers.bind(sa.name, peer)
        state.ike_sa = sa
        state.status = "connecting"
        state.initiated_at = now
        state.bump("ike_initiated")
        log.info("crypto map %s: no SA, initiating IKE with %s", state.cmap.name, peer.address)
        self.pump(now)

    # -- IKE input -------------------------------------------------------------------

    def on_ike_datagram(self, data: bytes, local: Address, peer: Address, now: float) -> None:
        if self.trace is not None:  # before the engine: it may drop the SA (and its keys)
            trace_ike_datagram(self.trace, "received", data, peer, self.endpoint.sas)
        self.endpoint.receive_datagram(data, peer, now, local)
        self.pump(now)

    def on_timer(self, now: float) -> None:
        self._before_engine_timers(now)
        self.endpoint.handle_timer(now)
        self.periodic(now)
        self.pump(now)

    def next_deadline(self) -> float | None:
        times = [
            t
            for t in (self.endpoint.get_timer(), self.deadlines.next(), self.failover.next_time())
            if t is not None
        ]
        return min(times) if times else None

    def _sas_of_map(self, state: MapState) -> list[ike.IkeSA]:
        """The live IKE SAs of a map, with each of its peers (ordered peers, #20):
        looked up per config in the engine's index, never by a scan of every SA."""
        return [sa for c in state.peers.configs for sa in self.endpoint.sas_of(c)]

    def pump(self, now: float) -> None:
        # Events first: a responder installs the Child SA before its IKE_AUTH answer
        # leaves, so the initiator's first ESP packet finds it (in split mode the
        # INBOUND worker is told over its socketpair before the answer is sent).
        while (event := self.endpoint.next_event()) is not None:
            self.on_event(event, now)
        self.failover.after_events(now)  # fail over to the next peer, preempt
        for data, peer in self.endpoint.datagrams_to_send(now):
            self.send(data, peer)
            if self.trace is not None:
                trace_ike_datagram(self.trace, "sent", data, peer, self.endpoint.sas)
        self._follow_peers()

    # -- periodic work: rekeying, liveness checks, NAT keepalives -------------------

    def _schedule(self, state: MapState, now: float) -> None:
        """(Re)start the periodic work of a newly established or rekeyed IKE SA."""
        sa = state.ike_sa
        behind_nat = sa is not None and sa.nat_t and sa.nat_detected_local
        # RFC 3948 §4 / RFC 7296 §2.23: only the side behind the NAT keeps its mapping open
        ka = state.cmap.nat_keepalive
        state.keepalive_at = now + ka if behind_nat and ka > 0 else None
        state.volume_at = now + self._volume_period(state)
        self.deadlines.set(("keepalive", state.cmap.name), state.keepalive_at)
        self.deadlines.set(("volume", state.cmap.name), state.volume_at)

    def _volume_period(self, state: MapState) -> float:
        ts = self.config.ipsec_transform_sets[state.cmap.ipsec_transform_sets[0]]
        return VOLUME_CHECK if ts.lifetime_bytes or ts.lifetime_packets else SEQUENCE_CHECK

    def _children_of(self, state: MapState, ike_name: str) -> list[ChildRecord]:
        return [rec for (name, _), rec in state.children.items() if name == ike_name]

    def periodic(self, now: float) -> None:
        """Start what is due: liveness checks (§2.4), volume rekeys, NAT keepalives
        (RFC 3948 §2.3). Time-based rekeys are the engine's (see REKEY_JITTER)."""
        self.failover.periodic(now)  # preemption probes, retiring a backup's IKE SA
        # Only what is due, earliest first (ike.timers): each handler sets its next time
        for kind, key in self.deadlines.pop_due(now):
            if kind == "linger":
                self._linger_expired(int(key), now)
            elif kind == "liveness":
                self._liveness_due(str(key), now)
            else:
                self._map_work_due(kind, str(key), now)

    def _linger_expired(self, spi: int, now: float) -> None:
        until = self.lingering.get(spi)
        if until is None:
            return
        if now < until:
            self.deadlines.set(("linger", spi), until)
            return
        del self.lingering[spi]
        self.datapath.remove(spi, None)

    def _liveness_due(self, name: str, now: float) -> None:
        lv = self.liveness.get(name)
        ike_sa = self.endpoint.find_sa(name)
        if lv is None or ike_sa is None or not ike_sa.established:
            return  # gone (its IkeSaDeleted dropped the record) or not up any more
        if now < lv.check_at:
            self.deadlines.set(("liveness", name), lv.check_at)
            return
        owner = self._state_for_name(name)
        if owner is not None:
            self._check_liveness(owner, ike_sa, lv, now)
            self.deadlines.set(("liveness", name), lv.check_at)

    def _map_work_due(self, kind: str, name: str, now: float) -> None:
        state = self.maps.get(name)
        sa = state.ike_sa if state is not None else None
        if state is None or sa is None or not sa.established:
            return  # _schedule starts it again with the next IKE SA
        if kind == "volume" and state.volume_at is not None:
            if now >= state.volume_at:
                state.volume_at = now + self._volume_period(state)
                self._check_volume(state, sa, now)
            self.deadlines.set(("volume", name), state.volume_at)
        elif kind == "keepalive" and state.keepalive_at is not None:
            if now >= state.keepalive_at:
                state.keepalive_at = now + state.cmap.nat_keepalive
                self._send_keepalive(state, sa)
            self.deadlines.set(("keepalive", name), state.keepalive_at)

    def _check_liveness(self, state: MapState, sa: ike.IkeSA, lv: Liveness, now: float) -> None:
        """RFC 7296 §2.4: an empty INFORMATIONAL only when nothing has arrived from
        the peer for ``dpd.interval``; it is resent every ``dpd.timeout`` seconds,
        ``dpd.retries`` times, and the peer is dead ``dpd.timeout`` after the last."""
        dpd = state.cmap.dpd
        packets = sum(rec.inbound.counters.packets for rec in self._children_of(state, sa.name))
        again = self.invalid_spi.sample(self, state, sa, packets, now)  # only outgoing ESP?
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
        lv.check_at = min(due, now + dpd.interval / DPD_SAMPLES, again or due)

    def _check_volume(self, state: MapState, sa: ike.IkeSA, now: float) -> None:
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

    def _before_engine_timers(self, now: float) -> None:
        """The engine is about to start the rekeys due at ``now``: count them, and
        apply ``rekey lazy``: at the soft lifetime an SA that carried nothing is
        not rekeyed; the engine deletes it at the hard lifetime and the next
        packet creates a new one (``rekey keepalive`` rekeys regardless, as StarOS)."""
        # Only the IKE SAs whose engine timer is due (ike.timers), not every map
        for owner in self.endpoint.due(now):
            state = self._state_for_name(owner.name)
            if state is None:
                continue
            ts = self.config.ipsec_transform_sets[state.cmap.ipsec_transform_sets[0]]
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

    def _jitter(self, soft: float | None, lifetime: float) -> float | None:
        return None if soft is None else soft - self.jitter() * REKEY_JITTER * lifetime

    def _send_keepalive(self, state: MapState, sa: ike.IkeSA) -> None:
        try:
            self.datapath.send_keepalive(sa.peer_addr)
            state.bump("nat_keepalives_sent")
        except OSError as exc:
            state.bump("nat_keepalive_errors")
            log.debug("NAT keepalive to %s failed: %s", sa.peer_addr, exc)

    def on_unknown_spi(
        self, spi: int, src: bytes, family: int, udp: Address | None, now: float
    ) -> bool:
        """ESP with an SPI we do not know (``Datapath.on_unknown_spi``): INVALID_SPI to
        its sender (RFC 7296 §1.5), rate-limited. True if one left."""
        return self.invalid_spi.on_unknown_spi(self, spi, src, family, udp, now)

    def _on_invalid_spi(self, state: MapState, event: ev.InvalidSpiReceived, now: float) -> None:
        self.invalid_spi.on_hint(self, state, event, now)

    def on_esp_from(self, name: str, peer: Address) -> None:
        """An authentic ESP-in-UDP packet of crypto map ``name`` came from ``peer``.

        RFC 7296 §2.23: a host that is not behind a NAT SHOULD move the SA to
        the address and port of a validated packet (the peer's NAT rebound).
        """
        state = self.maps.get(name)
        binding = self.datapath.binding(name)
        sa = state.ike_sa if state is not None else None
        if state is None or sa is None or binding is None or binding.peer == peer:
            return
        if binding.peer[1] == 0 or sa.nat_detected_local or not sa.established:
            return  # raw ESP, or we are the one behind the NAT: keep our mapping
        sa.peer_addr = peer  # IKE follows too (its next request goes there)
        self._changed[sa] = None
        self._follow_peers()

    def _sa_changed(self, sa: ike.IkeSA) -> None:
        self._changed[sa] = None

    def _follow_peers(self) -> None:
        """NAT rebinding (RFC 7296 §2.23): the engine follows the peer's address
        when an authenticated request arrives from a new one; ESP follows it.
        Only the maps of the IKE SAs that changed since the last look."""
        changed, self._changed = self._changed, {}
        for changed_sa in changed:
            state = self._state_for_name(changed_sa.name)
            if state is None or state.ike_sa is not changed_sa:
                continue
            name = state.cmap.name
            sa, binding = state.ike_sa, self.datapath.binding(name)
            if sa is None or binding is None or not sa.established:
                continue
            addr = esp_peer(sa.peer_addr, sa.nat_t)
            if addr != binding.peer:
                log.info(
                    "crypto map %s: peer moved from %s:%d to %s:%d, ESP follows",
                    name,
                    *binding.peer,
                    *addr,
                )
                state.bump("nat_rebinding")
                self.datapath.bind(name, binding.sa, sa.peer_addr, sa.nat_t)

    # -- events -----------------------------------------------------------------------

    def _state_for(self, event: ev.IkeEvent) -> MapState | None:
        return self._state_for_name(event.ike_sa)

    def _state_for_name(self, ike_name: str) -> MapState | None:
        # The engine names an IKE SA "<config name>-<SPIi hex>".
        return self.maps.get(ike_name.rsplit("-", 1)[0])

    def on_event(self, event: ev.IkeEvent, now: float) -> None:
        state = self._state_for(event)
        if state is None:
            log.warning("event for an IKE SA without a crypto map: %s", type(event).__name__)
            return
        if self.trace is not None:
            trace_ike_event(self.trace, event, state.cmap.name)
        # One handler per event class (the engine's events are final dataclasses:
        # the exact type decides); events without one (NatDetected) need nothing here.
        handler = _EVENT_HANDLERS.get(type(event))
        if handler is not None:
            handler(self, state, event, now)

    def _on_ike_established(self, state: MapState, event: ev.IkeSaEstablished, now: float) -> None:
        self.failover.established(state, event.ike_sa, now)
        state.ike_sa = self.endpoint.find_sa(event.ike_sa)
        state.status = "established"
        state.last_error = ""
        state.established_at = now
        state.bump("ike_established")
        if self.observe is not None and state.initiated_at is not None:
            self.observe("ike_handshake", state.cmap.name, now - state.initiated_at)
        state.initiated_at = None
        self._schedule(state, now)
        if (sa := state.ike_sa) is not None:
            sa.ike_rekey_at = self._jitter(sa.ike_rekey_at, state.ike_config.ike_lifetime)
            self.endpoint.retime(sa)
            if (interval := state.cmap.dpd.interval) > 0:
                self.liveness[sa.name] = Liveness(now, now + interval / DPD_SAMPLES)
                self.deadlines.set(("liveness", sa.name), now + interval / DPD_SAMPLES)
        log.info(
            "crypto map %s: IKE SA up with %s (%s)",
            state.cmap.name,
            state.ike_sa.peer_addr[0] if state.ike_sa else state.cmap.peer,
            event.algorithms,
        )

    def _on_ike_rekeyed(self, state: MapState, event: ev.IkeSaRekeyed, now: float) -> None:
        state.bump("ike_rekeyed")
        if (sa := self.endpoint.find_sa(event.ike_sa)) is not None:
            sa.ike_rekey_at = self._jitter(sa.ike_rekey_at, state.ike_config.ike_lifetime)
            self.endpoint.retime(sa)
        if state.ike_sa is not None:
            self._schedule(state, now)
        log.info(
            "crypto map %s: IKE SA rekeyed, SPIs %s/%s",
            state.cmap.name,
            event.spi_i.hex(),
            event.spi_r.hex(),
        )

    def _on_child_rekeyed(self, state: MapState, event: ev.ChildSaRekeyed, now: float) -> None:
        state.bump("child_rekeyed")
        log.info(
            "crypto map %s: Child SA %d rekeyed as %d",
            state.cmap.name,
            event.old_child_id,
            event.new_child_id,
        )

    def _on_child_deleted(self, state: MapState, event: ev.ChildSaDeleted, now: float) -> None:
        linger = now + REKEY_LINGER if event.reason == "rekeyed" else None
        self._remove_child(state, (event.ike_sa, event.child_id), linger)
        log.info(
            "crypto map %s: Child SA %d deleted (%s)", state.cmap.name, event.child_id, event.reason
        )

    def _on_ike_deleted(self, state: MapState, event: ev.IkeSaDeleted, now: float) -> None:
        self.liveness.pop(event.ike_sa, None)
        self.failover.deleted(state, event.ike_sa, event.reason, now)
        self.deadlines.cancel(("liveness", event.ike_sa))
        for key in [k for k in state.children if k[0] == event.ike_sa]:
            self._remove_child(state, key)
        if state.ike_sa is None or state.ike_sa.name == event.ike_sa:
            if state.status != "failed":
                state.status = "dead" if event.reason == "peer-dead" else "idle"
            state.ike_sa = None
            state.creating_child = False
        log.info("crypto map %s: IKE SA deleted (%s)", state.cmap.name, event.reason)
        self.invalid_spi.on_ike_deleted(self, state, event, now)

    def _on_peer_dead(self, state: MapState, event: ev.PeerDead, now: float) -> None:
        state.bump("peer_dead")
        if state.status == "connecting":  # no answer to our IKE_SA_INIT / IKE_AUTH
            state.bump("handshake_timeouts")
        if state.ike_sa is None or state.ike_sa.name == event.ike_sa:
            state.status = "dead"  # not for a stale SA a newer one replaced
        peer = self.failover.failed(state, event.ike_sa, DEAD, now)
        log.warning("crypto map %s: peer %s is dead", state.cmap.name, peer or state.cmap.peer)

    def _on_auth_failed(self, state: MapState, event: ev.AuthenticationFailed, now: float) -> None:
        if self.failover.unauthenticated_noise(state, event, "AUTHENTICATION_FAILED", now):
            return  # #15.4: rate-limited, never the Last Error of a map that is up
        self.failover.failed(state, event.ike_sa, "AUTHENTICATION_FAILED", now)
        if state.ike_sa is None or state.ike_sa.name == event.ike_sa:
            state.status = "failed"  # not for a preemption probe while the backup is up
        state.last_error = f"AUTHENTICATION_FAILED: {event.detail}"
        state.bump("auth_failed")
        log.error(
            "crypto map %s: authentication failed: %s (%s)",
            state.cmap.name,
            event.detail,
            "the identity or the pre-shared key did not match",
        )

    def _on_exchange_failed(self, state: MapState, event: ev.ExchangeFailed, now: float) -> None:
        if event.exchange == "CREATE_CHILD_SA":
            state.creating_child = False  # the next packet may try again
        if self.failover.unauthenticated_noise(state, event, event.notify, now):
            return  # #15.4: rate-limited, never the Last Error of a map that is up
        if event.notify in HOLD_DOWN_NOTIFIES:
            self.failover.failed(state, event.ike_sa, event.notify, now)
        state.status = "failed" if state.status != "established" else state.status
        who = "peer sent" if event.by_peer else "we sent"
        state.last_error = f"{event.exchange}: {who} {event.notify}"
        state.bump("exchange_failed")
        state.bump("exchange_failed_" + event.notify.lower())  # by reason (metrics)
        log.error(
            "crypto map %s: %s failed: %s %s (%s)",
            state.cmap.name,
            event.exchange,
            who,
            event.notify,
            notify_meaning(event.notify, event.by_peer),
        )

    def _on_initial_contact(
        self, state: MapState, event: ev.InitialContactReceived, now: float
    ) -> None:
        self._drop_others(state, event.ike_sa)
        log.info("crypto map %s: INITIAL_CONTACT from %s", state.cmap.name, event.remote_id)

    def _sa_options(self, state: MapState, event: ev.ChildSaInstalled) -> esp.SaOptions:
        """Mode, ESN, soft/hard limits in bytes and packets (seconds: the engine's)."""
        ts = self.config.ipsec_transform_sets[state.cmap.ipsec_transform_sets[0]]
        opts: esp.SaOptions = {"mode": event.mode, "esn": event.esn}
        share = SOFT_VOLUME - self.jitter() * REKEY_JITTER
        if ts.lifetime_bytes:
            opts["hard_bytes"] = ts.lifetime_bytes
            opts["soft_bytes"] = max(1, int(ts.lifetime_bytes * share))
        if ts.lifetime_packets:
            opts["hard_packets"] = ts.lifetime_packets
            opts["soft_packets"] = max(1, int(ts.lifetime_packets * share))
        return opts

    def _install_child(self, state: MapState, event: ev.ChildSaInstalled, now: float) -> None:
        opts = self._sa_options(state, event)
        inbound = esp.InboundSA(event.inbound_spi, event.inbound_key, **opts)
        outbound = esp.OutboundSA(event.outbound_spi, event.outbound_key, **opts)
        state.creating_child = False
        sa = self.endpoint.find_sa(event.ike_sa)
        child = sa.children.get(event.child_id) if sa is not None else None
        if child is not None and sa is not None:
            child.rekey_at = self._jitter(child.rekey_at, state.ike_config.child_lifetime)
            self.endpoint.retime(sa)
        if self.lingering.pop(event.inbound_spi, None) is not None:  # reused: the new SA wins
            self.deadlines.cancel(("linger", event.inbound_spi))
        self.datapath.install(
            SaPair(
                state.cmap.name,
                inbound,
                outbound,
                event.inbound_key,
                event.outbound_key,
                [npu_selector(t) for t in event.remote_ts],
                [npu_selector(t) for t in event.local_ts],
            )
        )
        name = state.cmap.name
        old = sa.children.get(event.rekeyed_from) if sa and event.rekeyed_from else None
        if old is not None and old.state == "rekeyed" and self.datapath.binding(name) is not None:
            # We answered the peer's rekey ("rekeyed": the peer deletes the old SA
            # next; had we started it, our DELETE would be out: "deleting"). The
            # peer may not have the new SA yet, so keep sending on the old one until
            # its DELETE (make-before-break, RFC 7296 §2.8); _remove_child then
            # moves sending to the newest Child SA.
            state.bump("rekey_send_deferred")
        else:
            self._bind(state, event.ike_sa, outbound)
        state.children[(event.ike_sa, event.child_id)] = ChildRecord(
            event.child_id,
            inbound,
            outbound,
            event.mode,
            now,
            _ts_text(event.local_ts),
            _ts_text(event.remote_ts),
            event.esn,
            event.key_bits,
            (event.inbound_key, event.outbound_key),
        )
        state.bump("child_sa_installed")
        log.info(
            "crypto map %s: Child SA %d installed, SPI in %#010x out %#010x, %s",
            state.cmap.name,
            event.child_id,
            event.inbound_spi,
            event.outbound_spi,
            event.mode,
        )
        if state.queue and self.observe is not None and state.queued_at is not None:
            self.observe("first_packet_wait", state.cmap.name, now - state.queued_at)
        while state.queue:
            self.datapath.send(name, state.queue.popleft())
            state.bump("queued_sent")

    def _remove_child(
        self, state: MapState, key: tuple[str, int], linger: float | None = None
    ) -> None:
        record = state.children.pop(key, None)
        if record is None:
            return
        # Per-map ESP totals outlive the SA (metrics: live SAs + these)
        state.bump("retired_packets_in", record.inbound.counters.packets)
        state.bump("retired_bytes_in", record.inbound.counters.bytes)
        state.bump("retired_packets_out", record.outbound.counters.packets)
        state.bump("retired_bytes_out", record.outbound.counters.bytes)
        if linger is not None:
            self.lingering[record.inbound.spi] = linger  # make-before-break, receive side
            self.deadlines.set(("linger", record.inbound.spi), linger)
        # The outbound SA goes now; a lingering inbound SA when it expires (periodic).
        in_spi = None if linger is not None else record.inbound.spi
        self.datapath.remove(in_spi, record.outbound.spi)
        binding = self.datapath.binding(state.cmap.name)
        if binding is not None and binding.sa is record.outbound:
            self.datapath.unbind(state.cmap.name)
            # The most recently installed child of the same map takes over sending.
            if state.children:
                (ike_name, _), newer = list(state.children.items())[-1]
                self._bind(state, ike_name, newer.outbound)

    def _bind(self, state: MapState, ike_name: str, outbound: esp.OutboundSA) -> None:
        """The crypto map's packets go out on ``outbound``, to its IKE SA's peer."""
        sa = self.endpoint.find_sa(ike_name)
        nat_t = bool(sa is not None and sa.nat_t)
        peer: Address = sa.peer_addr if sa is not None else (str(state.cmap.peer), 500)
        self.datapath.bind(state.cmap.name, outbound, peer, nat_t)

    def _drop_others(self, state: MapState, keep: str) -> None:
        """RFC 7296 §2.4 INITIAL_CONTACT: the peer has no other SA with us any more.

        Only SAs that were authenticated (and our own half-open initiations, which
        the peer's new SA makes redundant). A responder SA still between IKE_SA_INIT
        and IKE_AUTH is not "an IKE SA between the authenticated identities" of
        §2.4 yet: it may be another handshake of the same peer in flight (the
        engine's endpoint spares it too), and dropping it silently would leave
        that handshake hanging until the peer's retransmissions give up."""
        for sa in self._sas_of_map(state):
            if sa.name != keep and (sa.initiator or sa.state not in _UNAUTHENTICATED):
                sa.die("replaced (INITIAL_CONTACT)")
                state.bump("replaced_by_initial_contact")

    # -- commands ------------------------------------------------------------------

    def clear(self, now: float, peer: str | None = None) -> int:
        """``clear crypto sa``: DELETE every (or one peer's) IKE SA."""
        n = 0
        for state in self.maps.values():
            if peer is not None and peer not in (p.address for p in state.peers.peers):
                continue
            state.peers.reset()  # `clear crypto` ends every hold-down (#15.5)
            # Every IKE SA of the map, a stale one (no INITIAL_CONTACT) included
            for sa in self.endpoint.sas_of(state.ike_config):
                if sa.established:
                    sa.delete(now)
                    n += 1
        self.pump(now)
        return n

    def export_keys(self) -> dict[str, list[dict[str, str]]]:
        """Every live SA's keys, for Wireshark (``trace --wireshark-keys`` only).

        ESP rows carry the outer addresses of each direction; IKE rows are
        :meth:`ike.IkeSA.export_keys`. Never used for show output or logs."""
        esp_rows: list[dict[str, str]] = []
        for state in self.maps.values():
            sa = state.ike_sa
            local = sa.local_addr[0] if sa else str(state.cmap.local_address)
            peer = sa.peer_addr[0] if sa else str(state.cmap.peer)
            for rec in state.children.values():
                for spi, key, src, dst in (
                    (rec.inbound.spi, rec.keys[0], peer, local),
                    (rec.outbound.spi, rec.keys[1], local, peer),
                ):
                    row = {"spi": f"{spi:08x}", "key": key.hex(), "src": src, "dst": dst}
                    esp_rows.append(row | {"crypto_map": state.cmap.name})
        ike_rows = []
        for ike_sa in self.endpoint.sas:
            try:
                ike_rows.append(ike_sa.export_keys())
            except RuntimeError:  # no keys yet
                continue
        return {"esp": esp_rows, "ike": ike_rows}

    # -- show -----------------------------------------------------------------------

    def ike_sa_states(self, now: float, wall: float) -> list[show.IkeSaState]:
        """The ``ike_sas`` part of a snapshot. ``wall - now`` turns the loop's
        monotonic times into epoch seconds for display."""
        out: list[show.IkeSaState] = []
        for sa in self.endpoint.sas:
            state = self.maps.get(sa.name.rsplit("-", 1)[0])
            suite = sa.ch.suite
            established = state.established_at if state and state.ike_sa is sa else None
            out.append(
                {
                    "crypto_map": state.cmap.name if state else "?",
                    "local": f"{sa.local_addr[0]}:{sa.local_addr[1]}",
                    "remote": f"{sa.peer_addr[0]}:{sa.peer_addr[1]}",
                    "spi_i": sa.ch.spi_i.hex(),
                    "spi_r": sa.ch.spi_r.hex(),
                    "role": "initiator" if sa.ch.initiator else "responder",
                    "state": _IKE_STATE.get(sa.state, sa.state.upper()),
                    "encryption": _encr_name(suite.encr, suite.key_bits) if suite else "-",
                    "prf": ike.PrfId(suite.prf).name if suite else "-",
                    "integrity": ike.IntegId(suite.integ).name if suite and suite.integ else None,
                    "dh_group": int(suite.dh) if suite else 0,
                    "nat_t": sa.nat_t,
                    "established_at": established + (wall - now) if established else None,
                    "expires_at": None,
                    "child_sas": len(sa.children),
                    "local_id": str(sa.config.local_id),
                    "remote_id": str(sa.config.remote_id),
                    "retransmissions": sa.counters.get("retransmitted", 0),
                }
            )
        return out

    def child_sa_states(self, now: float, wall: float) -> list[show.ChildSaState]:
        out: list[show.ChildSaState] = []
        for name, state in self.maps.items():
            ike_sa = state.ike_sa
            for rec in state.children.values():
                ts = self.config.ipsec_transform_sets[state.cmap.ipsec_transform_sets[0]]
                binding = self.datapath.binding(name)
                out.append(
                    {
                        "crypto_map": name,
                        "ike_spi_i": ike_sa.ch.spi_i.hex() if ike_sa else "",
                        "mode": rec.mode,
                        "state": "INSTALLED"
                        if binding and binding.sa is rec.outbound
                        else "REKEYED",
                        "spi_in": f"{rec.inbound.spi:08x}",
                        "spi_out": f"{rec.outbound.spi:08x}",
                        "local_ts": rec.local_ts,
                        "remote_ts": rec.remote_ts,
                        "encryption": f"AES-GCM-16-{rec.key_bits}",
                        "esn": rec.esn,
                        "encap": bool(binding and binding.peer[1] != 0),
                        "pfs_group": ts.pfs_group,
                        "bytes_in": rec.inbound.counters.bytes,
                        "bytes_out": rec.outbound.counters.bytes,
                        "packets_in": rec.inbound.counters.packets,
                        "packets_out": rec.outbound.counters.packets,
                        "replay_window": rec.inbound.window.size,
                        "established_at": rec.installed_at + (wall - now),
                        "expires_at": None,
                    }
                )
        return out

    def map_errors(self) -> dict[str, str]:
        return {name: s.last_error for name, s in self.maps.items() if s.last_error}

    def map_status(self, now: float | None = None) -> dict[str, str]:
        out = {name: _MAP_STATUS.get(s.status, s.status) for name, s in self.maps.items()}
        if now is not None:
            out.update(self.failover.status(now))
        return out


# Manager.on_event: event class -> handler
_EVENT_HANDLERS: dict[type[ev.IkeEvent], Callable[[Manager, MapState, Any, float], None]] = {
    ev.IkeSaEstablished: Manager._on_ike_established,
    ev.ChildSaInstalled: Manager._install_child,
    ev.IkeSaRekeyed: Manager._on_ike_rekeyed,
    ev.ChildSaRekeyed: Manager._on_child_rekeyed,
    ev.ChildSaDeleted: Manager._on_child_deleted,
    ev.IkeSaDeleted: Manager._on_ike_deleted,
    ev.PeerDead: Manager._on_peer_dead,
    ev.AuthenticationFailed: Manager._on_auth_failed,
    ev.ExchangeFailed: Manager._on_exchange_failed,
    ev.InitialContactReceived: Manager._on_initial_contact,
    ev.InvalidSpiReceived: Manager._on_invalid_spi,
}
