"""The flows of a crypto map: src_ip (tunnel mode) and the routes into its TUN."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from ipsecmgr.staros.model import (
    _Map,
)
from npusim import AclSyntaxError, Rule, parse_acl
from npusim.packet import PORTS_OK, PROTO_TCP

if TYPE_CHECKING:
    from ipsecmgr.staros.writer import _Writer


def map_flows(w: _Writer, m: _Map, mode: str) -> tuple[str | None, list[str]]:
    """src_ip (tunnel mode) and the routes into the TUN, from the ACL and tacacs mode."""
    acl = w.r.acls.get(m.acl or "")
    if acl is None:
        return None, []
    rules: list[Rule] = []
    for _line, text in acl.rules:
        try:
            rules.extend(parse_acl(acl.name, [text]).rules)
        except AclSyntaxError:
            continue  # reported with the ACL
    permits = [x for x in rules if x.permit]
    routes: list[str] = []
    for x in permits:
        net = _network(x.dst, x.dst_mask, x.version)
        if net is None:
            w.note(
                acl.line, "action",
                f"ACL {acl.name}: '{x.text}' has no destination prefix to route into the "
                "TUN (any or a non-contiguous wildcard): add the routes to the tun by hand",
            )  # fmt: skip
        elif str(net) not in routes:
            routes.append(str(net))
    if mode != "tunnel":
        return None, routes
    # Tunnel mode needs the inner source (reference: "mandatory to provision the
    # src-ip"): the tacacs server whose src_ip -> server flow the ACL permits.
    for srv in w.r.tacacs:
        if srv.src_ip is None:
            continue
        fam = srv.address.version
        for x in permits:
            hit = parse_acl(acl.name, [x.text]).first_match(
                fam, PROTO_TCP, int(srv.src_ip), int(srv.address), 1024, srv.port, PORTS_OK
            )  # fmt: skip
            if hit is not None and hit.permit:
                return str(srv.src_ip), routes
    hosts = {
        str(net.network_address)
        for x in permits
        if (net := _network(x.src, x.src_mask, x.version)) is not None
        and net.prefixlen == net.max_prefixlen
    }
    if len(hosts) == 1:
        (src,) = hosts
        w.note(
            m.line, "decision",
            f"crypto map {m.name}: src_ip {src} is the source host of ACL {acl.name} "
            "(no tacacs mode 'server ... nas-source-address' matches it): it must be "
            "the TACACS+ client's source address",
        )  # fmt: skip
        return src, routes
    w.note(
        m.line, "error",
        f"crypto map {m.name}: tunnel mode needs src_ip (the TACACS+ client's source, "
        "tacacs mode 'server ... nas-source-address'); none could be derived",
    )  # fmt: skip
    return None, routes


def _network(
    value: int, mask: int, version: int
) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    bits = 32 if version in (4, 0) else 128
    full = (1 << bits) - 1
    if mask == 0:
        return None  # "any"
    inv = full ^ mask
    if inv & (inv + 1):
        return None  # non-contiguous wildcard
    prefix = bits - inv.bit_length()
    # By family, not ipaddress.ip_network(): the integer of ::/16 is also 0.0.0.0.
    if bits == 32:
        return ipaddress.IPv4Network((value, prefix))
    return ipaddress.IPv6Network((value, prefix))
