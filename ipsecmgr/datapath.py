"""The per-packet loop: TUN → NPUSIM → ESP → raw socket, and back.

The reference's 13 steps, and who does each here::

    outbound (TUN readable → Datapath.on_tun_readable)
      1  the TACACS+ client sends (the kernel routes it into the TUN)
      2  os.read(tun)                                  Datapath.on_tun_readable
      3  npusim.Classifier.classify(packet)
      3a PROTECT(map)  → continue below
      3b BYPASS        → bypass socket (clear text, management interface)
      4  no Child SA for the map → Manager.on_no_sa (IKE initiation)
      5  first packet dropped (or queued: first_packet = "queue")
      6  the client retransmits → 2, 3 again
      7  OutboundSA.encapsulate + ESP socket send     Datapath._send_protected
    inbound (ESP socket readable → Datapath.on_esp_readable)
      8  recv on the raw protocol-50 socket (or UDP 4500, later)
      9  SA-flow lookup by SPI                         npusim.SaFlowTable.lookup
      10 InboundSA.decapsulate + inbound policy check
      11 (the packet is e.g. the SYN-ACK)
      12 os.write(tun)
      13 the client answers; every later packet repeats the steps

Batches and kernel offloads (``[gateway] offload``, docs/performance.md)::

    TUN read ─ split_tun_read ─┬─ per packet: trace 2, MSS clamp, classify (3), 4-5,
    (one 64 KiB TSO super-     │  encapsulate (7) ─┬─ raw ESP: sendto now
     packet, vnet header)      │                   └─ UDP 4500: collected per binding
                               └─ end of the batch: _flush_out, one sendmsg + UDP_SEGMENT
                                  per run of equal-size ESP packets (UDP GSO)
    UDP 4500 recvmsg (GRO: many datagrams, one cmsg with their size) or raw ESP recv
      ─ per datagram: keepalive / IKE (on_udp_other) / ESP: steps 8-10 (handle_inbound),
        the decrypted packet collected per TUN
      ─ end of the batch: _flush_tun, coalesce_for_tun: one TUN write per TCP run (GSO)

Counters count packets (segments), never super-packets; tracing sees every
packet at every step (with a trace client attached, TUN writes are not coalesced).

Hot-path rules: no logging, no per-packet allocation beyond the packet
itself, tracing costs one ``is not None`` branch per stage, every error from
the network is caught, counted and dropped.
"""

from __future__ import annotations

import os
import select
import socket
import sys
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Any

import esp
import npusim
from esp.udp_encap import NAT_KEEPALIVE, classify_udp4500
from ipsecmgr.counters import Counters
from ipsecmgr.mss import clamp_mss
from ipsecmgr.offload import VNET_HDR_LEN, coalesce_for_tun, split_tun_read
from ipsecmgr.packets import OutboundBinding, build_ip_header, ip_header_length, tun_write_segments
from ipsecmgr.sasink import Address, SaPair, TraceHook, esp_peer
from ipsecmgr.sockets import SOL_UDP, UDP_GRO, UDP_SEGMENT

if TYPE_CHECKING:
    import asyncio

BATCH = 64  # packets (segments, datagrams) drained per wake-up before yielding to the loop
TUN_READ_SIZE = 65535 + VNET_HDR_LEN  # a TSO super-packet (IP total length <= 65535)
# UDP GSO limits (net/ipv4/udp.c udp_send_skb): at most UDP_MAX_SEGMENTS = 64 segments,
# and the whole datagram must fit one IP packet (65535 - IPv6 + UDP headers, rounded down).
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
UDP_RECV_SIZE = 65535
# ESP shorter than this gets no INVALID_SPI: IP + UDP + the 40-byte message (68 bytes)
# is then never more than the IP + ESP that triggered it (real ESP is >= 76 bytes).
UNKNOWN_SPI_MIN_ESP = 48
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_VNET_NONE = bytes(VNET_HDR_LEN)  # no checksum to finish, no segmentation
_NATIVE = sys.byteorder

# _TRACE_BEFORE: a packet that leaves is traced with the time before it left: the
# answer it causes may be traced by the split data path's other worker (another
# process, on another core) before this one's send returns, and must not look
# earlier than its cause. Step 7 alone is traced before the send (a failed send then
# adds "esp_send_failed"); step 7 in a UDP GSO batch and step 12 in a TUN batch (the
# only way the workers write the TUN) are traced after it, with ``at``.


def _bump(counters: Counters, name: str, n: int = 1) -> None:
    counters[name] += n


class Datapath:
    """Moves packets between one TUN and the ESP sockets."""

    def __init__(
        self,
        classifier: npusim.Classifier,
        saflow: npusim.SaFlowTable,
        esp_sockets: dict[int, socket.socket],
        bypass_sockets: dict[int, socket.socket],
        on_no_sa: Callable[[str, bytes], None],
        *,
        on_udp_other: Callable[[bytes, Address, Address], None] = lambda d, lo, pe: None,
        on_esp_from: Callable[[str, Address], None] = lambda name, peer: None,
        on_unknown_spi: Callable[[int, bytes, int, Address | None], None] | None = None,
        on_esp_out: Callable[[str, bytes], None] = lambda name, packet: None,
    ) -> None:
        self.classifier = classifier
        self.saflow = saflow
        # Inbound: which TUN a crypto map's decrypted packets go to (step 12).
        self.tun_for_map: dict[str, int] = {}
        self.tun_fds: list[int] = []  # add_tun: the TUNs read at step 2
        self.esp_sockets = esp_sockets
        self.bypass_sockets = bypass_sockets
        # UDP 4500 (ESP-in-UDP and IKE, RFC 3948) by local address: add_natt_socket
        self.natt_sockets: dict[Address, socket.socket] = {}
        # Steps 4-5 belong to the control plane (IKE, the first-packet policy).
        self.on_no_sa = on_no_sa
        self.outbound: dict[str, OutboundBinding] = {}
        self.transport_local: dict[bytes, bytes] = {}
        self.counters = Counters()
        # TUN fd -> (IPv4, IPv6) MSS limits for SYNs read from it, None: no clamping.
        self.mss_limits: dict[int, tuple[int, int] | None] = {}
        # Tracing (issue: ipsecmgr trace): None = off, the only cost is the branch.
        self.trace: TraceHook | None = None
        # Offloads (ipsecmgr.tun, ipsecmgr.sockets): TUN fds whose reads and writes carry
        # a virtio_net_hdr, and the UDP sockets that take UDP_SEGMENT (GSO) sends.
        self.vnet_fds: set[int] = set()
        self.gso_socks: set[socket.socket] = set()
        # UDP 4500: what is not ESP (IKE) and "this map's ESP came from this peer" (NAT
        # rebinding, RFC 7296 §2.23): the daemon's (or the split worker's) business.
        self.on_udp_other = on_udp_other
        self.on_esp_from = on_esp_from
        # ESP with an SPI not in the SA-flow table: (SPI, source address packed, family,
        # UDP source or None for raw ESP), for INVALID_SPI (RFC 7296 §1.5); rate-limited
        # by the receiver. None: only counted.
        self.on_unknown_spi = on_unknown_spi
        self._udp_src: Address | None = None  # the sender of the ESP-in-UDP being handled
        # The first ESP sent on a watched binding: its crypto map and the inner packet
        # (ipsecmgr.invalid_spi)
        self.on_esp_out = on_esp_out
        # Collected during a batch (None: outside one, send / write at once).
        # id(binding) -> (binding, ESP packets, trace records (index, inner packet, seq)).
        self._out: dict[int, tuple[OutboundBinding, list[bytes], list[Any]]] | None = None
        self._tun_out: dict[int, list[bytes]] | None = None  # TUN fd -> decrypted packets
        self._rbuf = bytearray(UDP_RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self._pollers: dict[int, Callable[[int], list[tuple[int, int]]]] = {}

    # -- set-up (the daemon, before any packet) --------------------------------------

    def add_tun(
        self, fd: int, crypto_maps: list[str], mss: tuple[int, int] | None, vnet: bool
    ) -> None:
        """A TUN: read at step 2 (SYNs clamped to ``mss``), written at step 12 for its
        crypto maps; ``vnet``: reads and writes carry a virtio_net_hdr (offload)."""
        self.tun_fds.append(fd)
        self.mss_limits[fd] = mss
        for name in crypto_maps:
            self.tun_for_map[name] = fd
        if vnet:
            self.vnet_fds.add(fd)

    def add_natt_socket(self, local: Address, sock: socket.socket, gso: bool) -> None:
        """A UDP 4500 socket (ESP-in-UDP, IKE); ``gso``: it takes UDP_SEGMENT sends."""
        self.natt_sockets[local] = sock
        if gso:
            self.gso_socks.add(sock)

    def spawn(self, on_no_sa: Callable[[str, bytes], None], **callbacks: Any) -> Datapath:
        """A fresh data path over the same sockets and TUNs, with an empty SA-flow table
        of its own (a split worker's: the SAs it holds exist only there)."""
        dp = Datapath(self.classifier, npusim.SaFlowTable(), self.esp_sockets,
                      self.bypass_sockets, on_no_sa, **callbacks)  # fmt: skip
        dp.tun_fds = list(self.tun_fds)
        dp.tun_for_map = dict(self.tun_for_map)
        dp.mss_limits = dict(self.mss_limits)
        dp.natt_sockets = dict(self.natt_sockets)
        dp.vnet_fds = set(self.vnet_fds)
        dp.gso_socks = set(self.gso_socks)
        return dp

    def esp_target(self, peer: Address, nat_t: bool) -> tuple[socket.socket, Address]:
        """The socket and address ESP to ``peer`` goes to: raw protocol 50, or with NAT
        traversal our UDP 4500 socket of the peer's family (RFC 3948)."""
        fam = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET
        if nat_t:
            sock = next(s for s in self.natt_sockets.values() if s.family == fam)
            return sock, esp_peer(peer, True)
        return self.esp_sockets[fam], esp_peer(peer, False)

    # -- the event loop (single: the daemon's; split: ipsecmgr.workers) -------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the TUNs, the raw ESP sockets and UDP 4500 from ``loop``."""
        for fam, sock in self.esp_sockets.items():
            loop.add_reader(sock, self.on_esp_readable, fam)
        for local, sock in self.natt_sockets.items():
            loop.add_reader(sock, self.on_udp_readable, sock, local)
        for fd in self.tun_fds:
            loop.add_reader(fd, self.on_tun_readable, fd)

    def detach(self, loop: asyncio.AbstractEventLoop) -> None:
        for sock in (*self.esp_sockets.values(), *self.natt_sockets.values()):
            loop.remove_reader(sock)
        for fd in self.tun_fds:
            loop.remove_reader(fd)

    def start(self) -> None:
        """Nothing to start: the daemon's loop moves the packets (see attach)."""

    def stop(self) -> None:
        """Nothing to stop (the daemon closes the sockets and TUNs)."""

    # -- SaSink (ipsecmgr.sasink): what the Manager asks -------------------------------

    def install(self, pair: SaPair) -> None:
        self.saflow.add(pair.inbound.spi, pair.inbound, pair.remote_ts, pair.local_ts,
                        pair.crypto_map)  # fmt: skip

    def remove(self, inbound_spi: int | None, outbound_spi: int | None) -> None:
        # The outbound SA lives in its binding only (unbind / bind drop it).
        if inbound_spi is not None:
            self.saflow.remove(inbound_spi)

    def bind(self, name: str, sa: esp.OutboundSA, peer: Address, nat_t: bool) -> None:
        sock, addr = self.esp_target(peer, nat_t)
        binding = self.outbound.get(name)
        if binding is not None and binding.sa is sa:  # the peer moved: same SA, in place
            binding.sock, binding.peer = sock, addr
        else:
            self.outbound[name] = OutboundBinding(sa, sock, addr, sa.mode, name)

    def unbind(self, name: str) -> None:
        self.outbound.pop(name, None)

    def binding(self, name: str) -> OutboundBinding | None:
        return self.outbound.get(name)

    def refresh_inbound(self, name: str, spis: list[int]) -> bool:
        return True  # counted in this process: always up to date

    def send(self, name: str, packet: bytes) -> None:
        binding = self.outbound.get(name)
        if binding is None:
            _bump(self.counters, "send_unbound_drops")
            return
        self.send_protected(binding, packet)

    def send_keepalive(self, peer: Address) -> None:
        sock, addr = self.esp_target(peer, True)
        sock.sendto(NAT_KEEPALIVE, addr)

    def set_classifier(self, classifier: npusim.Classifier) -> None:
        self.classifier = classifier

    def set_trace(self, hook: TraceHook | None) -> None:
        self.trace = hook

    def refresh_counters(self) -> None:
        """Nothing to pull: this process counts every packet itself."""

    def _queued(self, fd: int) -> Callable[[int], list[tuple[int, int]]]:
        """``poll(0)`` on ``fd`` alone: whether more is queued, asked after the first
        read of a wake-up. A packet that arrives after idle time is alone in its queue
        (docs/performance.md "latency"): this ends its batch without the read that
        fails with EAGAIN, whose exception object costs twice the poll (and the
        batch's flush waits for it). TUNs have no FIONREAD, so poll for all."""
        poll = self._pollers.get(fd)
        if poll is None:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poll = self._pollers[fd] = poller.poll
        return poll

    # -- outbound: steps 2–7 -------------------------------------------------

    def _drain(self, fd: int, read_one: Callable[[], int], error_counter: str) -> None:
        """The one batch-read loop of all three readers (TUN, raw ESP, UDP 4500).

        ``read_one`` reads ``fd`` once and handles what it read, returning how many
        packets that was (a TUN super-packet or a GRO batch carries many): at most
        BATCH packets per wake-up, so control messages (split) and the other fds wait
        less. After the first read, ``poll(0)`` asks whether more is queued
        (:meth:`_queued`). A read error is counted once and ends the batch."""
        queued = self._queued(fd)
        budget, reads = BATCH, 0
        while budget > 0:
            if reads == 1 and not queued(0):
                return  # the one packet of this wake-up: no read that fails with EAGAIN
            reads += 1
            try:
                budget -= read_one()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.counters[error_counter] += 1
                return

    def on_tun_readable(self, fd: int) -> None:
        read = os.read
        classify = self.classifier.classify
        handle = self.handle_outbound
        limits = self.mss_limits.get(fd)
        vnet = fd in self.vnet_fds
        c = self.counters

        def read_one() -> int:
            buf = read(fd, TUN_READ_SIZE)
            if vnet:
                if buf[1]:  # gso_type: a TSO super-packet
                    c["tun_gso_reads"] = c.get("tun_gso_reads", 0) + 1
                try:
                    packets = split_tun_read(buf)
                except ValueError:
                    c["tun_malformed"] = c.get("tun_malformed", 0) + 1
                    return 1
            else:
                packets = [buf]
            for packet in packets:
                tr = self.trace
                if tr is not None:
                    tr("2", "tun_read", packet)
                # MSS clamping (ipsecmgr.mss), on every segment. Fast path: a plain IPv4
                # header whose TCP flags byte (33) has no SYN is never touched.
                if limits is not None and (
                    len(packet) < 34 or packet[0] != 0x45 or packet[33] & 0x02
                ):
                    clamped = clamp_mss(packet, *limits)
                    if clamped is not packet:
                        c["tun_mss_clamped"] = c.get("tun_mss_clamped", 0) + 1
                        packet = clamped
                handle(packet, classify(packet))
            return len(packets)

        pending: dict[int, tuple[OutboundBinding, list[bytes], list[Any]]] = {}
        self._out = pending
        try:
            self._drain(fd, read_one, "tun_read_errors")
        finally:
            self._out = None
            if pending:
                self._flush_out(pending)

    def handle_outbound(self, packet: bytes, verdict: Any) -> None:
        tr = self.trace
        if isinstance(verdict, npusim.Protect):
            name = verdict.crypto_map.name
            if tr is not None:
                tr("3a", "acl_match", packet, crypto_map=name, rule=verdict.rule.where)
            binding = self.outbound.get(name)
            if binding is None:
                self.on_no_sa(name, packet)  # steps 4–5
                return
            self.send_protected(binding, packet)
        elif verdict is npusim.BYPASS:
            if tr is not None:
                tr("3b", "bypass", packet)
            self.send_bypass(packet)
        else:
            if tr is not None:
                tr("3", "classify_drop", packet, reason=verdict.reason)
            _bump(self.counters, "classify_drops")

    def send_protected(self, binding: OutboundBinding, packet: bytes) -> None:
        """Step 7: encrypt and send (inside a TUN batch, a UDP GSO socket's packets are
        collected and sent by :meth:`_flush_out`)."""
        sa = binding.sa
        try:
            if binding.mode == "tunnel":
                data = sa.encapsulate(packet, 4 if packet[0] >> 4 == 4 else 41)
            else:
                hlen, proto = ip_header_length(packet)
                data = sa.encapsulate(packet[hlen:], proto)
        except esp.EspError as exc:
            _bump(self.counters, "out_" + exc.counter)
            return
        if binding.watch is not None:  # the first ESP after a quiet spell: answered?
            name, binding.watch = binding.watch, None
            self.on_esp_out(name, packet)
        pending = self._out
        if pending is not None and binding.sock in self.gso_socks:
            entry = pending.get(id(binding))
            if entry is None:
                entry = pending[id(binding)] = (binding, [], [])
            entry[1].append(data)
            if self.trace is not None:
                entry[2].append((len(entry[1]) - 1, packet, sa.next_seq - 1))
            return
        tr = self.trace
        if tr is not None:  # before the send (see _TRACE_BEFORE)
            tr("7", "esp_sent", packet, spi=sa.spi, seq=sa.next_seq - 1, wire=data,
               peer=binding.peer)  # fmt: skip
        try:
            binding.sock.sendto(data, binding.peer)
        except OSError:
            _bump(self.counters, "esp_send_errors")
            if tr is not None:
                tr("7", "esp_send_failed", packet, spi=sa.spi, seq=sa.next_seq - 1)
            return
        _bump(self.counters, "esp_out_packets")

    def watch_outbound(self, name: str) -> None:
        """Report the next ESP sent for crypto map ``name`` (:attr:`on_esp_out`)."""
        binding = self.outbound.get(name)
        if binding is not None:
            binding.watch = name

    def _flush_out(
        self, pending: dict[int, tuple[OutboundBinding, list[bytes], list[Any]]]
    ) -> None:
        """The collected ESP packets, per binding, in order: each run of equal-size packets
        (a shorter last one allowed) is one ``sendmsg`` with a UDP_SEGMENT cmsg; the kernel
        cuts it into datagrams of that size (UDP GSO, Linux 4.18). A failed send counts
        every packet in it; a refused GSO send is retried one datagram at a time."""
        c = self.counters
        for binding, datas, traces in pending.values():
            sock, peer = binding.sock, binding.peer
            at = monotonic() if traces else 0.0  # traced: the time before the sends
            n, i = len(datas), 0
            if n == 1 and not traces:  # one packet (a round trip after idle time): no runs
                try:
                    sock.sendto(datas[0], peer)
                except OSError:
                    c["esp_send_errors"] = c.get("esp_send_errors", 0) + 1
                    continue
                c["esp_out_packets"] = c.get("esp_out_packets", 0) + 1
                continue
            sendto, sendmsg = sock.sendto, sock.sendmsg
            while i < n:
                size = len(datas[i])
                j, total = i + 1, size
                limit = min(n, i + GSO_MAX_SEGMENTS)
                while j < limit and len(datas[j]) == size and total + size <= GSO_MAX_BYTES:
                    total += size
                    j += 1
                if j < limit and len(datas[j]) < size and total + len(datas[j]) <= GSO_MAX_BYTES:
                    j += 1  # the shorter last segment
                count = j - i
                try:
                    if count == 1:
                        sendto(datas[i], peer)
                    else:
                        sendmsg(datas[i:j], [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, _NATIVE))],
                                0, peer)  # fmt: skip
                        c["esp_udp_gso_sends"] = c.get("esp_udp_gso_sends", 0) + 1
                    sent = count
                except OSError:
                    sent = 0
                    if count > 1:
                        for k in range(i, j):
                            try:
                                sendto(datas[k], peer)
                                sent += 1
                            except OSError:
                                pass
                if sent:
                    c["esp_out_packets"] = c.get("esp_out_packets", 0) + sent
                if sent != count:
                    c["esp_send_errors"] = c.get("esp_send_errors", 0) + count - sent
                i = j
            tr = self.trace
            if tr is not None and traces:
                sa = binding.sa
                for k, packet, seq in traces:
                    tr("7", "esp_sent", packet, spi=sa.spi, seq=seq, wire=datas[k], peer=peer,
                       at=at)  # fmt: skip

    def send_bypass(self, packet: bytes) -> None:
        """Step 3b: clear text out of the management interface."""
        version = packet[0] >> 4
        # IPv4 multicast is the host's own chatter, not ours to forward (NPUSIM
        # already drops IPv6 link-scoped packets: router solicitations, MLD).
        if version == 4 and packet[16] >= 224:
            _bump(self.counters, "tun_local_ignored")
            return
        try:
            if version == 4:
                self.bypass_sockets[socket.AF_INET].sendto(
                    packet, (socket.inet_ntoa(packet[16:20]), 0)
                )
            else:
                self.bypass_sockets[socket.AF_INET6].sendto(
                    packet, (socket.inet_ntop(socket.AF_INET6, packet[24:40]), 0)
                )
        except (OSError, KeyError, IndexError, ValueError):
            _bump(self.counters, "bypass_send_errors")
            return
        _bump(self.counters, "bypass_packets")

    # -- inbound: steps 8–12 -------------------------------------------------

    def on_esp_readable(self, family: int) -> None:
        """Raw ESP. IPv4 is read with ``recv_into`` one preallocated buffer (no 64 KiB
        allocation per packet) and handed on as a view past the outer header, which raw
        IPv4 sockets include; IPv6 raw sockets never do, and do not tell the destination."""
        sock = self.esp_sockets[family]
        handle = self.handle_inbound
        buf, view = self._rbuf, self._rview
        recv_into = sock.recv_into

        def read_one() -> int:
            if family == socket.AF_INET:
                n = recv_into(buf)
                hlen = (buf[0] & 0x0F) * 4
                # handle_inbound keeps no reference to the view (what it queues for
                # the TUN is the decrypted copy); a trace client may keep it: a copy.
                esp_data = view[hlen:n] if self.trace is None else bytes(view[hlen:n])
                handle(esp_data, bytes(view[12:16]), bytes(view[16:20]), family)  # type: ignore[arg-type]
            else:
                data, addr = sock.recvfrom(65535)
                src = socket.inet_pton(socket.AF_INET6, addr[0])
                handle(data, src, b"", family)
            return 1

        pending: dict[int, list[bytes]] = {}
        self._tun_out = pending
        try:
            self._drain(sock.fileno(), read_one, "esp_recv_errors")
        finally:
            self._tun_out = None
            if pending:
                self._flush_tun(pending)

    def on_udp_readable(self, sock: socket.socket, local: Address) -> None:
        """ESP-in-UDP (RFC 3948) and IKE on the NAT-T port. With UDP_GRO on the socket one
        ``recvmsg`` may return several datagrams of one sender back to back, the cmsg
        giving their size (all equal but the last). Each one is a NAT keepalive
        (counted), IKE (:attr:`on_udp_other`) or ESP (steps 8-12)."""
        recv = sock.recvmsg_into
        buf, view = self._rbuf, self._rview
        handle = self.handle_inbound
        c = self.counters
        fam = sock.family

        def read_one() -> int:
            n, anc, _flags, addr = recv([buf], _GRO_CMSG_SPACE)
            peer = (addr[0], addr[1])
            src = socket.inet_pton(fam, peer[0])
            seg = n
            if anc:
                for level, ctype, value in anc:
                    if level == SOL_UDP and ctype == UDP_GRO:
                        seg = int.from_bytes(value[:4], _NATIVE) or n
            if seg < n:
                c["esp_udp_gro_batches"] = c.get("esp_udp_gro_batches", 0) + 1
            reported = None  # the map whose ESP from this sender was reported (once)
            self._udp_src = peer
            for start in range(0, n, seg) if seg else (0,):
                data = view[start : min(start + seg, n)]
                if self.trace is not None:  # a trace client may keep it: a copy
                    data = bytes(data)  # type: ignore[assignment]
                kind = classify_udp4500(data)  # type: ignore[arg-type]
                if kind == "esp":
                    # handle_inbound keeps no reference to the view: what it queues
                    # for the TUN is the decrypted copy.
                    name = handle(data, src, b"", fam)  # type: ignore[arg-type]
                    if name is not None and name != reported:
                        self.on_esp_from(name, peer)
                        reported = name
                elif kind == "keepalive":
                    c["natt_keepalives_received"] = c.get("natt_keepalives_received", 0) + 1
                else:
                    self.on_udp_other(bytes(data), local, peer)
            return -(-n // seg) if 0 < seg < n else 1

        pending: dict[int, list[bytes]] = {}
        self._tun_out = pending
        try:
            self._drain(sock.fileno(), read_one, "udp_recv_errors")
        finally:
            self._udp_src = None
            self._tun_out = None
            if pending:
                self._flush_tun(pending)

    def handle_inbound(self, data: bytes, src: bytes, dst: bytes, family: int) -> str | None:
        """Steps 8–12 for one ESP packet (raw, or the payload of ESP-in-UDP). Returns the
        crypto map of an authentic packet (it decrypted and passed the policy check)."""
        tr = self.trace
        if tr is not None:
            tr("8", "esp_received", None, wire=data, src=src)
        if len(data) < 8:
            _bump(self.counters, "esp_truncated")
            if tr is not None:
                tr("9", "esp_drop", None, reason="truncated")
            return None
        flow = self.saflow.lookup(int.from_bytes(data[:4], "big"))  # step 9
        if flow is None:
            _bump(self.counters, "esp_unknown_spi")
            if tr is not None:
                tr("9", "esp_drop", None, reason="unknown SPI", spi=int.from_bytes(data[:4], "big"))
            # Tell the sender (RFC 7296 §1.5), never with more bytes than it sent (a
            # reflector): the answer is 40 bytes of UDP, ESP here has a 16-byte ICV too.
            if self.on_unknown_spi is not None and len(data) >= UNKNOWN_SPI_MIN_ESP:
                self.on_unknown_spi(int.from_bytes(data[:4], "big"), src, family, self._udp_src)
            return None
        sa: esp.InboundSA = flow.sa  # type: ignore[assignment]
        if tr is not None:
            tr("9", "saflow_match", None, spi=sa.spi, crypto_map=flow.crypto_map)
        try:
            payload, nh = sa.decapsulate(data)  # step 10
        except esp.EspError as exc:
            _bump(self.counters, "in_" + exc.counter)
            if tr is not None:
                tr(
                    "10",
                    "esp_drop",
                    None,
                    reason=exc.counter,
                    spi=sa.spi,
                    crypto_map=flow.crypto_map,
                )
            return None
        # RFC 4301 §5.2: every decrypted packet, in both modes, must lie inside the
        # SA's selectors and be permitted by the map's ACL (read for the reply).
        if sa.mode == "tunnel":
            if nh not in (4, 41):
                drop: str | None = "protocol"
            else:
                drop = self.saflow.inbound_drop(flow, payload, self.classifier)
            packet = payload
        else:
            if not dst:
                dst = self.transport_local.get(src) or self._learn_local(family, src)
            packet = build_ip_header(family, src, dst, nh, len(payload)) + payload
            drop = self.saflow.inbound_drop_transport(
                flow, src, dst, nh, payload[:4], self.classifier
            )
        if drop is not None:
            _bump(self.counters, "policy_drops")
            _bump(self.counters, "policy_drop_" + drop)
            if tr is not None:
                tr("10", "policy_drop", packet, spi=sa.spi, crypto_map=flow.crypto_map,
                   reason=drop)  # fmt: skip
            return None
        name: str = flow.crypto_map
        if tr is not None:
            tr("10", "decrypted", packet, spi=sa.spi, crypto_map=name)
        fd = self.tun_for_map.get(name)
        if fd is None:
            _bump(self.counters, "tun_write_errors")
            return name
        pending = self._tun_out
        if pending is not None:  # written (coalesced) at the end of the batch
            queued = pending.get(fd)
            if queued is None:
                pending[fd] = [packet]
            else:
                queued.append(packet)
            return name
        try:
            os.write(fd, _VNET_NONE + packet if fd in self.vnet_fds else packet)  # step 12
        except OSError:
            _bump(self.counters, "tun_write_errors")
            return name
        if tr is not None:
            tr("12", "tun_write", packet)
        _bump(self.counters, "esp_in_packets")
        return name

    def _flush_tun(self, pending: dict[int, list[bytes]]) -> None:
        """Step 12 for a batch: per TUN, the decrypted packets in order. On a TUN with
        offload, TCP runs go as one GSO super-packet each (:func:`coalesce_for_tun`;
        the kernel segments it only if it must). With a trace client attached every
        packet is written on its own, so each one is traced."""
        write = os.write
        c = self.counters
        tr = self.trace
        for fd, packets in pending.items():
            written = failed = 0
            if len(packets) == 1 and tr is None:
                # One packet (a round trip after idle time): coalesce_for_tun would
                # return it behind an all-zero virtio_net_hdr, as this does.
                packet = packets[0]
                try:
                    write(fd, _VNET_NONE + packet if fd in self.vnet_fds else packet)
                except OSError:
                    c["tun_write_errors"] = c.get("tun_write_errors", 0) + 1
                    continue
                c["esp_in_packets"] = c.get("esp_in_packets", 0) + 1
                continue
            if fd in self.vnet_fds and tr is None:
                for buf in coalesce_for_tun(packets):
                    k = tun_write_segments(buf)
                    try:
                        write(fd, buf)
                    except OSError:
                        failed += k
                        continue
                    written += k
                    if buf[1]:
                        c["tun_gso_writes"] = c.get("tun_gso_writes", 0) + 1
            else:
                hdr = _VNET_NONE if fd in self.vnet_fds else b""
                for packet in packets:
                    if tr is not None:
                        at = monotonic()  # (see _TRACE_BEFORE)
                    try:
                        write(fd, hdr + packet if hdr else packet)
                    except OSError:
                        failed += 1
                        continue
                    written += 1
                    if tr is not None:
                        tr("12", "tun_write", packet, at=at)
            if written:
                c["esp_in_packets"] = c.get("esp_in_packets", 0) + written
            if failed:
                c["tun_write_errors"] = c.get("tun_write_errors", 0) + failed

    def write_tun(self, name: str, packet: bytes) -> bool:
        """Write a packet we made (ipsecmgr.reject's answer) into crypto map ``name``'s
        TUN: it goes to the local stack, never onto the network."""
        fd = self.tun_for_map.get(name)
        if fd is None:
            return False
        try:
            os.write(fd, _VNET_NONE + packet if fd in self.vnet_fds else packet)
        except OSError:
            _bump(self.counters, "tun_write_errors")
            return False
        return True

    def _learn_local(self, family: int, peer: bytes) -> bytes:
        """Our address towards a transport-mode peer (IPv6 raw sockets do not
        tell the destination); asked of the kernel once per peer."""
        probe = socket.socket(family, socket.SOCK_DGRAM)
        try:
            probe.connect((socket.inet_ntop(family, peer), 9))
            local = socket.inet_pton(family, probe.getsockname()[0])
        finally:
            probe.close()
        self.transport_local[peer] = local
        return local
