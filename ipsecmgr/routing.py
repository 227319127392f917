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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

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
        wanted = {str(ipaddress.ip_network(p)) for p in keep}
        return self._flush(lambda route: not (_is_block(route) and _prefix(route) in wanted))

    def _flush(self, select: Callable[[Any], bool]) -> list[str]:
        removed = []
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                routes = self._ipr.get_routes(family=family, table=self.table)
            except NetlinkError:
                continue  # IPv6 disabled: nothing there
            for route in routes:
                if not select(route):
                    continue
                try:
                    self._ipr.route("del", **_route_key(route, self.table))
                except NetlinkError as exc:
                    if exc.code not in (_ENOENT, _ESRCH):
                        raise
                removed.append(describe_route(route))
        return removed

    def block_routes(self) -> list[str]:
        """The fail-closed routes in our table, described (``prohibit 192.0.2.0/24``)."""
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                routes = self._ipr.get_routes(family=family, table=self.table)
            except NetlinkError:
                continue
            out += [describe_route(r) for r in routes if _is_block(r)]
        return out

    def remove_blocks(self, prefixes: Iterable[str]) -> list[str]:
        """Remove the fail-closed routes of ``prefixes`` (no longer protected after a
        reload); TUN routes stay. Returns them, described. One delete per prefix (by
        its metric and type), no dump of the table: a reload's cost follows what it
        unblocks, not the size of the table."""
        removed = []
        for prefix in prefixes:
            net = ipaddress.ip_network(prefix)
            family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
            for rtype in BLOCK_TYPES:
                try:
                    self._ipr.route(
                        "del", dst=str(net), table=self.table, family=family, type=rtype,
                        priority=BLOCK_METRIC,
                    )  # fmt: skip
                except NetlinkError as exc:
                    if exc.code not in (_ENOENT, _ESRCH):
                        raise
                    continue
                removed.append(f"{BLOCK_TYPE_NAMES[rtype]} {net} metric {BLOCK_METRIC}")
                break
        return removed

    def install_blocks(self, prefixes: Iterable[str]) -> list[str]:
        """A fail-closed route per prefix (``replace``: idempotent on a takeover).

        Tries prohibit, then unreachable, then blackhole; returns what could not be
        protected (IPv6 disabled, no such route type), one line each, so the daemon
        says so at start and still protects the rest."""
        failed: list[str] = []
        for prefix in prefixes:
            net = ipaddress.ip_network(prefix)
            family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
            errors = []
            for rtype in BLOCK_TYPES:
                try:
                    self._ipr.route(
                        "replace",
                        dst=str(net),
                        table=self.table,
                        family=family,
                        type=rtype,
                        priority=BLOCK_METRIC,
                    )
                    break
                except NetlinkError as exc:
                    errors.append(f"{BLOCK_TYPE_NAMES[rtype]}: {_strerror(exc)}")
            else:
                failed.append(f"{net}: no fail-closed route ({'; '.join(errors)})")
        return failed

    # -- routes --------------------------------------------------------------

    def add_tun_routes(self, ifname: str, routes: Iterable[TunRoute]) -> None:
        (index,) = self._ipr.link_lookup(ifname=ifname)
        for r in routes:
            kwargs: dict[str, object] = {
                "dst": r.prefix,
                "oif": index,
                "table": self.table,
                "family": r.family,
            }
            if r.src:
                kwargs["prefsrc"] = r.src
            try:
                self._ipr.route("add", **kwargs)
            except NetlinkError as exc:
                if exc.code != _EEXIST:
                    raise

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


def _is_block(route: Any) -> bool:
    return route["type"] in BLOCK_TYPES


def _prefix(route: Any) -> str:
    dst = route.get_attr("RTA_DST")
    if dst is None:
        dst = "::" if route["family"] == socket.AF_INET6 else "0.0.0.0"
    return str(ipaddress.ip_network(f"{dst}/{route['dst_len']}"))


def describe_route(route: Any) -> str:
    """``prohibit 192.0.2.7/32 metric 32767`` / ``192.0.2.7/32 oif 5``."""
    kind = BLOCK_TYPE_NAMES.get(route["type"], "")
    parts = [kind, _prefix(route)] if kind else [_prefix(route)]
    oif = route.get_attr("RTA_OIF")
    if oif:
        parts.append(f"oif {oif}")
    prio = route.get_attr("RTA_PRIORITY")
    if prio:
        parts.append(f"metric {prio}")
    return " ".join(parts)


def _route_key(route: object, table: int) -> dict[str, object]:
    msg = route  # a pyroute2 rtmsg
    get_attr = msg.get_attr  # type: ignore[attr-defined]
    key: dict[str, object] = {
        "table": table,
        "family": msg["family"],  # type: ignore[index]
        "dst_len": msg["dst_len"],  # type: ignore[index]
    }
    dst = get_attr("RTA_DST")
    if dst:
        key["dst"] = dst
    oif = get_attr("RTA_OIF")
    if oif:
        key["oif"] = oif
    prio = get_attr("RTA_PRIORITY")
    if prio:
        key["priority"] = prio
    key["type"] = msg["type"]  # type: ignore[index]
    return key


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
