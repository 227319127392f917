"""The IKE side of IpsecMgr: crypto maps, their IKE SAs and Child SAs.

The manager owns one :class:`MapState` per crypto map. It turns a PROTECT
verdict without a Child SA into an IKE initiation (reference step 4), drops or
queues that first packet (step 5), feeds IKE datagrams to the engine, and turns
the engine's events into ESP SAs installed in the data path and the SA-flow
table. It does no I/O itself: the daemon gives it a ``send`` function and a
clock, so the tests can drive it like the engines.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import esp
import ike
import npusim
from ike import events as ev
from ipsecmgr import config as cfg
from ipsecmgr import show
from ipsecmgr.datapath import Datapath, OutboundBinding

log = logging.getLogger("ipsecmgr.ike")

Address = tuple[str, int]
SendFn = Callable[[bytes, Address], None]  # (datagram, peer)
EspSocketFn = Callable[[Address, bool], tuple[Any, Address]]

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


def _encr_name(encr: int, bits: int) -> str:
    return f"AES-GCM-16-{bits}" if encr == ike.EncrId.AES_GCM_16 else f"AES-CBC-{bits}"


@dataclass
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


@dataclass
class MapState:
    """Everything the gateway knows about one crypto map."""

    cmap: cfg.CryptoMap
    npu_map: npusim.CryptoMap
    ike_config: ike.IkeConfig
    ike_sa: ike.IkeSA | None = None
    status: str = "idle"  # idle, connecting, established, failed, dead
    last_error: str = ""
    # Keyed by (IKE SA name, child id): child ids are only unique per IKE SA.
    children: dict[tuple[str, int], ChildRecord] = field(default_factory=dict)
    queue: deque[bytes] = field(default_factory=deque)
    counters: dict[str, int] = field(default_factory=dict)
    established_at: float | None = None

    def bump(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


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


def npu_selector(ts: ike.TrafficSelector) -> npusim.TrafficSelector:
    return npusim.TrafficSelector(
        ts.start_addr.version,
        ts.ip_proto,
        int(ts.start_addr),
        int(ts.end_addr),
        ts.start_port,
        ts.end_port,
    )


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
        name=cmap.name,
    )


class Manager:
    """Crypto maps → IKE SAs → ESP SAs in the data path."""

    def __init__(
        self,
        config: cfg.Config,
        acls: dict[str, npusim.Acl],
        datapath: Datapath,
        saflow: npusim.SaFlowTable,
        send: SendFn,
    ) -> None:
        self.config = config
        self.datapath = datapath
        self.saflow = saflow
        self.send = send
        self.maps: dict[str, MapState] = {}
        for name, cmap in config.crypto_maps.items():
            acl = acls[cmap.match_address]
            npu = npusim.CryptoMap(name, acl, (str(cmap.peer),))
            self.maps[name] = MapState(cmap, npu, build_ike_config(config, cmap, acl))
        # One log line per IKE message (exchange, payloads, size, peer), at -v.
        self.endpoint = ike.IkeEndpoint(
            [m.ike_config for m in self.maps.values()], log=lambda line: log.info("%s", line)
        )
        self.counters: dict[str, int] = {}
        # Set by the daemon: the socket and address ESP goes to (raw or UDP 4500).
        self.esp_socket_for: EspSocketFn | None = None
        # Set by the daemon's split data path (ipsecmgr.workers): told of every Child SA
        # installed (with its keys) and removed, so the workers keep their own copies.
        self.on_child_installed: Callable[[str, ev.ChildSaInstalled], None] | None = None
        self.on_child_removed: Callable[[str, int, int], None] | None = None

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
                state.npu_map = npusim.CryptoMap(name, acl, (str(cmap.peer),))
                self.maps[name] = state
            else:
                npu = npusim.CryptoMap(name, acl, (str(cmap.peer),))
                self.maps[name] = MapState(cmap, npu, build_ike_config(config, cmap, acl))
        for name, state in old.items():
            if self.maps.get(name) is state:
                continue
            for sa in list(self.endpoint.sas):
                if sa.config is state.ike_config:
                    sa.delete(now)
            for key in list(state.children):
                self._remove_child(state, key)
            self.datapath.outbound.pop(name, None)
            log.info("crypto map %s: changed or removed by reload, SAs deleted", name)
        # Responders are matched against the new configs from now on; the IKE
        # SAs of kept maps keep the config object they were built with.
        self.endpoint.configs = [m.ike_config for m in self.maps.values()]
        self.pump(now)

    # -- steps 4 and 5 ------------------------------------------------------------

    def on_no_sa(self, name: str, packet: bytes, now: float) -> None:
        state = self.maps[name]
        if state.cmap.first_packet == "queue":
            if len(state.queue) < state.cmap.queue_size:
                state.queue.append(packet)
                state.bump("first_packet_queued")
            else:
                state.bump("queue_overflow_drops")
        else:
            state.bump("first_packet_drops")
        if state.cmap.role == "responder":
            # A responder waits for its peer to build the tunnel (e.g. the
            # TACACS+ server side: replies only follow a client's request).
            state.bump("no_sa_waiting_for_peer")
        elif state.ike_sa is None or state.ike_sa.dead:
            self.initiate(state, now)

    def initiate(self, state: MapState, now: float) -> None:
        sa = self.endpoint.initiate(state.ike_config, now)
        state.ike_sa = sa
        state.status = "connecting"
        state.bump("ike_initiated")
        log.info("crypto map %s: no SA, initiating IKE with %s", state.cmap.name, state.cmap.peer)
        self.pump(now)

    # -- IKE input -------------------------------------------------------------------

    def on_ike_datagram(self, data: bytes, local: Address, peer: Address, now: float) -> None:
        self.endpoint.receive_datagram(data, peer, now, local)
        self.pump(now)

    def on_timer(self, now: float) -> None:
        self.endpoint.handle_timer(now)
        self.pump(now)

    def next_deadline(self) -> float | None:
        return self.endpoint.get_timer()

    def pump(self, now: float) -> None:
        for data, peer in self.endpoint.datagrams_to_send(now):
            self.send(data, peer)
        while (event := self.endpoint.next_event()) is not None:
            self.on_event(event, now)

    # -- events -----------------------------------------------------------------------

    def _state_for(self, event: ev.IkeEvent) -> MapState | None:
        # The engine names an IKE SA "<config name>-<SPIi hex>".
        return self.maps.get(event.ike_sa.rsplit("-", 1)[0])

    def on_event(self, event: ev.IkeEvent, now: float) -> None:
        state = self._state_for(event)
        if state is None:
            log.warning("event for an IKE SA without a crypto map: %s", type(event).__name__)
            return
        name = state.cmap.name
        if isinstance(event, ev.IkeSaEstablished):
            state.ike_sa = self.endpoint.find_sa(event.ike_sa)
            state.status = "established"
            state.last_error = ""
            state.established_at = now
            log.info(
                "crypto map %s: IKE SA up with %s (%s)", name, state.cmap.peer, event.algorithms
            )
        elif isinstance(event, ev.ChildSaInstalled):
            self._install_child(state, event, now)
        elif isinstance(event, ev.ChildSaDeleted):
            self._remove_child(state, (event.ike_sa, event.child_id))
            log.info("crypto map %s: Child SA %d deleted (%s)", name, event.child_id, event.reason)
        elif isinstance(event, ev.IkeSaDeleted):
            for key in [k for k in state.children if k[0] == event.ike_sa]:
                self._remove_child(state, key)
            if state.ike_sa is None or state.ike_sa.name == event.ike_sa:
                if state.status != "failed":
                    state.status = "dead" if event.reason == "peer-dead" else "idle"
                state.ike_sa = None
            log.info("crypto map %s: IKE SA deleted (%s)", name, event.reason)
        elif isinstance(event, ev.PeerDead):
            state.bump("peer_dead")
            state.status = "dead"
            log.warning("crypto map %s: peer %s is dead", name, state.cmap.peer)
        elif isinstance(event, ev.AuthenticationFailed):
            state.status = "failed"
            state.last_error = f"AUTHENTICATION_FAILED: {event.detail}"
            state.bump("auth_failed")
            log.error("crypto map %s: authentication failed: %s", name, event.detail)
        elif isinstance(event, ev.ExchangeFailed):
            state.status = "failed" if state.status != "established" else state.status
            who = "peer sent" if event.by_peer else "we sent"
            state.last_error = f"{event.exchange}: {who} {event.notify}"
            state.bump("exchange_failed")
            log.error("crypto map %s: %s failed: %s %s", name, event.exchange, who, event.notify)
        elif isinstance(event, ev.InitialContactReceived):
            self._drop_others(state, event.ike_sa)
            log.info("crypto map %s: INITIAL_CONTACT from %s", name, event.remote_id)

    def _install_child(self, state: MapState, event: ev.ChildSaInstalled, now: float) -> None:
        inbound = esp.InboundSA(
            event.inbound_spi, event.inbound_key, mode=event.mode, esn=event.esn
        )
        outbound = esp.OutboundSA(
            event.outbound_spi, event.outbound_key, mode=event.mode, esn=event.esn
        )
        self.saflow.add(
            event.inbound_spi,
            inbound,
            [npu_selector(t) for t in event.remote_ts],
            [npu_selector(t) for t in event.local_ts],
            state.cmap.name,
        )
        if self.on_child_installed is not None:
            self.on_child_installed(state.cmap.name, event)
        self.datapath.outbound[state.cmap.name] = self._binding(state, event.ike_sa, outbound)
        state.children[(event.ike_sa, event.child_id)] = ChildRecord(
            event.child_id,
            inbound,
            outbound,
            event.mode,
            now,
            [str(t) for t in event.local_ts],
            [str(t) for t in event.remote_ts],
            event.esn,
            event.key_bits,
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
        binding = self.datapath.outbound[state.cmap.name]
        while state.queue:
            self.datapath.send_protected(binding, state.queue.popleft())
            state.bump("queued_sent")

    def _remove_child(self, state: MapState, key: tuple[str, int]) -> None:
        record = state.children.pop(key, None)
        if record is None:
            return
        self.saflow.remove(record.inbound.spi)
        if self.on_child_removed is not None:
            self.on_child_removed(state.cmap.name, record.inbound.spi, record.outbound.spi)
        binding = self.datapath.outbound.get(state.cmap.name)
        if binding is not None and binding.sa is record.outbound:
            del self.datapath.outbound[state.cmap.name]
            # A newer child of the same map takes over sending, if any.
            # The most recently installed child of the same map takes over sending.
            if state.children:
                (ike_name, _), newer = list(state.children.items())[-1]
                self.datapath.outbound[state.cmap.name] = self._binding(
                    state, ike_name, newer.outbound
                )

    def _binding(self, state: MapState, ike_name: str, outbound: esp.OutboundSA) -> OutboundBinding:
        sa = self.endpoint.find_sa(ike_name)
        nat_t = bool(sa is not None and sa.nat_t)
        peer: Address = sa.peer_addr if sa is not None else (str(state.cmap.peer), 500)
        assert self.esp_socket_for is not None, "the daemon sets esp_socket_for"
        sock, addr = self.esp_socket_for(peer, nat_t)
        return OutboundBinding(outbound, sock, addr, outbound.mode)

    def _drop_others(self, state: MapState, keep: str) -> None:
        """RFC 7296 §2.4 INITIAL_CONTACT: the peer has no other SA with us any more."""
        for sa in list(self.endpoint.sas):
            if sa.name != keep and sa.config is state.ike_config:
                sa.die("replaced (INITIAL_CONTACT)")
                state.bump("replaced_by_initial_contact")

    # -- commands ------------------------------------------------------------------

    def clear(self, now: float, peer: str | None = None) -> int:
        """``clear crypto sa``: DELETE every (or one peer's) IKE SA."""
        n = 0
        for state in self.maps.values():
            if peer is not None and str(state.cmap.peer) != peer:
                continue
            if state.ike_sa is not None and not state.ike_sa.dead:
                state.ike_sa.delete(now)
                n += 1
        self.pump(now)
        return n

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
                binding = self.datapath.outbound.get(name)
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

    def map_status(self) -> dict[str, str]:
        return {name: _MAP_STATUS.get(s.status, s.status) for name, s in self.maps.items()}
