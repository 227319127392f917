"""Routes and policy rules that steer traffic into the TUN, and keep the
gateway's own IKE/ESP packets out of it.

Layout (one per gateway, both address families)::

    rule <prio>     fwmark MARK lookup main     # our sockets (IKE, ESP, bypass)
    rule <prio+1>   lookup TABLE                # everybody else
    table TABLE:    <protected or bypass destination> dev TUN [src SRC_IP]

Our sockets set SO_MARK = MARK, so their packets skip TABLE. Without this, in
transport mode (peer = the TACACS+ server itself) the ESP packet to the server
would be routed straight back into the TUN. A destination that is not in TABLE
falls through to the main table as usual.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

DEFAULT_TABLE = 0x4950  # "IP"
DEFAULT_MARK = 0x4950
DEFAULT_PRIORITY = 1000

_ENOENT = 2
_ESRCH = 3
_EEXIST = 17


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

    def install_rules(self) -> None:
        for family in (socket.AF_INET, socket.AF_INET6):
            self._ipr.rule(
                "add",
                family=family,
                priority=self.priority,
                fwmark=self.mark,
                fwmask=0xFFFFFFFF,
                table=254,  # main
            )
            self._ipr.rule("add", family=family, priority=self.priority + 1, table=self.table)

    def remove_rules(self) -> None:
        """Remove our rules; also used on start to clear what a crash left behind."""
        for family in (socket.AF_INET, socket.AF_INET6):
            for prio in (self.priority, self.priority + 1):
                while True:
                    try:
                        self._ipr.rule("del", family=family, priority=prio)
                    except NetlinkError as exc:
                        if exc.code in (_ENOENT, _ESRCH):
                            break
                        raise

    def flush_table(self) -> None:
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in self._ipr.get_routes(family=family, table=self.table):
                try:
                    self._ipr.route("del", **_route_key(route, self.table))
                except NetlinkError as exc:
                    if exc.code not in (_ENOENT, _ESRCH):
                        raise

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
    return key
