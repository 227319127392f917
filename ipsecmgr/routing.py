"""Routes and policy rules that steer traffic into the TUN, and keep the
gateway's own IKE/ESP packets out of it.

Layout (one per gateway, both address families)::

    rule <prio>     fwmark MARK lookup main     # our sockets (IKE, ESP, bypass)
    rule <prio+1>   lookup TABLE                # everybody else
    table TABLE:    <protected or bypass destination> dev TUN [src SRC_IP]
                    prohibit <protected prefix> metric BLOCK_METRIC

Our sockets set SO_MARK = MARK, so their packets skip TABLE. Without this, in
transport mode (peer = the TACACS+ server itself) the ESP packet to the server
would be routed straight back into the TUN. A destination that is not in TABLE
falls through to the main table as usual.

Fail closed (docs/security.md): every prefix a ``permit`` of a crypto map's ACL
covers also has a ``prohibit`` route in TABLE at :data:`BLOCK_METRIC`, worse than
the TUN routes (metric 0). Those routes name no device, so they outlive the
TUN and the process: when the daemon dies (SIGKILL, crash, OOM) or the TUN is
deleted, the kernel drops the TUN routes, the prohibit route becomes the match,
and a local sender gets EACCES at once instead of its packet leaving in clear
through the main table. They are installed before the rules and the first TUN
route, and only ``on_stop = "clear"`` or ``ipsecmgr down`` removes them.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ipsecmgr import nlbatch
from ipsecmgr.nlbatch import Route, RouteRequest

if TYPE_CHECKING:
    import npusim
    from ipsecmgr import config as cfg

DEFAULT_TABLE = 0x4950  # "IP"
DEFAULT_MARK = 0x4950
DEFAULT_PRIORITY = 1000

#: Metric of the fail-closed routes: any TUN route (metric 0) wins while it exists.
BLOCK_METRIC = 0x7FFF

_ENOENT = 2
_ESRCH = 3
_EEXIST = 17
_EAFNOSUPPORT = 97

# rtnetlink route types (linux/rtnetlink.h RTN_*), in order of preference: prohibit
# answers a local sender EACCES (and a forwarded packet ICMP "administratively
# prohibited"), unreachable EHOSTUNREACH; blackhole drops silently (no error, but
# still nothing in clear).
RTN_UNICAST = 1
RTN_BLACKHOLE = 6
RTN_UNREACHABLE = 7
RTN_PROHIBIT = 8
BLOCK_TYPES = (RTN_PROHIBIT, RTN_UNREACHABLE, RTN_BLACKHOLE)
BLOCK_TYPE_NAMES = {RTN_PROHIBIT: "prohibit", RTN_UNREACHABLE: "unreachable",
                    RTN_BLACKHOLE: "blackhole"}  # fmt: skip


@dataclass(frozen=True)
class TunRoute:
    """A destination routed into a TUN, with the source the kernel should pick."""

    prefix: str
    src: str | None = None

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ipaddress.ip_network(self.prefix).version == 6 else socket.AF_INET


class Routing:
    """Installs and removes the rules and routes of one gateway."""

    def __init__(
        self,
        *,
        table: int = DEFAULT_TABLE,
        mark: int = DEFAULT_MARK,
        priority: int = DEFAULT_PRIORITY,
    ) -> None:
        self.table = table
        self.mark = mark
        self.priority = priority
        self._ipr = IPRoute()
        # Bulk route changes (blocks, TUN routes): many per netlink send (ipsecmgr.nlbatch)
        self._apply: Callable[[Sequence[RouteRequest]], list[int]] = nlbatch.apply
        self._dump: Callable[[int], list[Route]] = nlbatch.dump

    def close(self) -> None:
        self._ipr.close()

    # -- rules ---------------------------------------------------------------

    def install_rules(self) -> list[str]:
        """Our two rules per family; rules already there (a takeover) are kept as they are.

        Returns what could not be done (e.g. IPv6 disabled), one line each."""
        failed: list[str] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                self._rule_add(
                    family=family,
                    priority=self.priority,
                    fwmark=self.mark,
                    fwmask=0xFFFFFFFF,
                    table=254,  # main
                )
                self._rule_add(family=family, priority=self.priority + 1, table=self.table)
            except NetlinkError as exc:
                if family == socket.AF_INET:
                    raise
                failed.append(f"IPv6 policy rules: {_strerror(exc)}")
        return failed

    def _rule_add(self, **kwargs: object) -> None:
        prio = kwargs["priority"]
        existing = self._ipr.get_rules(family=kwargs["family"], priority=prio)
        if any(r.get_attr("FRA_TABLE") == kwargs["table"] for r in existing):
            return  # kept from a daemon that died: no window without the rule
        try:
            self._ipr.rule("add", **kwargs)
        except NetlinkError as exc:
            if exc.code != _EEXIST:
                raise

    def remove_rules(self) -> list[str]:
        """Remove our rules (``on_stop = "clear"``, ``ipsecmgr down``); returns them."""
        removed = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for prio in (self.priority, self.priority + 1):
                while True:
                    try:
                        self._ipr.rule("del", family=family, priority=prio)
                    except NetlinkError as exc:
                        if exc.code in (_ENOENT, _ESRCH, _EAFNOSUPPORT):
                            break
                        raise
                    v = 6 if family == socket.AF_INET6 else 4
                    removed.append(f"IPv{v} rule priority {prio}")
        return removed

    def flush_table(self) -> list[str]:
        """Remove every route of our table; returns them, described."""
        return self._flush(lambda route: True)

    def flush_except_blocks(self, keep: Iterable[str]) -> list[str]:
        """Remove every route of our table but the fail-closed routes for ``keep``
        (a takeover: stale TUN routes and blocks for prefixes no longer protected go)."""
        wanted = {nlbatch.canonical(p) for p in keep}
        return self._flush(lambda route: not (_is_block(route) and route.dst in wanted))

    def _flush(self, select: Callable[[Route], bool]) -> list[str]:
        """Delete the routes of our table ``select`` picks (one dump, batched deletes)."""
        routes = [r for r in self._dump(self.table) if select(r)]
        removed = []
        for route, code in zip(routes, self._apply([r.delete() for r in routes]), strict=True):
            if code not in (0, _ENOENT, _ESRCH):
                raise NetlinkError(code, f"route {route.dst}: {os.strerror(code)}")
            removed.append(describe_route(route))
        return removed

    def block_routes(self) -> list[str]:
        """The fail-closed routes in our table, described (``prohibit 192.0.2.0/24``)."""
        return [describe_route(r) for r in self._dump(self.table) if _is_block(r)]

    def remove_blocks(self, prefixes: Iterable[str]) -> list[str]:
        """Remove the fail-closed routes of ``prefixes`` (no longer protected after a
        reload); TUN routes stay. Returns them, described. One delete per prefix (by
        its metric and type), no dump of the table: a reload's cost follows what it
        unblocks, not the size of the table."""
        nets = [str(ipaddress.ip_network(p)) for p in prefixes]
        removed: list[str] = []
        todo = list(range(len(nets)))
        for rtype in BLOCK_TYPES:
            if not todo:
                break
            requests = [
                RouteRequest("del", nets[i], self.table, rtype, priority=BLOCK_METRIC) for i in todo
            ]
            left = []
            for i, code in zip(todo, self._apply(requests), strict=True):
                if code == 0:
                    removed.append(f"{BLOCK_TYPE_NAMES[rtype]} {nets[i]} metric {BLOCK_METRIC}")
                elif code in (_ENOENT, _ESRCH):
                    left.append(i)  # not there, or of another type
                else:
                    raise NetlinkError(code, os.strerror(code))
            todo = left
        return removed

    def install_blocks(self, prefixes: Iterable[str]) -> list[str]:
        """A fail-closed route per prefix (``replace``: idempotent on a takeover).

        Tries prohibit, then unreachable, then blackhole; returns what could not be
        protected (IPv6 disabled, no such route type), one line each, so the daemon
        says so at start and still protects the rest. In batches (ipsecmgr.nlbatch)."""
        nets = [nlbatch.canonical(p) for p in prefixes]
        errors: list[list[str]] = [[] for _ in nets]
        todo = list(range(len(nets)))
        for rtype in BLOCK_TYPES:
            if not todo:
                break
            requests = [
                RouteRequest("replace", nets[i], self.table, rtype, priority=BLOCK_METRIC)
                for i in todo
            ]
            left = []
            for i, code in zip(todo, self._apply(requests), strict=True):
                if code:
                    errors[i].append(f"{BLOCK_TYPE_NAMES[rtype]}: {os.strerror(code)}")
                    left.append(i)
            todo = left
        return [f"{nets[i]}: no fail-closed route ({'; '.join(errors[i])})" for i in todo]

    # -- routes --------------------------------------------------------------

    def add_tun_routes(self, ifname: str, routes: Iterable[TunRoute]) -> None:
        """Routes into the TUN (in batches: 10,000 NAS, 10,000 routes)."""
        (index,) = self._ipr.link_lookup(ifname=ifname)
        requests = [
            RouteRequest("add", r.prefix, self.table, oif=index, prefsrc=r.src) for r in routes
        ]
        for req, code in zip(requests, self._apply(requests), strict=True):
            if code and code != _EEXIST:
                raise NetlinkError(code, f"route {req.dst} dev {ifname}: {os.strerror(code)}")

    def add_address(self, ifname: str, address: str) -> None:
        """Put an address (e.g. the tunnel-mode ``src_ip``) on the TUN."""
        iface = ipaddress.ip_interface(address)
        (index,) = self._ipr.link_lookup(ifname=ifname)
        family = socket.AF_INET6 if iface.version == 6 else socket.AF_INET
        try:
            self._ipr.addr(
                "add",
                index=index,
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
                family=family,
            )
        except NetlinkError as exc:
            if exc.code != _EEXIST:
                raise

    def link_exists(self, ifname: str) -> bool:
        return bool(self._ipr.link_lookup(ifname=ifname))

    def delete_link(self, ifname: str) -> None:
        for index in self._ipr.link_lookup(ifname=ifname):
            self._ipr.link("del", index=index)


def _strerror(exc: NetlinkError) -> str:
    return os.strerror(exc.code) if exc.code else str(exc)


def _is_block(route: Route) -> bool:
    return route.type in BLOCK_TYPES


def describe_route(route: Route) -> str:
    """``prohibit 192.0.2.7/32 metric 32767`` / ``192.0.2.7/32 oif 5``."""
    kind = BLOCK_TYPE_NAMES.get(route.type, "")
    parts = [kind, route.dst] if kind else [route.dst]
    if route.oif:
        parts.append(f"oif {route.oif}")
    if route.priority:
        parts.append(f"metric {route.priority}")
    return " ".join(parts)


def tun_routes(
    config: cfg.Config, acls: Mapping[str, npusim.Acl], tun: cfg.TunInterface
) -> list[TunRoute]:
    """Routes into ``tun`` with the source address the kernel should use: ``src_ip``
    of the first tunnel-mode crypto map (in the TUN's order) with a permit line that
    can match a destination in the prefix, our own outer address for the rest
    (those may be bypassed in clear, step 3b).

    One pass over the maps' permit lines builds an index (family, wildcard mask,
    masked destination) -> first map; each route then costs one probe per distinct
    mask, not a test of every map (10,000 routes x 10,000 maps was 10^8 tests)."""
    first: dict[tuple[int, int, int], tuple[int, str]] = {}
    masks: dict[int, set[int]] = {4: set(), 6: set()}
    for order, name in enumerate(tun.crypto_maps):
        m = config.crypto_maps[name]
        if m.mode != "tunnel" or m.src_ip is None:
            continue
        v = m.src_ip.version
        for r in acls[m.match_address].rules:
            if r.permit and r.version in (v, 0):
                first.setdefault((v, r.dst_mask, r.dst), (order, str(m.src_ip)))
                masks[v].add(r.dst_mask)
    outer = {a.version: str(a) for a in reversed(config.gateway.local_addresses)}
    routes = []
    for prefix in tun.routes:
        net = int(prefix.network_address)
        v = prefix.version
        hits = [hit for mask in masks[v] if (hit := first.get((v, mask, net & mask)))]
        routes.append(TunRoute(str(prefix), min(hits)[1] if hits else outer.get(v)))
    return routes
