"""Transparent capture of the protected TACACS+ flows: no client change.

For each server address a TLS map captures, a ``local`` route goes into a
table next to the gateway's own (:class:`CaptureRoutes` says why not the same)::

    rule <prio> ipproto tcp dport 49 lookup TABLE+1
    local 203.0.113.49 dev lo table TABLE+1

so a client's SYN to 203.0.113.49:49, generated on this host or forwarded
through it, is delivered to this host instead of routed out. A listener bound
to exactly that address and port takes the connection; binding to an address
the host does not own needs ``IP_TRANSPARENT`` (CAP_NET_ADMIN). The listener's
``getsockname()`` is the client's original destination. The gateway's own
upstream sockets carry the gateway mark (``rule <prio> fwmark MARK lookup
main``), so its TLS connection to 203.0.113.49:300 skips the table and leaves
through the main table as usual.

While the daemon runs, the route exists; it is removed when it stops. A
daemon killed with SIGKILL leaves the rule and the route: the address stays
local and a client's SYN is answered by a RST (no listener), never sent in
clear (fail closed), until the next start clears them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ipsecmgr.tls.config import IPAddress

# linux/in.h and linux/in6.h; Python 3.11's socket module lacks both names.
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
_EEXIST, _ENOENT, _ESRCH = 17, 2, 3
RTN_LOCAL = 2
TCP = 6
RT_SCOPE_HOST = 254


def transparent_listener(address: IPAddress, port: int, backlog: int = 128) -> socket.socket:
    """A listening socket bound to ``address:port`` whether or not the host owns it."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        s.bind((str(address), port))
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def plain_listener(address: IPAddress, port: int, backlog: int = 128) -> socket.socket:
    """The explicit ``listen = "127.0.0.1:9049"`` socket (clients configured the proxy way)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((str(address), port))
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


class CaptureRoutes:
    """The capture's policy rules and ``local`` routes, added and removed as a set::

        rule <prio> ipproto tcp dport 49 lookup TABLE+1     # after the fwmark rule
        TABLE+1: local 203.0.113.49 dev lo src 127.0.0.1

    Why a rule per TACACS+ port and a table of its own rather than the gateway's
    catch-all table: the kernel's reverse-path check of a packet *from* the
    server (our TLS connection's replies, port 300) looks its source up with
    the same rules, and would find it "local" (a martian source, dropped). The
    check swaps the ports, so a rule limited to destination port 49 never
    matches the server's replies. It also puts the capture before the IPsec
    TUN routes (same priority as the fwmark rule, added after it).

    ``src`` is loopback (127.0.0.1, ::1), for clients on this host: without a
    source the kernel picks the captured address itself, which no interface owns,
    and connect() fails with ENETUNREACH. Loopback, rather than one of the
    gateway's addresses, because the kernel never routes a loopback source out of
    a non-loopback device: a captured connection still open when its capture is
    removed (SIGHUP moving the server back to IPsec) cannot leak a single packet
    through the TUN's bypass or the WAN; it just dies.
    """

    def __init__(self, table: int, priority: int) -> None:
        self.table = table
        self.priority = priority
        self.routes: list[IPAddress] = []
        self.rules: list[tuple[int, int]] = []  # (family, port)
        self.src: dict[int, IPAddress] = {
            4: ipaddress.IPv4Address("127.0.0.1"),
            6: ipaddress.IPv6Address("::1"),
        }

    def _route(self, ipr: IPRoute, op: str, a: IPAddress) -> None:
        (lo,) = ipr.link_lookup(ifname="lo")
        ipr.route(
            op,
            dst=f"{a}/{a.max_prefixlen}",
            table=self.table,
            type=RTN_LOCAL,
            scope=RT_SCOPE_HOST,  # what `ip route add local` sets; the kernel requires it
            oif=lo,
            prefsrc=str(self.src[a.version]),
            family=socket.AF_INET6 if a.version == 6 else socket.AF_INET,
        )

    def _rule(self, ipr: IPRoute, op: str, family: int, port: int) -> None:
        ipr.rule(op, family=family, priority=self.priority, table=self.table,
                 ip_proto=TCP, dport_range=f"{port}:{port}")  # fmt: skip

    def sync(self, capture: Iterable[tuple[IPAddress, int]]) -> None:
        """Make the installed rules and routes exactly those ``capture`` needs:
        missing ones are added first, then the ones no longer needed removed."""
        want = set(capture)
        routes = {a for a, _ in want}
        rules = {(int(socket.AF_INET6 if a.version == 6 else socket.AF_INET), p) for a, p in want}
        with IPRoute() as ipr:
            for family, port in sorted(rules - set(self.rules)):
                try:
                    self._rule(ipr, "add", family, port)
                except NetlinkError as exc:
                    if exc.code != _EEXIST:  # kept from a daemon that died (fail closed)
                        raise
                self.rules.append((family, port))
            for a in sorted(routes - set(self.routes), key=str):
                try:
                    self._route(ipr, "add", a)
                except NetlinkError as exc:
                    if exc.code != _EEXIST:
                        raise
                self.routes.append(a)
            for family, port in [r for r in self.rules if r not in rules]:
                try:
                    self._rule(ipr, "del", family, port)
                except NetlinkError as exc:
                    if exc.code not in (_ENOENT, _ESRCH):
                        raise
                self.rules.remove((family, port))
            for a in [r for r in self.routes if r not in routes]:
                try:
                    self._route(ipr, "del", a)
                except NetlinkError as exc:
                    if exc.code not in (_ENOENT, _ESRCH):
                        raise
                self.routes.remove(a)

    def remove(self) -> None:
        self.sync(())

    def flush_stale(self, keep: Iterable[IPAddress] = ()) -> list[IPAddress]:
        """Routes a killed or stopped daemon left in our table, but those in ``keep``:
        a capture still wanted stays in place through a restart, so that its port-49
        rule never points at an empty table (the lookup would go on to main: clear).
        Returns the addresses whose capture was removed."""
        wanted = {str(a) for a in keep}
        removed: list[IPAddress] = []
        with IPRoute() as ipr:
            for family in (socket.AF_INET, socket.AF_INET6):
                for r in ipr.get_routes(family=family, table=self.table):
                    dst = r.get_attr("RTA_DST")
                    if dst and str(ipaddress.ip_address(dst)) not in wanted:
                        with contextlib.suppress(NetlinkError):
                            self._route(ipr, "del", ipaddress.ip_address(dst))
                            removed.append(ipaddress.ip_address(dst))
        return removed
