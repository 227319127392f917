"""``[gateway] datapath = "split"``: the data path in two worker processes.

The default ("single") runs everything in the daemon's one asyncio loop, so
one core carries IKE, the timers, the control socket and every packet. In
"split" mode the daemon forks two workers right after :meth:`Gateway.setup`
(sockets and TUNs exist, no SA yet, no event loop yet) and keeps the control
plane for itself::

    control process (asyncio)           OUTBOUND worker             INBOUND worker
    IKE on UDP 500 (and what the        TUN read (step 2)           ESP read (8): raw, and
    INBOUND worker forwards from        classify (3)                UDP 4500 (IKE on it goes
    4500), timers, control socket,      encrypt + send (7)          to control), SPI lookup (9)
    first packets (steps 4-5)                                       decrypt, policy (10)
          |   install / remove SA,        owns every OutboundSA       TUN write (12)
          |   queued packets, stats       and its sequence numbers    owns every InboundSA
          +--------- socketpair ---------->+                           and its replay window
          +--------- socketpair ------------------------------------->+
          <-- PROTECT without SA (4-5), counters -+------------------+

Both workers run the same :class:`ipsecmgr.datapath.Datapath` code as the
single-process mode: one copy of the per-packet logic. Each SA lives in exactly
one process, so sequence numbers (RFC 4303 §3.3.3) and the anti-replay window
(§3.4.3) have a single owner; the control process keeps its own objects only
for ``show`` and copies the workers' counters into them on request.

Control messages are processed between packet batches (``Datapath.BATCH``), so
installing, rekeying or deleting an SA never pauses traffic. A worker exits
when the socketpair reaches EOF (the control process closed it or died) and,
as a second guard, on PR_SET_PDEATHSIG. The messages are pickled tuples
between a parent and the children it forked; keys travel in them and are
never logged.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import os
import pickle
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import esp
import npusim
from ike import events as ev
from ike.invalid_spi import SourceLimit
from ipsecmgr.counters import Counters
from ipsecmgr.datapath import Datapath, OutboundBinding
from ipsecmgr.mss import mss_limits
from ipsecmgr.translate import npu_selector

if TYPE_CHECKING:
    import asyncio

    from ipsecmgr.daemon import Gateway
    from ipsecmgr.records import MapState

log = logging.getLogger("ipsecmgr.workers")

OUTBOUND, INBOUND = "outbound", "inbound"
MAX_MESSAGE = 1 << 18  # a packet (<= 64 KiB) plus its envelope
STATS_TIMEOUT = 1.0  # s a snapshot waits for the workers' counters
STATS_PERIOD = 1.0  # s between background counter pulls (DPD's "did anything arrive")
PR_SET_PDEATHSIG = 1
HEADERS = 120  # bytes of an inner packet: IPv6 + TCP headers with options (esp_out)

Message = tuple[Any, ...]
SockRef = tuple[str, Any]  # ("esp", family) | ("udp", (address, port))


def _send(sock: socket.socket, msg: Message, timeout: float = 2.0) -> bool:
    """One message on a non-blocking SOCK_SEQPACKET; waits at most ``timeout`` for room."""
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.send(data)
            return True
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [sock], [], left)[1]:
                return False
        except OSError:
            return False


def _recv(sock: socket.socket) -> Message | None:
    """The next message, None when none is waiting; EOFError when the peer is gone."""
    try:
        data = sock.recv(MAX_MESSAGE)
    except (BlockingIOError, InterruptedError):
        return None
    except ConnectionError as exc:
        raise EOFError from exc
    if not data:
        raise EOFError
    msg: Message = pickle.loads(data)
    return msg


# -- the worker side (runs in the forked child) --------------------------------------------


class Worker:
    """One direction of the data path, in its own process.

    ``dp`` is a fresh :class:`Datapath` over the sockets and TUN fds inherited
    from the daemon, with its own SA-flow table: the SAs it holds exist only here.
    """

    def __init__(self, gw: Gateway, role: str, ctrl: socket.socket) -> None:
        self.gw = gw
        self.role = role
        self.ctrl = ctrl
        self.dp = Datapath(
            gw.classifier, npusim.SaFlowTable(), gw.esp_socks, gw.bypass_socks, self._on_no_sa
        )
        for tun in gw.tuns:
            self.dp.mss_limits[tun.fd] = mss_limits(tun.mtu, gw.config.gateway.mss_clamp)
        self.dp.tun_for_map = dict(gw.datapath.tun_for_map)
        # The offloads the daemon got from the kernel (TUN vnet header, UDP GSO).
        self.dp.vnet_fds = set(gw.datapath.vnet_fds)
        self.dp.gso_socks = set(gw.datapath.gso_socks)
        # UDP 4500 is read here (INBOUND): IKE and NAT rebinding go to the control process.
        self.dp.on_udp_other = self._ike_to_control
        self.dp.on_esp_from = self._esp_from
        self.dp.on_unknown_spi = self._unknown_spi_to_control
        self.dp.on_esp_out = self._esp_out_to_control
        # The control process rate-limits INVALID_SPI per source (RFC 7296 §2.21.4);
        # the same limit here keeps an unknown-SPI flood off the socketpair.
        self._unknown_spi_limit = SourceLimit()
        self._esp_peers: dict[str, tuple[str, int]] = {}
        self.out_sas: dict[int, esp.OutboundSA] = {}

    def _ike_to_control(self, data: bytes, local: tuple[str, int], peer: tuple[str, int]) -> None:
        if not _send(self.ctrl, ("ike_in", data, local, peer), timeout=0.0):
            self.dp.counters["ike_forward_drops"] += 1

    def _esp_from(self, name: str, peer: tuple[str, int]) -> None:
        """An authentic ESP-in-UDP packet of ``name`` from ``peer``: the control process
        decides about NAT rebinding (RFC 7296 §2.23). Told once per peer change; the
        memory is cleared with every counter pull (1 s), so a refusal is retried."""
        if self._esp_peers.get(name) != peer:
            self._esp_peers[name] = peer
            _send(self.ctrl, ("esp_from", name, peer), timeout=0.0)

    def _unknown_spi_to_control(
        self, spi: int, src: bytes, family: int, udp: tuple[str, int] | None
    ) -> None:
        if self._unknown_spi_limit.allow(src.hex(), time.monotonic()):
            _send(self.ctrl, ("unknown_spi", spi, src, family, udp), timeout=0.0)

    def _esp_out_to_control(self, name: str, packet: bytes) -> None:
        """The first ESP after a quiet spell on ``name`` (ipsecmgr.invalid_spi): its
        inner packet's headers say whether anything answers it."""
        _send(self.ctrl, ("esp_out", name, bytes(packet[:HEADERS])), timeout=0.0)

    def _on_no_sa(self, name: str, packet: bytes) -> None:
        """Steps 4-5 belong to the control process (IKE, the first-packet policy)."""
        if not _send(self.ctrl, ("no_sa", name, packet), timeout=0.0):
            self.dp.counters["no_sa_forward_drops"] += 1

    def _sock(self, ref: SockRef) -> socket.socket:
        kind, key = ref
        return self.gw.esp_socks[key] if kind == "esp" else self.gw.ike_socks[key]

    def handle(self, msg: Message) -> None:
        """One control message; called between packet batches."""
        kind = msg[0]
        dp = self.dp
        if kind == "bind":  # outbound: this SA now carries the crypto map's traffic
            _, name, spi, key, mode, esn, ref, peer = msg
            sa = self.out_sas.get(spi)
            if sa is None:
                if not key:  # a rebinding to an SA already forgotten: nothing to send with
                    return
                sa = self.out_sas[spi] = esp.OutboundSA(spi, key, mode=mode, esn=esn)
            dp.outbound[name] = OutboundBinding(sa, self._sock(ref), peer, mode, name)
        elif kind == "watch":  # report the next ESP of this map (ipsecmgr.invalid_spi)
            dp.watch_outbound(msg[1])
        elif kind == "in_counts":  # a map's inbound packet counts, fresh (invalid_spi)
            _, name, spis = msg
            counts = {spi: flow.sa.counters.packets  # type: ignore[attr-defined]
                      for spi in spis if (flow := dp.saflow.lookup(spi)) is not None}  # fmt: skip
            _send(self.ctrl, ("in_counts", name, counts))
        elif kind == "unbind":
            dp.outbound.pop(msg[1], None)
        elif kind == "send":  # a queued first packet (step 5, first_packet = "queue")
            binding = dp.outbound.get(msg[1])
            if binding is not None:
                dp.send_protected(binding, msg[2])
        elif kind == "in_add":
            _, name, spi, key, mode, esn, src_sel, dst_sel = msg
            sa_in = esp.InboundSA(spi, key, mode=mode, esn=esn)
            dp.saflow.add(spi, sa_in, src_sel, dst_sel, name)
        elif kind == "forget":  # the Child SA was deleted: both directions go
            _, in_spi, out_spi = msg
            dp.saflow.remove(in_spi)
            self.out_sas.pop(out_spi, None)
        elif kind == "esp_in":  # ESP-in-UDP arrived on the control's UDP 4500 socket
            _, data, src, dst, family = msg
            dp.handle_inbound(data, src, dst, family)
        elif kind == "classifier":  # SIGHUP reload
            dp.classifier = msg[1]
        elif kind == "stats":
            self._esp_peers.clear()
            _send(self.ctrl, ("stats", self.role, msg[1], self.stats()))

    def stats(self) -> dict[str, Any]:
        sas: dict[int, tuple[int, int, dict[str, int]]] = {}
        for spi, sa in self.out_sas.items():
            sas[spi] = (sa.counters.packets, sa.counters.bytes, dict(sa.counters.drops))
        for flow in self.dp.saflow:
            c = flow.sa.counters  # type: ignore[attr-defined]
            sas[flow.spi] = (c.packets, c.bytes, dict(c.drops))
        return {
            "dp": dict(self.dp.counters),
            "classifier": self.dp.classifier.counters if self.role == OUTBOUND else None,
            "saflow": self.dp.saflow.counters if self.role == INBOUND else None,
            "sas": sas,
        }

    def serve(self) -> None:
        """Poll the data fds and the control socket; drain a batch per wake-up."""
        poller = select.poll()
        # The control socket first: poll reports ready fds in registration order, so an
        # SA added by a message is in place before the ESP that arrived with it is read.
        ctrl_fd = self.ctrl.fileno()
        poller.register(ctrl_fd, select.POLLIN)
        handlers: dict[int, Callable[[], None]] = {}
        if self.role == OUTBOUND:
            for tun in self.gw.tuns:
                handlers[tun.fd] = functools.partial(self.dp.on_tun_readable, tun.fd)
        else:
            for fam, sock in self.gw.esp_socks.items():
                handlers[sock.fileno()] = functools.partial(self.dp.on_esp_readable, fam)
            natt = self.gw.config.gateway.natt_port
            for local, sock in self.gw.ike_socks.items():
                if local[1] == natt:
                    handlers[sock.fileno()] = functools.partial(
                        self.dp.on_udp_readable, sock, local
                    )
        for fd in handlers:
            poller.register(fd, select.POLLIN)
        poll = poller.poll
        while True:
            for fd, _ in poll():
                if fd == ctrl_fd:
                    try:
                        while (msg := _recv(self.ctrl)) is not None:
                            try:
                                self.handle(msg)
                            except (ValueError, KeyError, IndexError, TypeError):
                                # A bad SA from the control process must not stop traffic.
                                c = self.dp.counters
                                c["control_errors"] = c.get("control_errors", 0) + 1
                    except EOFError:
                        return
                else:
                    handlers[fd]()


def _worker_main(gw: Gateway, role: str, ctrl: socket.socket) -> None:
    """The forked child's whole life; never returns into the daemon's code."""
    code = 0
    try:
        # The parent's signal dispositions are not ours: Ctrl-C on the terminal goes
        # to the process group, and the control process decides when we stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        worker = Worker(gw, role, ctrl)
        # Everything inherited from the daemon is long-lived: keep the collector off it,
        # and let the per-packet tuples (struct unpacks) trigger it less often.
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        profile = os.environ.get("IPSECMGR_PROFILE")
        if profile:
            # tools/bench/tunnel.py --profile: the worker's own stats, PATH.<pid>.
            import cProfile

            sys.setprofile(None)  # the parent's profiler, inherited by fork
            prof = cProfile.Profile()
            try:
                prof.runcall(worker.serve)
            finally:
                prof.dump_stats(f"{profile}.{os.getpid()}")
        else:
            worker.serve()
    except BaseException:  # a worker must never unwind into the parent's stack
        code = 1
        with contextlib.suppress(Exception):
            log.exception("%s worker failed", role)
    finally:
        os._exit(code)


# -- the control side ------------------------------------------------------------------------


class ForwardingOutbound(dict[str, OutboundBinding]):
    """The control process's ``Datapath.outbound``: every change is also sent to the
    OUTBOUND worker, which owns the sending SAs (the manager's rekey logic is unchanged)."""

    def __init__(self, workers: Workers) -> None:
        super().__init__()
        self.workers = workers

    def __setitem__(self, name: str, binding: OutboundBinding) -> None:
        super().__setitem__(name, binding)
        self.workers.bind(name, binding)

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        self.workers.to(OUTBOUND, ("unbind", name))

    def pop(self, name: str, default: Any = None) -> Any:
        if name not in self:
            return default
        value = super().pop(name)
        self.workers.to(OUTBOUND, ("unbind", name))
        return value


class ControlDatapath(Datapath):
    """What the control process keeps of the data path: it moves no packet itself.

    Queued first packets go to the OUTBOUND worker (it owns the sequence numbers),
    ESP-in-UDP from the control's UDP 4500 socket to the INBOUND worker (it owns
    the replay windows)."""

    def __init__(self, base: Datapath, workers: Workers) -> None:
        self.workers = workers
        super().__init__(
            base.classifier, base.saflow, base.esp_sockets, base.bypass_sockets, base.on_no_sa
        )
        self.tun_for_map = base.tun_for_map
        self.vnet_fds = base.vnet_fds  # write_tun (ipsecmgr.reject's answers) from here
        self.trace = base.trace
        self.outbound = ForwardingOutbound(workers)
        self.own = Counters()  # counted here (forwarding failures), merged into counters

    @property
    def classifier(self) -> npusim.Classifier:
        return self._classifier

    @classifier.setter
    def classifier(self, value: npusim.Classifier) -> None:
        # SIGHUP swaps the classifier; the OUTBOUND worker classifies and the INBOUND
        # worker checks decrypted packets against the ACL with it: each gets a copy.
        self._classifier = value
        if self.workers.started:
            self.workers.to(OUTBOUND, ("classifier", value))
            self.workers.to(INBOUND, ("classifier", value))

    def send_protected(self, binding: OutboundBinding, packet: bytes) -> None:
        name = next((n for n, b in self.outbound.items() if b is binding), None)
        if name is None or not self.workers.to(OUTBOUND, ("send", name, packet)):
            self.own["forward_errors"] = self.own.get("forward_errors", 0) + 1

    def watch_outbound(self, name: str) -> None:
        self.workers.to(OUTBOUND, ("watch", name))

    def handle_inbound(self, data: bytes, src: bytes, dst: bytes, family: int) -> str | None:
        if not self.workers.to(INBOUND, ("esp_in", data, src, dst, family)):
            self.own["forward_errors"] = self.own.get("forward_errors", 0) + 1
        return None


class Workers:
    """The control process's handle on its two workers."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.started = False
        self.pids: dict[str, int] = {}
        self.socks: dict[str, socket.socket] = {}
        self.keys: dict[int, bytes] = {}  # outbound SPI -> key, until bound
        self.loop: asyncio.AbstractEventLoop | None = None
        self._token = 0
        self._seen: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Fork both workers (after setup: sockets and TUNs exist; before the event loop)."""
        gw = self.gw
        for role in (OUTBOUND, INBOUND):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            for s in (mine, theirs):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
                s.setblocking(False)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child: close the control ends it inherited, then serve
                mine.close()
                for other in self.socks.values():
                    other.close()
                _worker_main(gw, role, theirs)
            theirs.close()
            self.pids[role] = pid
            self.socks[role] = mine
            self._seen[role] = 0
        self.started = True
        control = ControlDatapath(gw.datapath, self)
        gw.datapath = control
        gw.manager.datapath = control
        gw.manager.on_child_installed = self.child_installed
        gw.manager.on_child_removed = self.child_removed
        gw.manager.invalid_spi.confirm = self.confirm_silence
        log.info("split data path: outbound worker %d, inbound worker %d",
                 self.pids[OUTBOUND], self.pids[INBOUND])  # fmt: skip

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        for role, sock in self.socks.items():
            loop.add_reader(sock, self._on_readable, role)
        self._timer = loop.call_later(STATS_PERIOD, self._periodic)

    def detach(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.loop is not None:
            for sock in self.socks.values():
                self.loop.remove_reader(sock)
        self.loop = None

    def stop(self, timeout: float = 5.0) -> None:
        """EOF to both workers, then wait for them (they hold the TUN fds: the device is
        only gone, and teardown only complete, once they exited)."""
        self.detach()
        for sock in self.socks.values():
            sock.close()
        self.socks.clear()
        deadline = time.monotonic() + timeout
        for role, pid in list(self.pids.items()):
            while True:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    log.warning("%s worker %d did not exit; killing it", role, pid)
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                # Polling a child's exit with a deadline (waitpid has no timeout).
                time.sleep(0.005)
            del self.pids[role]
        self.started = False

    # -- control -> workers ------------------------------------------------------------------

    def to(self, role: str, msg: Message) -> bool:
        sock = self.socks.get(role)
        return sock is not None and _send(sock, msg)

    def child_installed(self, name: str, event: ev.ChildSaInstalled) -> None:
        """Manager hook: both halves of a new Child SA (called before the outbound binding)."""
        self.keys[event.outbound_spi] = event.outbound_key
        self.to(INBOUND, ("in_add", name, event.inbound_spi, event.inbound_key, event.mode,
                          event.esn, [npu_selector(t) for t in event.remote_ts],
                          [npu_selector(t) for t in event.local_ts]))  # fmt: skip

    def child_removed(self, name: str, in_spi: int, out_spi: int) -> None:
        self.keys.pop(out_spi, None)
        for role in (OUTBOUND, INBOUND):
            self.to(role, ("forget", in_spi, out_spi))

    def confirm_silence(self, state: MapState) -> None:
        """Nothing came back on ``state``'s map, by counters up to STATS_PERIOD old: ask
        the INBOUND worker for its Child SAs' counts now (ipsecmgr.invalid_spi)."""
        spis = [rec.inbound.spi for rec in state.children.values()]
        if not self.to(INBOUND, ("in_counts", state.cmap.name, spis)):
            self._silence_confirmed(state.cmap.name, {})  # decide on what we have

    def _silence_confirmed(self, name: str, counts: dict[int, int]) -> None:
        mgr = self.gw.manager
        state = mgr.maps.get(name)
        if state is not None:
            for rec in state.children.values():
                got = counts.get(rec.inbound.spi)
                if got is not None:
                    rec.inbound.counters.packets = max(rec.inbound.counters.packets, got)
        mgr.invalid_spi.confirmed(mgr, name, self.gw.now())
        self.gw._rearm()

    def bind(self, name: str, binding: OutboundBinding) -> None:
        sa = binding.sa
        key = self.keys.get(sa.spi)
        if key is None:  # a rebinding to an SA the worker already holds
            key = b""
        self.to(OUTBOUND, ("bind", name, sa.spi, key, sa.mode, sa.esn,
                           self._sock_ref(binding.sock), binding.peer))  # fmt: skip

    def _sock_ref(self, sock: socket.socket) -> SockRef:
        for fam, s in self.gw.esp_socks.items():
            if s is sock:
                return ("esp", fam)
        for local, s in self.gw.ike_socks.items():
            if s is sock:
                return ("udp", local)
        raise ValueError("binding on a socket the workers do not have")

    # -- workers -> control ------------------------------------------------------------------

    def _on_readable(self, role: str) -> None:
        sock = self.socks.get(role)
        if sock is None:
            return
        for _ in range(64):
            try:
                msg = _recv(sock)
            except EOFError:
                log.error("%s worker exited; the data path is down", role)
                if self.loop is not None:
                    self.loop.remove_reader(sock)
                return
            if msg is None:
                return
            self._handle(msg)

    def _handle(self, msg: Message) -> None:
        if msg[0] == "no_sa":
            self.gw._on_no_sa(msg[1], msg[2])
        elif msg[0] == "ike_in":  # IKE that arrived on UDP 4500 (the INBOUND worker reads it)
            _, data, local, peer = msg
            self.gw.manager.on_ike_datagram(data, local, peer, self.gw.now())
            self.gw._rearm()
        elif msg[0] == "esp_from":
            self.gw.manager.on_esp_from(msg[1], msg[2])
        elif msg[0] == "esp_out":  # the first ESP after a quiet spell (invalid_spi)
            self.gw._on_esp_out(msg[1], msg[2])
        elif msg[0] == "in_counts":
            self._silence_confirmed(msg[1], msg[2])
        elif msg[0] == "unknown_spi":  # ESP for an SPI the INBOUND worker does not know
            self.gw._on_unknown_spi(msg[1], msg[2], msg[3], msg[4])
        elif msg[0] == "stats":
            _, role, token, stats = msg
            self._seen[role] = max(self._seen.get(role, 0), token)
            self._apply(role, stats)

    def _periodic(self) -> None:
        self._token += 1
        for role in self.socks:
            self.to(role, ("stats", self._token))
        if self.loop is not None:
            self._timer = self.loop.call_later(STATS_PERIOD, self._periodic)

    def refresh(self) -> None:
        """Fresh counters from both workers into the control's objects (``show``)."""
        if not self.started:
            return
        self._token += 1
        token = self._token
        for role in self.socks:
            self.to(role, ("stats", token))
        deadline = time.monotonic() + STATS_TIMEOUT
        deferred: list[Message] = []
        while any(self._seen.get(r, 0) < token for r in self.socks):
            left = deadline - time.monotonic()
            waiting = [s for r, s in self.socks.items() if self._seen.get(r, 0) < token]
            if left <= 0 or not select.select(waiting, [], [], left)[0]:
                log.warning("a worker did not answer the counter request in time")
                break
            for sock in self.socks.values():
                with contextlib.suppress(EOFError):
                    while (msg := _recv(sock)) is not None:
                        if msg[0] == "stats":
                            self._handle(msg)
                        else:
                            deferred.append(msg)
        # First-packet requests met while waiting run after the snapshot, from the loop.
        for msg in deferred:
            if self.loop is not None:
                self.loop.call_soon(self._handle, msg)
            else:
                self._handle(msg)

    def _apply(self, role: str, stats: dict[str, Any]) -> None:
        gw = self.gw
        dp = gw.datapath
        assert isinstance(dp, ControlDatapath)
        self._last = getattr(self, "_last", {})
        self._last[role] = stats["dp"]
        merged = Counters(dp.own)
        for counters in self._last.values():
            merged.update(counters)
        dp.counters = merged
        if stats["classifier"] is not None:
            gw.classifier.counters = stats["classifier"]
        if stats["saflow"] is not None:
            gw.saflow.counters = stats["saflow"]
        sas = stats["sas"]
        for state in gw.manager.maps.values():
            for rec in state.children.values():
                for sa in (rec.inbound, rec.outbound):
                    got = sas.get(sa.spi)
                    if got is not None and (role == INBOUND) == isinstance(sa, esp.InboundSA):
                        sa.counters.packets, sa.counters.bytes, sa.counters.drops = got
