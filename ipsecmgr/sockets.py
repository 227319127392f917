"""The gateway's sockets: ESP (raw IP protocol 50), IKE (UDP 500, 4500) and
the clear-text bypass path (raw, header included).

Every socket carries SO_MARK so its packets skip the TUN routing table (see
:mod:`ipsecmgr.routing`); that is what keeps the tunnel from swallowing its
own IKE and ESP packets.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger("ipsecmgr.sockets")

IPPROTO_ESP = 50
SO_MARK = getattr(socket, "SO_MARK", 36)
# linux/udp.h (SOL_UDP = IPPROTO_UDP = 17): UDP GSO (Linux 4.18) and GRO (5.0).
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104


def _marked(sock: socket.socket, mark: int) -> socket.socket:
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    sock.setblocking(False)
    return sock


def esp_socket(family: int, mark: int) -> socket.socket:
    """Raw ESP socket. IPv4 ``recv`` returns the outer IP header (strip IHL×4);
    IPv6 raw sockets never include the IPv6 header."""
    sock = socket.socket(family, socket.SOCK_RAW, IPPROTO_ESP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    return _marked(sock, mark)


def udp_socket(family: int, address: str, port: int, mark: int) -> socket.socket:
    """IKE on UDP 500, or IKE + ESP-in-UDP on 4500 (RFC 3948)."""
    sock = socket.socket(family, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Port 4500 carries the ESP of whole TCP windows: the buffers of the raw ESP socket
    # (the default ~200 KiB drops bursts in the kernel, uncounted by us).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address, port))
    return _marked(sock, mark)


def bypass_socket(family: int, mark: int) -> socket.socket:
    """Step 3b: send a packet read from the TUN out in clear, header as is.

    ``IPPROTO_RAW`` implies IP_HDRINCL for IPv4 and the same for IPv6 on
    Linux; the mark makes the route lookup use the main table, i.e. the
    management interface, not the TUN the packet came from."""
    sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
    return _marked(sock, mark)


def enable_udp_offload(sock: socket.socket) -> tuple[bool, bool]:
    """UDP GSO and GRO on an ESP-in-UDP socket: (gso, gro) as the kernel allowed them.

    GSO: one ``sendmsg`` with a ``UDP_SEGMENT`` cmsg carries a run of equal-size
    datagrams (the kernel cuts them, net/ipv4/udp.c ``udp_send_skb``); probed by
    setting the socket default to 0 (= off), which any kernel with the option
    accepts. GRO: ``recvmsg`` may return several datagrams of one flow back to
    back, with their size in a ``UDP_GRO`` cmsg (``udp_cmsg_recv``). A refusal
    is one warning and that offload stays off; the socket works as before.
    """
    gso = gro = True
    try:
        sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)
    except OSError as exc:
        log.warning("UDP GSO (UDP_SEGMENT) refused on %s: %s; sending one datagram per call",
                    sock.getsockname(), exc)  # fmt: skip
        gso = False
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError as exc:
        log.warning("UDP GRO refused on %s: %s; receiving one datagram per call",
                    sock.getsockname(), exc)  # fmt: skip
        gro = False
    return gso, gro
