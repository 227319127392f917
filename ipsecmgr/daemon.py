"""The gateway daemon's :class:`Gateway` (the only adapter between the pure
engines and the kernel); the process around it (``ipsecmgr run``: lock,
signals, the loop) is :mod:`ipsecmgr.serve`.

One asyncio loop in one process: readers on the TUN fds, the raw ESP sockets
and the IKE UDP sockets; one timer re-armed to the IKE engine's next
deadline; the control API for ``show``/``clear``. Start-up installs the
fail-closed routes, then takes over what a crash may have left (our TUNs,
stale routes; ipsecmgr.failclosed) before creating anything; stopping sends
DELETE to every peer and removes the TUNs, leaving the fail-closed block in
place unless ``[gateway] on_stop = "clear"``.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import ike
import npusim
from ipsecmgr import config as cfg
from ipsecmgr import reload, sdnotify, show, sockets
from ipsecmgr.counters import Counters
from ipsecmgr.datapath import Datapath
from ipsecmgr.failclosed import ProtectedPrefixes, sync_blocks, take_over
from ipsecmgr.manager import Manager
from ipsecmgr.mss import mss_limits
from ipsecmgr.offload import TUN_OFFLOAD_MAX_MTU, tun_offload_pays
from ipsecmgr.privileges import apply_least_privilege
from ipsecmgr.records import Address
from ipsecmgr.routing import Routing, TunRoute, tun_routes
from ipsecmgr.split_worker import SplitDatapath
from ipsecmgr.trace import PeerTable, Tracer
from ipsecmgr.tun import Tun

log = logging.getLogger("ipsecmgr")

NON_ESP_MARKER = b"\x00\x00\x00\x00"


def parse_acls(config: cfg.Config) -> dict[str, npusim.Acl]:
    # Compiled once, by the configuration's own check (config.compiled_acls)
    done = config.compiled_acls
    return {
        name: done.get(name) or npusim.parse_acl(name, list(a.rules))
        for name, a in config.access_lists.items()
    }


def build_classifier(config: cfg.Config, acls: dict[str, npusim.Acl]) -> npusim.Classifier:
    """Step 3's NPUSIM: the crypto maps in configuration order, each with its ACL."""
    return npusim.Classifier(
        [
            npusim.CryptoMap(name, acls[m.match_address], (str(m.peer),))
            for name, m in config.crypto_maps.items()
        ]
    )


def validate_acl(name: str, rules: list[str]) -> list[str]:
    """check-config hook: npusim's parser is the one authority on ACL syntax."""
    try:
        npusim.parse_acl(name, rules)
    except npusim.AclSyntaxError as exc:
        return [str(exc)]
    return []


def tun_layout(config: cfg.Config) -> object:
    return sorted((t.name, t.addresses, t.mtu, t.routes) for t in config.tuns)


@functools.lru_cache(maxsize=1024)
def _family(address: str) -> int:
    # cached: called for every IKE datagram sent (a handful of peer addresses)
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


class Gateway:
    """Everything the daemon owns, created in :meth:`start`, removed in :meth:`stop`."""

    #: :func:`ipsecmgr.serve.run` sets it: drop to CAP_NET_* etc. at the end of
    #: :meth:`setup` (privileges.py).
    least_privilege = False

    def __init__(self, config: cfg.Config, *, routing: Routing | None = None) -> None:
        self.config = config
        self.acls = parse_acls(config)
        self.classifier = build_classifier(config, self.acls)
        # The fail-closed routes, per crypto map (a reload touches the changed maps')
        self.blocks = ProtectedPrefixes(config, self.acls)
        self.saflow = npusim.SaFlowTable()
        self.routing = routing or Routing()
        self.tuns: list[Tun] = []
        self.esp_socks: dict[int, socket.socket] = {}
        self.bypass_socks: dict[int, socket.socket] = {}
        self.ike_socks: dict[tuple[str, int], socket.socket] = {}
        self._ike_sock_for: dict[tuple[int, int], socket.socket] = {}  # (family, port)
        # The data path (ipsecmgr.sasink.SaSink): this process's loop moves the packets,
        # or with [gateway] datapath = "split" two forked workers do (ipsecmgr.workers);
        # either reports back through the same callbacks.
        base = Datapath(
            self.classifier,
            self.saflow,
            self.esp_socks,
            self.bypass_socks,
            self.on_no_sa,
            on_udp_other=self.on_ike_natt,
            on_esp_from=self.on_esp_from,
            on_unknown_spi=self.on_unknown_spi,
            on_esp_out=self.on_esp_out,
        )
        self.datapath: Datapath | SplitDatapath = (
            SplitDatapath(base, on_inbound_counted=self.on_inbound_counted)
            if config.gateway.datapath == "split"
            else base
        )
        self.manager = Manager(config, self.acls, self.datapath, self._send_ike)
        # Installed on the data path and the manager only while a trace client is attached.
        # Peer address -> crypto map, for the tracer: kept up to date per changed map
        self.peer_table = PeerTable(config)
        self.tracer = Tracer((self.datapath, self.manager))
        self.tracer.peers = self.peer_table.peers
        self.loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.counters = Counters()
        self.started_at = time.time()

    # -- time ----------------------------------------------------------------------

    def now(self) -> float:
        return self.loop.time() if self.loop is not None else time.monotonic()

    # -- set-up and tear-down ---------------------------------------------------

    def cleanup_stale(self) -> None:
        """Fail-closed routes first, then remove what a killed daemon left (stale
        routes, our TUN names), rules only where missing (ipsecmgr.failclosed)."""
        for note in self.blocks.notes:
            log.warning("fail closed: %s", note)
        for failed in take_over(self.routing, self.config, self.blocks.prefixes()):
            log.warning("fail closed: NOT protected while the daemon is down: %s", failed)

    def setup(self) -> None:
        """Sockets, TUNs, routes and rules. Runs before the event loop starts:
        pyroute2's synchronous API drives an asyncio loop of its own."""
        self.cleanup_stale()
        mark = self.routing.mark
        families = {_family(str(a)) for a in self.config.gateway.local_addresses}
        for fam in families:
            self.esp_socks[fam] = sockets.esp_socket(fam, mark)
            self.bypass_socks[fam] = sockets.bypass_socket(fam, mark)
        offload = self.config.gateway.offload
        for addr in self.config.gateway.local_addresses:
            fam = _family(str(addr))
            for port in (self.config.gateway.ike_port, self.config.gateway.natt_port):
                sock = sockets.udp_socket(fam, str(addr), port, mark)
                self.ike_socks[(str(addr), port)] = sock
                if port == self.config.gateway.natt_port:  # ESP-in-UDP: the data path reads it
                    gso = offload and sockets.enable_udp_offload(sock)[0]
                    self.datapath.add_natt_socket((str(addr), port), sock, gso)
        for t in self.config.tuns:
            tun = Tun(t.name, t.mtu, offload=offload and tun_offload_pays(t.mtu))
            if offload and not tun_offload_pays(t.mtu):
                log.info("TUN %s: MTU %d, no TUN super-packets (they pay up to MTU %d); "
                         "UDP GSO/GRO stay on", t.name, t.mtu, TUN_OFFLOAD_MAX_MTU)  # fmt: skip
            self.tuns.append(tun)
            for a in t.addresses:
                self.routing.add_address(tun.name, str(a))
            self.routing.add_tun_routes(tun.name, self._routes_for(t))
            limits = mss_limits(tun.mtu, self.config.gateway.mss_clamp)
            self.datapath.add_tun(tun.fd, list(t.crypto_maps), limits, tun.vnet_hdr)
        if self.least_privilege:  # before the fork: the workers inherit the reduced set
            apply_least_privilege()
        self.datapath.start()  # split: forks the workers (sockets and TUNs exist, no SA yet)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Register the readers with the running loop."""
        self.loop = loop
        # TUNs, raw ESP and UDP 4500 (ESP-in-UDP and IKE on it, RFC 3948): the data
        # path's (split: the workers read them, this loop reads the workers)
        self.datapath.attach(loop)
        natt = self.config.gateway.natt_port
        for local, sock in self.ike_socks.items():
            if local[1] != natt:
                loop.add_reader(sock, self._on_udp_readable, sock, local)
        log.info(
            "gateway up: %d TUN(s), %d crypto map(s), IKE on %s",
            len(self.tuns),
            len(self.config.crypto_maps),
            ", ".join(f"{a}:{p}" for a, p in self.ike_socks),
        )

    def _routes_for(self, t: cfg.TunInterface) -> list[TunRoute]:
        return tun_routes(self.config, self.acls, t)

    def detach(self) -> None:
        """Leaving the loop: DELETE to every peer (RFC 7296 §1.4.1), stop reading."""
        try:
            self.manager.clear(self.now())
        except Exception:  # shutting down must finish whatever the state
            log.exception("sending DELETE on shutdown failed")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.loop is not None:
            self.datapath.detach(self.loop)
            for sock in self.ike_socks.values():
                self.loop.remove_reader(sock)
        self.loop = None

    def teardown(self) -> None:
        """Remove TUNs, routes and rules, close the sockets (after the loop ended)."""
        self.datapath.stop()  # first: split workers hold the TUN fds
        for sock in (
            *self.esp_socks.values(),
            *self.ike_socks.values(),
            *self.bypass_socks.values(),
        ):
            sock.close()
        for tun in self.tuns:
            tun.close()
        self.tuns.clear()
        if self.config.gateway.on_stop == "clear":
            self.routing.remove_rules()
            self.routing.flush_table()
        else:  # "block": the TUN routes went with the TUNs; the blocks and rules stay
            self.routing.flush_except_blocks(self.blocks.prefixes())
            log.warning("stopped; protected destinations stay blocked (on_stop = \"block\") "
                        "until the next start or 'ipsecmgr down'")  # fmt: skip
        self.routing.close()

    def reload(self, config: cfg.Config) -> None:
        """SIGHUP: apply a new configuration, keeping the SAs of crypto maps
        whose definition (map, ACL, transform sets, TUN) did not change."""
        if tun_layout(config) != tun_layout(self.config) or (config.gateway != self.config.gateway):
            log.warning("reload: TUN or gateway settings changed; they need a restart")
            return
        # Only the changed maps are looked at further (ipsecmgr.reload, issue #19.7)
        diff = reload.MapDiff.of(self.config, config)
        acls, parsed = reload.reuse_acls(self.config, self.acls, config)
        touched = diff.changed | diff.added | diff.removed
        block, unblock = self.blocks.update(config, acls, touched)
        for failed in sync_blocks(block, unblock):
            log.warning("fail closed: NOT protected while the daemon is down: %s", failed)
        rebuild = reload.classifier_changed(self.config, config, touched)
        self.acls = acls
        old, self.config = self.config, config
        if rebuild:  # an ACL, a peer or the maps' order changed
            self.classifier = build_classifier(config, acls)
            self.datapath.set_classifier(self.classifier)
        # (the endpoint drops the PSK-derived keys of the configs it no longer uses)
        self.manager.reconfigure(config, acls, set(diff.kept), self.now())
        self.peer_table.update(old, config, touched)
        self.tracer.peers = self.peer_table.peers  # (a new dict if it was built again)
        self._rearm()
        changed = sorted(diff.changed | diff.added)
        work = self.manager.last_reload
        log.info("reloaded: kept %d map(s), rebuilt %s, removed %s; work: %d map state(s) "
                 "built, %d IKE SA(s) deleted, %d ACL(s) new, fail-closed +%d -%d, "
                 "classifier %s", len(diff.kept), changed or "none",
                 sorted(diff.removed) or "none", len(work.built), work.sas_deleted, parsed,
                 len(block), len(unblock), "rebuilt" if rebuild else "kept")  # fmt: skip

    # -- data path glue ----------------------------------------------------------------

    def on_no_sa(self, name: str, packet: bytes) -> None:
        """Steps 4-5: PROTECT without a Child SA (either data path reports it)."""
        self.manager.on_no_sa(name, packet, self.now())
        self._rearm()

    def on_esp_from(self, name: str, peer: Address) -> None:
        """Authentic ESP-in-UDP of ``name`` from ``peer`` (NAT rebinding, RFC 7296 §2.23)."""
        self.manager.on_esp_from(name, peer)

    # -- IKE glue -------------------------------------------------------------------------

    def _on_udp_readable(self, sock: socket.socket, local: Address) -> None:
        """IKE on UDP 500 (RFC 7296 §2.11)."""
        for _ in range(32):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._bump("udp_recv_errors")
                break
            self.manager.on_ike_datagram(data, local, (addr[0], addr[1]), self.now())
        self._rearm()

    def on_unknown_spi(self, spi: int, src: bytes, family: int, udp: Address | None) -> None:
        """ESP for an SPI we do not know: INVALID_SPI to its sender (RFC 7296 §1.5)."""
        if self.manager.on_unknown_spi(spi, src, family, udp, self.now()):
            self._rearm()  # a protected one waits for its answer (a retransmission timer)

    def on_esp_out(self, name: str, packet: bytes) -> None:
        """The first ESP after a quiet spell on a map: its answer is due (RFC 7296 §2.4)."""
        self.manager.on_esp_out(name, packet, self.now())
        self._rearm()

    def on_inbound_counted(self, name: str) -> None:
        """Split data path: crypto map ``name``'s inbound counters are fresh (asked by
        ``SaSink.refresh_inbound``): did anything come back (ipsecmgr.invalid_spi)?"""
        self.manager.on_inbound_counted(name, self.now())
        self._rearm()

    def on_ike_natt(self, data: bytes, local: Address, peer: Address) -> None:
        """IKE on UDP 4500 (RFC 3948): the data path reads that socket in batches (UDP
        GRO) and hands IKE back here; ESP that decrypted reports its sender through
        :meth:`on_esp_from`. Only IKE moves the engine's timers, so ESP alone costs
        no timer re-arm."""
        self.manager.on_ike_datagram(data, local, peer, self.now())
        self._rearm()

    def _send_ike(self, data: bytes, peer: Address, local: Address | None) -> None:
        port = (
            self.config.gateway.natt_port
            if data[:4] == NON_ESP_MARKER
            else self.config.gateway.ike_port
        )
        # From the SA's own address (RFC 7296 §2.11: a response leaves from the
        # address its request was received at), with several local addresses too
        sock = self.ike_socks.get((local[0], port)) if local is not None else None
        if sock is None:  # no address (unprotected INVALID_SPI): any of the family
            sock = self._ike_sock_of_family(_family(peer[0]), port)
        if sock is None:
            self._bump("ike_no_socket")
            return
        try:
            sock.sendto(data, peer)
        except OSError as exc:
            self._bump("ike_send_errors")
            log.debug("IKE send to %s failed: %s", peer, exc)

    def _ike_sock_of_family(self, fam: int, port: int) -> socket.socket | None:
        sock = self._ike_sock_for.get((fam, port))
        if sock is None:
            sock = next(
                (s for (a, p), s in self.ike_socks.items() if p == port and _family(a) == fam),
                None,
            )
            if sock is not None:
                self._ike_sock_for[(fam, port)] = sock  # the sockets live as long as we do
        return sock

    def _rearm(self) -> None:
        if self.loop is None:
            return
        deadline = self.manager.next_deadline()
        if self._timer is not None:
            if deadline is not None and self._timer.when() == deadline:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.manager.on_timer(self.now())
        self._rearm()

    def _bump(self, name: str) -> None:
        self.counters[name] += 1

    def status_line(self) -> str:
        """systemd's STATUS= (ipsecmgr.sdnotify): maps up/total, SA counts."""
        child_sas = sum(len(s.children) for s in self.manager.maps.values())
        return sdnotify.status_line(
            self.manager.map_status(), len(self.manager.endpoint.sas), child_sas
        )

    # -- control API -------------------------------------------------------------------------

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {
            "snapshot": lambda req: self.snapshot(),
            "clear": lambda req: {"cleared": self._clear(req.get("peer"))},
            "trace": self.tracer.subscribe,  # streams events until the client leaves
            "trace-keys": lambda req: self.manager.export_keys(),  # --wireshark-keys only
        }

    def snapshot(self) -> show.Snapshot:
        self.datapath.refresh_counters()  # split: the workers' into the SAs and statistics
        now, wall = self.now(), time.time()
        return {
            "time": wall,
            "hostname": socket.gethostname(),
            "uptime": wall - self.started_at,
            "crypto_maps": show.crypto_map_states(
                self.config,
                self.manager.map_status(now),
                self.manager.map_errors(),
                self.manager.failover.rows(now),
            ),
            "ike_sas": self.manager.ike_sa_states(now, wall),
            "child_sas": self.manager.child_sa_states(now, wall),
            "statistics": self.statistics(),
        }

    def _clear(self, peer: str | None) -> int:
        n = self.manager.clear(self.now(), peer)
        self._rearm()
        return n

    async def delete_all(self, grace: float) -> None:
        """SIGTERM: DELETE every IKE SA (RFC 7296 §1.4.1) and keep the loop running
        until the peers answered or ``grace`` passed. A DELETE queued behind a
        request in flight (window size 1, §2.3) is sent once that one is answered."""
        self._clear(None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while loop.time() < deadline and any(
            sa.established or sa.state == ike.State.DELETING for sa in self.manager.endpoint.sas
        ):
            await asyncio.sleep(0.01)  # the readers and the timer process the answers

    def statistics(self) -> show.Statistics:
        """Flat counter groups: ``group[name]``, per-map counters as ``map/name``."""
        ike_counters = dict(self.manager.endpoint.counters)
        for sa in self.manager.endpoint.sas:
            for k, v in sa.counters.items():
                ike_counters[k] = ike_counters.get(k, 0) + v
        for name, state in self.manager.maps.items():
            for k, v in state.counters.items():
                ike_counters[f"{name}/{k}"] = v
        classifier = _flatten(self.classifier.counters)
        classifier.update(_flatten(self.saflow.counters))
        dp = self.datapath.counters
        return {
            "ike": ike_counters,
            "esp": {k: v for k, v in dp.items() if not k.startswith(("tun_", "bypass_"))},
            "classifier": classifier,
            "tun": {k: v for k, v in dp.items() if k.startswith(("tun_", "bypass_"))}
            | dict(self.counters),
        }


def _flatten(groups: dict[str, dict[str, int]]) -> dict[str, int]:
    return {f"{g}/{k}": v for g, counters in groups.items() for k, v in counters.items()}
