"""``[crypto_map.NAME]``: which traffic is protected, with whom, how.

One function per group of keys, called in the order the errors are reported
(peer, local address, match_address, transform sets, src_ip, keys and
identities, timers); :func:`parse_crypto_map` puts them together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ipsecmgr.config.getters import _MISSING, Getters
from ipsecmgr.config.model import (
    ENCAPSULATIONS,
    FIRST_PACKET,
    MAX_DPD_TIMEOUT,
    MAX_RETRIES,
    MIN_TIMER,
    ON_UNREACHABLE,
    ROLES,
    CryptoMap,
    Dpd,
    Gateway,
    Identity,
    IkeTransformSet,
    IPAddress,
    IpsecTransformSet,
)
from ipsecmgr.secret import Secret

KEYS = (
    "peer", "local_address", "match_address", "local_id", "remote_id",
    "local_psk", "remote_psk", "ike_transform_sets", "ipsec_transform_sets",
    "src_ip", "role", "retransmission_timeout", "max_retransmission", "dpd",
    "first_packet", "queue_size", "encapsulation", "initial_contact",
    "nat_keepalive", "peers", "preempt", "on_unreachable",
)  # fmt: skip


def parse_crypto_map(
    p: Getters,
    name: str,
    t: dict[str, Any],
    ikes: Mapping[str, IkeTransformSet],
    ipsecs: Mapping[str, IpsecTransformSet],
    gw: Gateway | None,
    acl_names: set[str],
) -> CryptoMap | None:
    """One crypto map, or None with its errors reported."""
    path = f"crypto_map.{name}"
    p.keys(t, path, KEYS)
    n = len(p.errors)
    peers = p.peer_list(t, path)
    if peers is not None:
        peer = peers[0] if peers else None
    else:
        peer_raw = p.required(t, "peer", path)
        peer = p.address(peer_raw, f"{path}.peer") if peer_raw is not _MISSING else None
    local = _local_address(p, t, path, gw, peer, peers)
    acl = _match_address(p, t, path, acl_names)
    ike_sets, ipsec_sets, mode = _transform_sets(p, t, path, ikes, ipsecs)
    role = p.choice(t, "role", path, ROLES, "initiator")
    src_ip = _src_ip(p, t, path, peer, mode, role)
    local_psk, remote_psk, local_id, remote_id = _authentication(p, t, path, local, peer)
    options = _timers_and_options(p, t, path)
    if len(p.errors) > n:
        return None
    if None in (peer, local, acl, local_psk, remote_psk, local_id, remote_id):
        # Only when another section is broken (no valid [gateway]: no local
        # address to pick); that section's error says what to fix.
        if not p.errors:
            p.err(path, "incomplete (peer, local address, match_address or PSK missing)")
        return None
    assert peer is not None and local is not None and acl is not None  # for mypy
    assert local_psk is not None and remote_psk is not None
    assert local_id is not None and remote_id is not None
    return CryptoMap(
        name=name, peer=peer, local_address=local, match_address=acl,
        local_id=local_id, remote_id=remote_id, local_psk=local_psk, remote_psk=remote_psk,
        ike_transform_sets=ike_sets, ipsec_transform_sets=ipsec_sets, mode=mode,
        src_ip=src_ip, role=role, peers=tuple(peers or (peer,)), **options,
    )  # fmt: skip


def _local_address(
    p: Getters,
    t: Mapping[str, Any],
    path: str,
    gw: Gateway | None,
    peer: IPAddress | None,
    peers: list[IPAddress] | None,
) -> IPAddress | None:
    """``local_address``, or the first gateway address of the peer's family."""
    local: IPAddress | None = None
    if "local_address" in t:
        local = p.address(t["local_address"], f"{path}.local_address")
        if local is not None and gw is not None and local not in gw.local_addresses:
            p.err(f"{path}.local_address", f"{local} is not one of gateway.local_addresses")
    elif peer is not None and gw is not None:
        same = [a for a in gw.local_addresses if a.version == peer.version]
        if same:
            local = same[0]
    if peer is not None and gw is not None and local is None and "local_address" not in t:
        p.err(
            f"{path}.peer",
            f"IPv{peer.version} peer, but gateway.local_addresses has no IPv{peer.version} address",
        )
    if peer is not None and local is not None and peer.version != local.version:
        p.err(
            f"{path}.peer",
            f"IPv{peer.version} peer but local address {local} is IPv{local.version}",
        )
    for other in (peers or [])[1:]:
        if local is not None and other.version != local.version:
            p.err(f"{path}.peers", f"IPv{other.version} peer {other} but local address {local} "
                  f"is IPv{local.version}")  # fmt: skip
    return local


def _match_address(p: Getters, t: Mapping[str, Any], path: str, acl_names: set[str]) -> Any:
    acl = p.string(t, "match_address", path)
    if acl is None and "match_address" not in t:
        p.err(f"{path}.match_address", "missing (required: the name of an access_list)")
    elif acl is not None and acl not in acl_names:
        p.err(f"{path}.match_address", f"no access_list named {acl!r}")
    return acl


def _transform_sets(
    p: Getters,
    t: Mapping[str, Any],
    path: str,
    ikes: Mapping[str, IkeTransformSet],
    ipsecs: Mapping[str, IpsecTransformSet],
) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """The IKE and IPsec transform-set names, and the one mode of the latter."""
    ike_sets = p.set_refs(t, "ike_transform_set", path, set(ikes) | p.declared_ike)
    ipsec_sets = p.set_refs(t, "ipsec_transform_set", path, set(ipsecs) | p.declared_ipsec)
    modes = {ipsecs[s].mode if s in ipsecs else "tunnel" for s in ipsec_sets}
    if len(modes) > 1:
        p.err(
            f"{path}.ipsec_transform_sets",
            "mixes tunnel and transport mode; use one mode per crypto map",
        )
    mode = modes.pop() if len(modes) == 1 else "tunnel"
    return ike_sets, ipsec_sets, mode


def _src_ip(
    p: Getters, t: Mapping[str, Any], path: str, peer: IPAddress | None, mode: str, role: str
) -> IPAddress | None:
    """The inner source address (tunnel mode initiators need one)."""
    src_ip: IPAddress | None = None
    if "src_ip" in t:
        src_ip = p.address(t["src_ip"], f"{path}.src_ip")
        if src_ip is not None and peer is not None and src_ip.version != peer.version:
            # Reference limitation: the inner family follows the tunnel endpoints.
            p.warnings.append(
                f"{path}.src_ip: IPv{src_ip.version} inside an IPv{peer.version} tunnel"
            )
        if mode == "transport":
            p.warnings.append(
                f"{path}.src_ip: ignored in transport mode (the local address is the source)"
            )
    elif mode == "tunnel" and role == "initiator":
        p.err(
            f"{path}.src_ip",
            "missing: tunnel mode needs src_ip (the inner source address of the protected traffic)",
        )
    return src_ip


def _authentication(
    p: Getters,
    t: Mapping[str, Any],
    path: str,
    local: IPAddress | None,
    peer: IPAddress | None,
) -> tuple[Secret | None, Secret | None, Identity | None, Identity | None]:
    """Both PSKs (the remote one defaults to the local one) and both identities."""
    local_psk_raw = p.required(t, "local_psk", path)
    local_psk = p.psk(local_psk_raw, f"{path}.local_psk") if local_psk_raw is not _MISSING else None
    remote_psk = p.psk(t["remote_psk"], f"{path}.remote_psk") if "remote_psk" in t else local_psk
    local_id = p.identity(t.get("local_id", _MISSING), f"{path}.local_id", local) if local else None
    remote_id = (
        p.identity(t.get("remote_id", _MISSING), f"{path}.remote_id", peer) if peer else None
    )
    return local_psk, remote_psk, local_id, remote_id


def _timers_and_options(p: Getters, t: Mapping[str, Any], path: str) -> dict[str, Any]:
    """Retransmission, DPD, first packet, NAT-T and failover options, as
    :class:`CryptoMap` keyword arguments."""
    rto = p.integer(t, "retransmission_timeout", path, 2000, lo=100, hi=600_000)
    maxr = p.integer(t, "max_retransmission", path, 3, lo=0, hi=MAX_RETRIES)
    dpd = Dpd()
    if "dpd" in t:
        dt = p.table(t["dpd"], f"{path}.dpd")
        if dt is not None:
            p.keys(dt, f"{path}.dpd", ("interval", "timeout", "retries"))
            dpd = Dpd(
                p.number(dt, "interval", f"{path}.dpd", 30.0, lo=MIN_TIMER, off=True),
                p.number(dt, "timeout", f"{path}.dpd", 10.0, lo=MIN_TIMER, hi=MAX_DPD_TIMEOUT),
                p.integer(dt, "retries", f"{path}.dpd", 3, lo=0, hi=MAX_RETRIES),
            )
    first = p.choice(t, "first_packet", path, FIRST_PACKET, "drop")
    qsize = p.integer(t, "queue_size", path, 8, lo=1, hi=1024)
    if "queue_size" in t and first != "queue":
        p.warnings.append(f'{path}.queue_size: ignored unless first_packet = "queue"')
    return {
        "retransmission_timeout_ms": rto,
        "max_retransmission": maxr,
        "dpd": dpd,
        "first_packet": first,
        "queue_size": qsize,
        "encapsulation": p.choice(t, "encapsulation", path, ENCAPSULATIONS, "auto"),
        "initial_contact": p.boolean(t, "initial_contact", path, True),
        "nat_keepalive": p.number(t, "nat_keepalive", path, 20.0, lo=MIN_TIMER, off=True),
        "preempt": p.boolean(t, "preempt", path, True),
        "on_unreachable": p.choice(t, "on_unreachable", path, ON_UNREACHABLE, "icmp"),
    }
