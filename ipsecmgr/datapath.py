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

Hot-path rules: no logging, no per-packet allocation beyond the packet
itself, tracing costs one ``is not None`` branch per stage, every error from
the network is caught, counted and dropped.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import esp
import npusim
from ipsecmgr.mss import clamp_mss

BATCH = 64  # packets drained per wake-up before yielding to the loop

_IPV4_HDR = struct.Struct("!BBHHHBBH4s4s")


@dataclass
class OutboundBinding:
    """What step 7 needs for one crypto map: the SA, the socket and the peer.

    ``sock`` is the raw protocol-50 socket (``peer`` port 0) or, with NAT
    traversal, the UDP 4500 socket (``peer`` port 4500; RFC 3948 framing is
    just the ESP packet as the UDP payload)."""

    sa: esp.OutboundSA
    sock: socket.socket
    peer: tuple[str, int]
    mode: str  # "tunnel" | "transport"


Counters = dict[str, int]


def _bump(counters: Counters, name: str, n: int = 1) -> None:
    counters[name] = counters.get(name, 0) + n


def ipv4_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def build_ip_header(family: int, src: bytes, dst: bytes, proto: int, payload_len: int) -> bytes:
    """The IP header put back in front of a transport-mode payload (RFC 4303 §3.1.1)."""
    if family == socket.AF_INET:
        hdr = _IPV4_HDR.pack(0x45, 0, 20 + payload_len, 0, 0x4000, 64, proto, 0, src, dst)
        return hdr[:10] + ipv4_checksum(hdr).to_bytes(2, "big") + hdr[12:]
    return struct.pack("!IHBB16s16s", 6 << 28, payload_len, proto, 64, src, dst)


def ip_header_length(packet: bytes) -> tuple[int, int]:
    """(header length, protocol) of an IPv4/IPv6 packet (no extension headers walked)."""
    if packet[0] >> 4 == 4:
        return (packet[0] & 0x0F) * 4, packet[9]
    return 40, packet[6]


class Datapath:
    """Moves packets between one TUN and the ESP sockets."""

    def __init__(
        self,
        classifier: npusim.Classifier,
        saflow: npusim.SaFlowTable,
        esp_sockets: dict[int, socket.socket],
        bypass_sockets: dict[int, socket.socket],
        on_no_sa: Callable[[str, bytes], None],
    ) -> None:
        self.classifier = classifier
        self.saflow = saflow
        # Inbound: which TUN a crypto map's decrypted packets go to (step 12).
        self.tun_for_map: dict[str, int] = {}
        self.esp_sockets = esp_sockets
        self.bypass_sockets = bypass_sockets
        self.on_no_sa = on_no_sa
        self.outbound: dict[str, OutboundBinding] = {}
        self.transport_local: dict[bytes, bytes] = {}
        self.counters: Counters = {}
        # TUN fd -> (IPv4, IPv6) MSS limits for SYNs read from it, None: no clamping.
        self.mss_limits: dict[int, tuple[int, int] | None] = {}
        # Tracing (issue: ipsecmgr trace): None = off, the only cost is the branch.
        self.trace: Callable[..., None] | None = None

    # -- outbound: steps 2–7 -------------------------------------------------

    def on_tun_readable(self, fd: int) -> None:
        read = os.read
        classify = self.classifier.classify
        limits = self.mss_limits.get(fd)
        for _ in range(BATCH):
            try:
                packet = read(fd, 65535)
            except BlockingIOError:
                return
            except OSError:
                _bump(self.counters, "tun_read_errors")
                return
            tr = self.trace
            if tr is not None:
                tr("2", "tun_read", packet)
            # MSS clamping (ipsecmgr.mss). Fast path: a plain IPv4 header whose TCP
            # flags byte (33) has no SYN is never touched; anything else is parsed.
            if limits is not None and (len(packet) < 34 or packet[0] != 0x45 or packet[33] & 0x02):
                clamped = clamp_mss(packet, *limits)
                if clamped is not packet:
                    _bump(self.counters, "tun_mss_clamped")
                    packet = clamped
            self.handle_outbound(packet, classify(packet))

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
        """Step 7: encrypt and send."""
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
        try:
            binding.sock.sendto(data, binding.peer)
        except OSError:
            _bump(self.counters, "esp_send_errors")
            return
        tr = self.trace
        if tr is not None:
            tr("7", "esp_sent", packet, spi=sa.spi, seq=sa.next_seq - 1, wire=data,
               peer=binding.peer)  # fmt: skip
        _bump(self.counters, "esp_out_packets")

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
        sock = self.esp_sockets[family]
        for _ in range(BATCH):
            try:
                data, addr = sock.recvfrom(65535)
            except BlockingIOError:
                return
            except OSError:
                _bump(self.counters, "esp_recv_errors")
                return
            if family == socket.AF_INET:
                # Raw IPv4 sockets hand us the outer header; IPv6 ones do not.
                hlen = (data[0] & 0x0F) * 4
                self.handle_inbound(data[hlen:], data[12:16], data[16:20], family)
            else:
                src = socket.inet_pton(socket.AF_INET6, addr[0])
                self.handle_inbound(data, src, b"", family)

    def handle_inbound(self, data: bytes, src: bytes, dst: bytes, family: int) -> None:
        """Steps 8–12 for one ESP packet (raw, or the payload of ESP-in-UDP)."""
        tr = self.trace
        if tr is not None:
            tr("8", "esp_received", None, wire=data, src=src)
        if len(data) < 8:
            _bump(self.counters, "esp_truncated")
            if tr is not None:
                tr("9", "esp_drop", None, reason="truncated")
            return
        flow = self.saflow.lookup(int.from_bytes(data[:4], "big"))  # step 9
        if flow is None:
            _bump(self.counters, "esp_unknown_spi")
            if tr is not None:
                tr("9", "esp_drop", None, reason="unknown SPI", spi=int.from_bytes(data[:4], "big"))
            return
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
            return
        if sa.mode == "tunnel":
            if nh not in (4, 41) or not self.saflow.check_inbound(flow, payload):
                _bump(self.counters, "policy_drops")
                if tr is not None:
                    tr("10", "policy_drop", payload, spi=sa.spi, crypto_map=flow.crypto_map)
                return
            packet = payload
        else:
            if not dst:
                dst = self.transport_local.get(src) or self._learn_local(family, src)
            packet = build_ip_header(family, src, dst, nh, len(payload)) + payload
        if tr is not None:
            tr("10", "decrypted", packet, spi=sa.spi, crypto_map=flow.crypto_map)
        try:
            os.write(self.tun_for_map[flow.crypto_map], packet)  # step 12
        except (OSError, KeyError):
            _bump(self.counters, "tun_write_errors")
            return
        if tr is not None:
            tr("12", "tun_write", packet)
        _bump(self.counters, "esp_in_packets")

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
