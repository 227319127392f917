"""``[gateway] datapath = "split"``, the control process's side: :class:`SplitDatapath`.

The Manager's data path in split mode. It forks the two workers of
:mod:`ipsecmgr.workers` (which has the picture of who owns what), forwards each
SaSink call to the worker that owns what it changes, and turns what the workers
report into the base data path's callbacks, the trace hook and ``show``'s
counters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import esp
import npusim
from ipsecmgr.counters import Counters
from ipsecmgr.datapath import Datapath
from ipsecmgr.packets import OutboundBinding
from ipsecmgr.sasink import Address, SaPair, TraceHook
from ipsecmgr.workers import INBOUND, OUTBOUND, Message, _recv, _send, _worker_main

if TYPE_CHECKING:
    import asyncio

# One logger for both sides of the split data path (its name predates split_worker.py)
log = logging.getLogger("ipsecmgr.workers")

STATS_TIMEOUT = 1.0  # s a snapshot waits for the workers' counters
STATS_PERIOD = 1.0  # s between background counter pulls (DPD's "did anything arrive")


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
