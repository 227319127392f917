"""Route changes in batches on one rtnetlink socket (rtnetlink(7), netlink(7)).

A gateway for 10,000 NAS starts with 10,000 fail-closed routes and as many TUN
routes. pyroute2 0.9 sends one request and waits for its answer through its
own asyncio core: about 0.35 ms per route here, 3.5 s per 10,000. The kernel
reads every message of one ``send`` in turn (``netlink_rcv_skb``) and answers
each with an ``NLMSG_ERROR`` carrying its sequence number and errno (0: done),
so :func:`apply` sends :data:`CHUNK` requests at once and reads their answers
back before the next chunk: the receive buffer never holds more than one
chunk's acknowledgements, and each request still gets its own result.
:class:`ipsecmgr.routing.Routing` keeps pyroute2 for everything else.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

# linux/netlink.h, linux/rtnetlink.h
NETLINK_ROUTE = 0
NLMSG_ERROR = 2
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
RTA_DST, RTA_OIF, RTA_PRIORITY, RTA_PREFSRC, RTA_TABLE = 1, 4, 6, 7, 15
RTPROT_STATIC = 4  # what pyroute2 and `ip route` set for routes added by hand
RT_TABLE_UNSPEC = 0  # rtm_table is 8 bits: a larger table goes in RTA_TABLE
#: Requests per send (their answers, ~40 bytes each, fit the default receive buffer).
CHUNK = 256
#: Seconds to wait for a chunk's answers (the kernel answers at once; a bound, not a pace).
TIMEOUT = 5.0

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst_len, src_len, tos, table, proto, scope, type, flags
_RTATTR = struct.Struct("=HH")
_FLAGS = {
    "add": NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    "replace": NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
    "del": NLM_F_REQUEST | NLM_F_ACK,
}


@dataclass(frozen=True)
class RouteRequest:
    """One ``ip route add|replace|del``: ``dst`` a prefix without host bits
    (``192.0.2.0/24``, as ``str(ipaddress.ip_network(...))`` spells it)."""

    op: str
    dst: str
    table: int
    type: int = 1  # RTN_UNICAST
    oif: int | None = None
    priority: int | None = None
    prefsrc: str | None = None


def _attr(kind: int, payload: bytes) -> bytes:
    raw = _RTATTR.pack(_RTATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def encode(req: RouteRequest, seq: int) -> bytes:
    """The RTM_NEWROUTE / RTM_DELROUTE message of ``req`` with sequence number ``seq``."""
    addr, _, plen = req.dst.partition("/")
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    bits = int(plen) if plen else (128 if family == socket.AF_INET6 else 32)
    body = _RTMSG.pack(family, bits, 0, 0, RT_TABLE_UNSPEC, RTPROT_STATIC, 0, req.type, 0)
    body += _attr(RTA_TABLE, struct.pack("=I", req.table))
    if bits:  # inet_pton, not ipaddress: 10,000s of routes at start
        body += _attr(RTA_DST, socket.inet_pton(family, addr))
    if req.oif is not None:
        body += _attr(RTA_OIF, struct.pack("=I", req.oif))
    if req.priority is not None:
        body += _attr(RTA_PRIORITY, struct.pack("=I", req.priority))
    if req.prefsrc is not None:
        src_family = socket.AF_INET6 if ":" in req.prefsrc else socket.AF_INET
        body += _attr(RTA_PREFSRC, socket.inet_pton(src_family, req.prefsrc))
    kind = RTM_DELROUTE if req.op == "del" else RTM_NEWROUTE
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, _FLAGS[req.op], seq, 0) + body


def apply(requests: Sequence[RouteRequest]) -> list[int]:
    """Send every request; the errno of each, in order (0: done)."""
    results = [0] * len(requests)
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
    ) as sock:
        sock.bind((0, 0))
        sock.settimeout(TIMEOUT)
        for start in range(0, len(requests), CHUNK):
            chunk = requests[start : start + CHUNK]
            # sequence numbers from 1: the index of the request, plus one
            sock.send(b"".join(encode(r, start + i + 1) for i, r in enumerate(chunk)))
            _read_answers(sock, results, start + 1, start + len(chunk))
    return results


def _read_answers(sock: socket.socket, results: list[int], first: int, last: int) -> None:
    """Read NLMSG_ERROR answers until every sequence number first..last has one."""
    waiting = set(range(first, last + 1))
    while waiting:
        data = sock.recv(1 << 16)  # socket.timeout (an OSError) if the kernel never answers
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                break
            if kind == NLMSG_ERROR and seq in waiting:
                (error,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                results[seq - 1] = -error
                waiting.discard(seq)
            offset += (length + 3) & ~3


RTM_GETROUTE = 26
NLMSG_DONE = 3
NLM_F_DUMP = 0x300


@dataclass(frozen=True)
class Route:
    """One route of a dump: what a delete and a description need."""

    dst: str  # prefix, e.g. 192.0.2.0/24
    type: int
    table: int
    oif: int | None = None
    priority: int | None = None

    def delete(self) -> RouteRequest:
        return RouteRequest("del", self.dst, self.table, self.type, self.oif, self.priority)


def dump(table: int) -> list[Route]:
    """Every IPv4 and IPv6 route of ``table`` (one RTM_GETROUTE dump, both families)."""
    request = _RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), RTM_GETROUTE,
                            NLM_F_REQUEST | NLM_F_DUMP, 1, 0)  # fmt: skip
    out: list[Route] = []
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
    ) as sock:
        sock.bind((0, 0))
        sock.settimeout(TIMEOUT)
        sock.send(header + request)
        while True:
            data = sock.recv(1 << 20)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if kind == NLMSG_DONE or length < _NLMSGHDR.size:
                    return out
                if kind == NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                    raise OSError(-error, os.strerror(-error))
                route = _parse_route(data[offset + _NLMSGHDR.size : offset + length])
                if route is not None and route.table == table:
                    out.append(route)
                offset += (length + 3) & ~3


def _parse_route(body: bytes) -> Route | None:
    family, dst_len, _s, _t, rtm_table, _p, _scope, rtype, _f = _RTMSG.unpack_from(body)
    attrs: dict[int, bytes] = {}
    offset = _RTMSG.size
    while offset + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, offset)
        if length < _RTATTR.size:
            break
        attrs[kind] = body[offset + _RTATTR.size : offset + length]
        offset += (length + 3) & ~3
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    zero = b"\0" * (16 if family == socket.AF_INET6 else 4)
    addr = socket.inet_ntop(family, attrs.get(RTA_DST, zero))  # C: 10,000s of routes
    table = struct.unpack("=I", attrs[RTA_TABLE])[0] if RTA_TABLE in attrs else rtm_table
    oif = struct.unpack("=I", attrs[RTA_OIF])[0] if RTA_OIF in attrs else None
    prio = struct.unpack("=I", attrs[RTA_PRIORITY])[0] if RTA_PRIORITY in attrs else None
    return Route(f"{addr}/{dst_len}", rtype, table, oif, prio)


def canonical(prefix: str) -> str:
    """``prefix`` spelled as :func:`dump` spells a route's ``dst`` (``inet_ntop``)."""
    addr, _, plen = prefix.partition("/")
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    bits = plen or ("128" if family == socket.AF_INET6 else "32")
    return f"{socket.inet_ntop(family, socket.inet_pton(family, addr))}/{bits}"
