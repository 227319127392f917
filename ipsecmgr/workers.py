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

The Manager sees neither the workers nor the socketpairs:
:class:`ipsecmgr.split_worker.SplitDatapath` is the data path it was given
(ipsecmgr.sasink.SaSink, as the single mode's Datapath), and forwards each call
to the worker that owns what it changes.

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

This module holds the worker side (:class:`Worker`, run in each forked child)
and the messages both sides exchange; the control side is
:mod:`ipsecmgr.split_worker`.
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
from typing import Any

import esp
from ike.invalid_spi import SourceLimit
from ipsecmgr.datapath import Datapath
from ipsecmgr.sasink import Address

log = logging.getLogger("ipsecmgr.workers")

OUTBOUND, INBOUND = "outbound", "inbound"
MAX_MESSAGE = 1 << 18  # a packet (<= 64 KiB) plus its envelope
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
