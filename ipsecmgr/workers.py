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
          |   bind, queued packets,       and its sequence numbers    owns every InboundSA
          |   trace on/off, stats                                     and its replay window
          +--------- socketpair ---------->+
          +--------- socketpair ------------------------------------->+
          <-- PROTECT without SA (4-5), counters, trace events -+----+

The Manager sees neither the workers nor the socketpairs: :class:`SplitDatapath`
is the data path it was given (ipsecmgr.sasink.SaSink, as the single mode's
Datapath), and forwards each call to the worker that owns what it changes.

Both workers run the same :class:`ipsecmgr.datapath.Datapath` code as the
single-process mode: one copy of the per-packet logic. Each SA lives in exactly
one process, so sequence numbers (RFC 4303 §3.3.3) and the anti-replay window
(§3.4.3) have a single owner; the control process keeps its own objects only
for ``show`` and copies the workers' counters into them on request. While
someone traces, each worker's data path sends its events to the control
process, where the daemon's tracer gets them (docs/trace.md).

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
from ike.invalid_spi import SourceLimit
from ipsecmgr.counters import Counters
from ipsecmgr.datapath import Datapath, OutboundBinding
from ipsecmgr.sasink import Address, SaPair, TraceHook

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("ipsecmgr.workers")

OUTBOUND, INBOUND = "outbound", "inbound"
MAX_MESSAGE = 1 << 18  # a packet (<= 64 KiB) plus its envelope
STATS_TIMEOUT = 1.0  # s a snapshot waits for the workers' counters
STATS_PERIOD = 1.0  # s between background counter pulls (DPD's "did anything arrive")
PR_SET_PDEATHSIG = 1
HEADERS = 120  # bytes of an inner packet: IPv6 + TCP headers with options (esp_out)

Message = tuple[Any, ...]


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
    from the daemon (:meth:`Datapath.spawn`), with its own SA-flow table: the SAs
    it holds exist only here.
    """

    def __init__(self, template: Datapath, role: str, ctrl: socket.socket) -> None:
        self.role = role
        self.ctrl = ctrl
        # UDP 4500 is read here (INBOUND): IKE and NAT rebinding go to the control process.
        self.dp = template.spawn(
            self._on_no_sa,
            on_udp_other=self._ike_to_control,
            on_esp_from=self._esp_from,
            on_unknown_spi=self._unknown_spi_to_control,
            on_esp_out=self._esp_out_to_control,
        )
        # The control process rate-limits INVALID_SPI per source (RFC 7296 §2.21.4);
        # the same limit here keeps an unknown-SPI flood off the socketpair.
        self._unknown_spi_limit = SourceLimit()
        self._esp_peers: dict[str, Address] = {}
        self.out_sas: dict[int, esp.OutboundSA] = {}

    def _ike_to_control(self, data: bytes, local: Address, peer: Address) -> None:
        if not _send(self.ctrl, ("ike_in", data, local, peer), timeout=0.0):
            self.dp.counters["ike_forward_drops"] += 1

    def _esp_from(self, name: str, peer: Address) -> None:
        """An authentic ESP-in-UDP packet of ``name`` from ``peer``: the control process
        decides about NAT rebinding (RFC 7296 §2.23). Told once per peer change; the
        memory is cleared with every counter pull (1 s), so a refusal is retried."""
        if self._esp_peers.get(name) != peer:
            self._esp_peers[name] = peer
            _send(self.ctrl, ("esp_from", name, peer), timeout=0.0)

    def _unknown_spi_to_control(
        self, spi: int, src: bytes, family: int, udp: Address | None
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

    def _trace_to_control(
        self, step: str, event: str, packet: bytes | None, at: float | None = None, **fields: Any
    ) -> None:
        """The trace hook while a client traces: the event, stamped here (or at ``at``;
        CLOCK_MONOTONIC is one clock for all processes), goes to the control process's
        Tracer. Never blocks: an event that finds the socketpair full is counted as lost."""
        for key, value in fields.items():
            if isinstance(value, memoryview):  # a view of the receive buffer: a copy
                fields[key] = bytes(value)
        msg = ("trace", time.monotonic() if at is None else at, step, event,
               None if packet is None else bytes(packet), fields)  # fmt: skip
        if not _send(self.ctrl, msg, timeout=0.0):
            self.dp.counters["trace_lost"] += 1

    def handle(self, msg: Message) -> None:
        """One control message; called between packet batches."""
        kind = msg[0]
        dp = self.dp
        if kind == "bind":  # outbound: this SA now carries the crypto map's traffic
            _, name, spi, peer, nat_t = msg
            sa = self.out_sas.get(spi)
            if sa is not None:  # (an SA already forgotten: nothing to send with)
                dp.bind(name, sa, peer, nat_t)
        elif kind == "watch":  # report the next ESP of this map (ipsecmgr.invalid_spi)
            dp.watch_outbound(msg[1])
        elif kind == "in_counts":  # a map's inbound packet counts, fresh (invalid_spi)
            _, name, spis = msg
            counts = {spi: flow.sa.counters.packets  # type: ignore[attr-defined]
                      for spi in spis if (flow := dp.saflow.lookup(spi)) is not None}  # fmt: skip
            _send(self.ctrl, ("in_counts", name, counts))
        elif kind == "unbind":
            dp.unbind(msg[1])
        elif kind == "send":  # a queued first packet (step 5, first_packet = "queue")
            dp.send(msg[1], msg[2])
        elif kind == "out_add":
            _, spi, key, mode, esn = msg
            self.out_sas[spi] = esp.OutboundSA(spi, key, mode=mode, esn=esn)
        elif kind == "in_add":
            _, name, spi, key, mode, esn, src_sel, dst_sel = msg
            sa_in = esp.InboundSA(spi, key, mode=mode, esn=esn)
            dp.saflow.add(spi, sa_in, src_sel, dst_sel, name)
        elif kind == "forget":  # SAs deleted (either half may be None: it stays)
            _, in_spi, out_spi = msg
            if in_spi is not None:
                dp.saflow.remove(in_spi)
            if out_spi is not None:
                self.out_sas.pop(out_spi, None)
        elif kind == "classifier":  # SIGHUP reload
            dp.set_classifier(msg[1])
        elif kind == "trace":  # a trace client attached (True) or the last one left
            dp.set_trace(self._trace_to_control if msg[1] else None)
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
        dp = self.dp
        if self.role == OUTBOUND:
            for fd in dp.tun_fds:
                handlers[fd] = functools.partial(dp.on_tun_readable, fd)
        else:
            for fam, sock in dp.esp_sockets.items():
                handlers[sock.fileno()] = functools.partial(dp.on_esp_readable, fam)
            for local, sock in dp.natt_sockets.items():
                handlers[sock.fileno()] = functools.partial(dp.on_udp_readable, sock, local)
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
                                self.dp.counters["control_errors"] += 1
                    except EOFError:
                        return
                else:
                    handlers[fd]()


def _worker_main(template: Datapath, role: str, ctrl: socket.socket) -> None:
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
        worker = Worker(template, role, ctrl)
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


class SplitDatapath:
    """``[gateway] datapath = "split"``: the :class:`ipsecmgr.sasink.SaSink` the Manager
    gets, in the control process. It moves no packet itself: every SA pair, binding,
    queued first packet, classifier and trace switch goes to the worker that owns it,
    and what the workers report comes back through ``base``'s callbacks (the same
    ones the single data path calls), their trace events into the trace hook.

    ``base`` is the data path the daemon set up (sockets, TUNs, the callbacks); the
    workers are forked from it (:meth:`start`), and it writes ipsecmgr.reject's
    answers into the TUNs from here."""

    def __init__(self, base: Datapath, *, on_inbound_counted: Callable[[str], None]) -> None:
        self.base = base
        # refresh_inbound's answer: a crypto map's inbound counters are fresh now
        self.on_inbound_counted = on_inbound_counted
        self.started = False
        self.pids: dict[str, int] = {}
        self.socks: dict[str, socket.socket] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.trace: TraceHook | None = None
        # The control process's view, for the Manager (bindings) and ``show`` (counters
        # copied from the workers into the SA objects the Manager keeps).
        self.outbound: dict[str, OutboundBinding] = {}
        self._in_sas: dict[int, esp.InboundSA] = {}
        self._out_sas: dict[int, esp.OutboundSA] = {}
        self.own = Counters()  # counted here (forwarding failures), merged into counters
        self._counters = Counters()
        self._last: dict[str, Counters] = {}
        self._token = 0
        self._seen: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def add_tun(
        self, fd: int, crypto_maps: list[str], mss: tuple[int, int] | None, vnet: bool
    ) -> None:
        self.base.add_tun(fd, crypto_maps, mss, vnet)

    def add_natt_socket(self, local: Address, sock: socket.socket, gso: bool) -> None:
        self.base.add_natt_socket(local, sock, gso)

    def start(self) -> None:
        """Fork both workers (after setup: sockets and TUNs exist; before the event loop)."""
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
                _worker_main(self.base, role, theirs)
            theirs.close()
            self.pids[role] = pid
            self.socks[role] = mine
            self._seen[role] = 0
        self.started = True
        log.info("split data path: outbound worker %d, inbound worker %d",
                 self.pids[OUTBOUND], self.pids[INBOUND])  # fmt: skip

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The workers read the TUNs and the ESP sockets; this loop reads the workers."""
        self.loop = loop
        for role, sock in self.socks.items():
            loop.add_reader(sock, self._on_readable, role)
        self._timer = loop.call_later(STATS_PERIOD, self._periodic)

    def detach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sock in self.socks.values():
            loop.remove_reader(sock)
        self.loop = None

    def stop(self, timeout: float = 5.0) -> None:
        """EOF to both workers, then wait for them (they hold the TUN fds: the device is
        only gone, and teardown only complete, once they exited)."""
        if self.loop is not None:
            self.detach(self.loop)
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

    # -- SaSink (ipsecmgr.sasink) ------------------------------------------------------------

    @property
    def counters(self) -> Counters:
        return self._counters

    def install(self, pair: SaPair) -> None:
        """Each half to the worker that owns it: the inbound SA (and its replay window,
        RFC 4303 §3.4.3) to INBOUND, the outbound one (its sequence numbers) to OUTBOUND."""
        inb, out = pair.inbound, pair.outbound
        self._in_sas[inb.spi] = inb
        self._out_sas[out.spi] = out
        self._to(INBOUND, ("in_add", pair.crypto_map, inb.spi, pair.inbound_key, inb.mode,
                           inb.esn, pair.remote_ts, pair.local_ts))  # fmt: skip
        self._to(OUTBOUND, ("out_add", out.spi, pair.outbound_key, out.mode, out.esn))

    def remove(self, inbound_spi: int | None, outbound_spi: int | None) -> None:
        if inbound_spi is not None:
            self._in_sas.pop(inbound_spi, None)
            self._to(INBOUND, ("forget", inbound_spi, None))
        if outbound_spi is not None:
            self._out_sas.pop(outbound_spi, None)
            self._to(OUTBOUND, ("forget", None, outbound_spi))

    def bind(self, name: str, sa: esp.OutboundSA, peer: Address, nat_t: bool) -> None:
        sock, addr = self.base.esp_target(peer, nat_t)
        binding = self.outbound.get(name)
        if binding is not None and binding.sa is sa:
            binding.sock, binding.peer = sock, addr
        else:
            self.outbound[name] = OutboundBinding(sa, sock, addr, sa.mode)
        self._to(OUTBOUND, ("bind", name, sa.spi, peer, nat_t))

    def unbind(self, name: str) -> None:
        if self.outbound.pop(name, None) is not None:
            self._to(OUTBOUND, ("unbind", name))

    def watch_outbound(self, name: str) -> None:
        self._to(OUTBOUND, ("watch", name))

    def refresh_inbound(self, name: str, spis: list[int]) -> bool:
        """The INBOUND worker's counts of these SAs, now (the periodic pull's are up to
        STATS_PERIOD old): they land in our SA objects, then ``on_inbound_counted``."""
        return not self._to(INBOUND, ("in_counts", name, spis))  # failed: decide now

    def binding(self, name: str) -> OutboundBinding | None:
        return self.outbound.get(name)

    def send(self, name: str, packet: bytes) -> None:
        self._to(OUTBOUND, ("send", name, packet))

    def send_keepalive(self, peer: Address) -> None:
        self.base.send_keepalive(peer)

    def write_tun(self, name: str, packet: bytes) -> bool:
        return self.base.write_tun(name, packet)

    def set_classifier(self, classifier: npusim.Classifier) -> None:
        # The OUTBOUND worker classifies and the INBOUND worker checks decrypted
        # packets against the ACL with it: each gets a copy.
        self.base.set_classifier(classifier)
        self._to(OUTBOUND, ("classifier", classifier))
        self._to(INBOUND, ("classifier", classifier))

    def set_trace(self, hook: TraceHook | None) -> None:
        """Both workers send their packet steps here while ``hook`` is set."""
        self.trace = hook
        self._to(OUTBOUND, ("trace", hook is not None))
        self._to(INBOUND, ("trace", hook is not None))

    def refresh_counters(self) -> None:
        """Fresh counters from both workers into ours and the SAs (``show``)."""
        if not self.started:
            return
        self._token += 1
        token = self._token
        for role in self.socks:
            self._to(role, ("stats", token))
        deadline = time.monotonic() + STATS_TIMEOUT
        deferred: list[tuple[str, Message]] = []
        while any(self._seen.get(r, 0) < token for r in self.socks):
            left = deadline - time.monotonic()
            waiting = [s for r, s in self.socks.items() if self._seen.get(r, 0) < token]
            if left <= 0 or not select.select(waiting, [], [], left)[0]:
                log.warning("a worker did not answer the counter request in time")
                break
            for role, sock in self.socks.items():
                with contextlib.suppress(EOFError):
                    while (msg := _recv(sock)) is not None:
                        if msg[0] == "stats":
                            self._handle(role, msg)
                        else:
                            deferred.append((role, msg))
        # First-packet requests met while waiting run after the snapshot, from the loop.
        for role, msg in deferred:
            if self.loop is not None:
                self.loop.call_soon(self._handle, role, msg)
            else:
                self._handle(role, msg)

    # -- control -> workers ------------------------------------------------------------------

    def _to(self, role: str, msg: Message) -> bool:
        sock = self.socks.get(role)
        if sock is not None and _send(sock, msg):
            return True
        if self.started:
            self.own["forward_errors"] += 1
        return False

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
            self._handle(role, msg)

    def _handle(self, role: str, msg: Message) -> None:
        base = self.base
        kind = msg[0]
        if kind == "trace":
            tr = self.trace
            if tr is not None:
                _, at, step, event, packet, fields = msg
                tr(step, event, packet, at=at, source=role, **fields)
        elif kind == "no_sa":
            base.on_no_sa(msg[1], msg[2])
        elif kind == "ike_in":  # IKE that arrived on UDP 4500 (the INBOUND worker reads it)
            base.on_udp_other(msg[1], msg[2], msg[3])
        elif kind == "esp_from":
            base.on_esp_from(msg[1], msg[2])
        elif kind == "esp_out":  # the first ESP after a quiet spell (invalid_spi)
            base.on_esp_out(msg[1], msg[2])
        elif kind == "in_counts":
            _, name, counts = msg
            for spi, packets in counts.items():
                sa = self._in_sas.get(spi)
                if sa is not None:
                    sa.counters.packets = max(sa.counters.packets, packets)
            self.on_inbound_counted(name)
        elif kind == "unknown_spi":  # ESP for an SPI the INBOUND worker does not know
            if base.on_unknown_spi is not None:
                base.on_unknown_spi(msg[1], msg[2], msg[3], msg[4])
        elif kind == "stats":
            _, role, token, stats = msg
            self._seen[role] = max(self._seen.get(role, 0), token)
            self._apply(role, stats)

    def _periodic(self) -> None:
        self._token += 1
        for role in self.socks:
            self._to(role, ("stats", self._token))
        if self.loop is not None:
            self._timer = self.loop.call_later(STATS_PERIOD, self._periodic)

    def _apply(self, role: str, stats: dict[str, Any]) -> None:
        self._last[role] = stats["dp"]
        merged = Counters(self.own)
        for counters in self._last.values():
            merged.update(counters)
        self._counters = merged
        if stats["classifier"] is not None:
            self.base.classifier.counters = stats["classifier"]
        if stats["saflow"] is not None:
            self.base.saflow.counters = stats["saflow"]
        sas = self._in_sas if role == INBOUND else self._out_sas
        for spi, got in stats["sas"].items():
            sa = sas.get(spi)
            if sa is not None:
                sa.counters.packets, sa.counters.bytes, sa.counters.drops = got
