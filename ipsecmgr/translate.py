"""Configuration → IKE engine configuration: proposals, traffic selectors, identities.

Pure functions of the parsed configuration (:mod:`ipsecmgr.config`) and the
ACLs (:mod:`npusim`): the manager builds one :class:`ike.IkeConfig` per crypto
map with :func:`build_ike_config`, and converts the engine's traffic selectors
for the SA-flow table with :func:`npu_selectors`.
"""

from __future__ import annotations

import functools
import ipaddress
import random
from collections.abc import Callable, Sequence

import ike
import npusim
from ipsecmgr import config as cfg

_ENCR = {
    "aes-gcm-128": (ike.EncrId.AES_GCM_16, 128),
    "aes-gcm-256": (ike.EncrId.AES_GCM_16, 256),
    "aes-cbc-256": (ike.EncrId.AES_CBC, 256),
}
_PRF = {
    "sha256": ike.PrfId.HMAC_SHA2_256,
    "sha384": ike.PrfId.HMAC_SHA2_384,
    "sha512": ike.PrfId.HMAC_SHA2_512,
}
_INTEG = {
    "sha256": ike.IntegId.HMAC_SHA2_256_128,
    "sha384": ike.IntegId.HMAC_SHA2_384_192,
    "sha512": ike.IntegId.HMAC_SHA2_512_256,
}
_ID_TYPE = {
    "ipv4": ike.IdType.ID_IPV4_ADDR,
    "ipv6": ike.IdType.ID_IPV6_ADDR,
    "fqdn": ike.IdType.ID_FQDN,
    "email": ike.IdType.ID_RFC822_ADDR,
}


def ike_proposals(config: cfg.Config, cmap: cfg.CryptoMap) -> tuple[ike.IkeProposal, ...]:
    out = []
    for name in cmap.ike_transform_sets:
        ts = config.ike_transform_sets[name]
        encr, bits = _ENCR[ts.encryption]
        integ = _INTEG[ts.integrity or ts.prf] if encr == ike.EncrId.AES_CBC else ike.IntegId.NONE
        out.append(ike.IkeProposal(encr, bits, _PRF[ts.prf], integ, ike.DhGroup(ts.dh_group)))
    return tuple(out)


def esp_proposals(config: cfg.Config, cmap: cfg.CryptoMap) -> tuple[ike.EspProposal, ...]:
    out = []
    for name in cmap.ipsec_transform_sets:
        ts = config.ipsec_transform_sets[name]
        out.append(ike.EspProposal(_ENCR[ts.esp][1], ts.esn))
    return tuple(out)


def _rule_range(value: int, mask: int, version: int) -> tuple[int, int] | None:
    """The address range of an ACL address/mask if the mask is a prefix, else None."""
    bits = 32 if version == 4 else 128
    full = (1 << bits) - 1
    host_bits = full & ~mask
    if host_bits & (host_bits + 1):  # not contiguous: no single range
        return None
    return value & mask, (value & mask) | host_bits


def selectors_from_acl(
    acl: npusim.Acl,
) -> tuple[list[ike.TrafficSelector], list[ike.TrafficSelector]]:
    """Traffic selectors from an ACL's permit lines, as Cisco proxy identities.

    The source of a permit line is our side (TSi when we initiate), the
    destination the peer's; ``ip`` means any protocol (0) and a single port
    range becomes the selector's port range.
    """
    local: list[ike.TrafficSelector] = []
    remote: list[ike.TrafficSelector] = []
    for rule in acl.rules:
        if not rule.permit:
            continue
        versions = (4, 6) if rule.version not in (4, 6) else (rule.version,)
        for version in versions:
            proto = 0 if rule.protocol < 0 else rule.protocol
            for value, mask, ports, into in (
                (rule.src, rule.src_mask, rule.src_ports, local),
                (rule.dst, rule.dst_mask, rule.dst_ports, remote),
            ):
                rng = _rule_range(value, mask, version) or (
                    0,
                    (1 << (32 if version == 4 else 128)) - 1,
                )
                lo, hi = (0, 65535) if not ports or len(ports) != 1 else ports[0]
                sel = ike.TrafficSelector(
                    ipaddress.ip_address(rng[0])
                    if version == 6 or rng[1] > 0xFFFFFFFF
                    else ipaddress.IPv4Address(rng[0]),
                    ipaddress.IPv6Address(rng[1])
                    if version == 6
                    else ipaddress.IPv4Address(rng[1]),
                    proto,
                    lo,
                    hi,
                )
                if sel not in into:
                    into.append(sel)
    return local, remote


# Both selector types are frozen: the few selectors in use are converted once.
@functools.lru_cache(maxsize=1024)
def npu_selector(ts: ike.TrafficSelector) -> npusim.TrafficSelector:
    version, start, end = ts.span  # the ints the engine's selector holds (no new ones)
    return npusim.TrafficSelector(version, ts.ip_proto, start, end, ts.start_port, ts.end_port)


def npu_selectors(selectors: Sequence[ike.TrafficSelector]) -> tuple[npusim.TrafficSelector, ...]:
    """The engine's selectors of one side of a Child SA, for its SA-flow entry: one
    tuple for every SA with the same selectors (e.g. our side, the same for many
    peers; a tuple of one selector is 48 bytes per SA-flow entry)."""
    return _npu_selectors(tuple(selectors))


# Small: what repeats is our side (one set per ACL shape, used by every install, so
# never the least recently used); the peers' sides mostly differ and only pass
# through (an entry is ~250 bytes: 1,024 of them would cost more than they save).
@functools.lru_cache(maxsize=64)
def _npu_selectors(
    selectors: tuple[ike.TrafficSelector, ...],
) -> tuple[npusim.TrafficSelector, ...]:
    return tuple(npu_selector(t) for t in selectors)


def ts_text(selectors: Sequence[ike.TrafficSelector]) -> list[str]:
    """The selectors as ``show`` prints them (each one formatted once)."""
    return [_one_ts_text(t) for t in selectors]


@functools.lru_cache(maxsize=1024)
def _one_ts_text(ts: ike.TrafficSelector) -> str:
    return str(ts)


def build_ike_config(
    config: cfg.Config,
    cmap: cfg.CryptoMap,
    acl: npusim.Acl,
    jitter: Callable[[], float] = random.random,
) -> ike.IkeConfig:
    """The engine's config of a crypto map, its lifetime policy included (the engine
    owns rekeys and expiry, ike.lifetimes); ``jitter``: the random source of the
    rekey jitter (RFC 7296 §2.8), uniform in [0, 1)."""
    ts = config.ipsec_transform_sets[cmap.ipsec_transform_sets[0]]
    local_ts, remote_ts = selectors_from_acl(acl)
    return ike.IkeConfig(
        local_addr=(str(cmap.local_address), config.gateway.ike_port),
        peer_addr=(str(cmap.peer), config.gateway.ike_port),
        local_id=ike.Identity(_ID_TYPE[cmap.local_id.type], cmap.local_id.value),
        remote_id=ike.Identity(_ID_TYPE[cmap.remote_id.type], cmap.remote_id.value),
        local_psk=cmap.local_psk.reveal(),
        remote_psk=cmap.remote_psk.reveal(),
        ike_proposals=ike_proposals(config, cmap),
        esp_proposals=esp_proposals(config, cmap),
        pfs_group=ike.DhGroup(ts.pfs_group) if ts.pfs_group else None,
        local_ts=tuple(local_ts),
        remote_ts=tuple(remote_ts),
        mode=cmap.mode,
        retransmit_timeout=cmap.retransmission_timeout_ms / 1000.0,
        retransmit_tries=cmap.max_retransmission,
        initial_contact=cmap.initial_contact,
        fake_nat=cmap.encapsulation == "always",
        nat_traversal=cmap.encapsulation != "never",
        ike_lifetime=float(config.ike_transform_sets[cmap.ike_transform_sets[0]].lifetime),
        child_lifetime=float(ts.lifetime_seconds),
        child_lifetime_packets=ts.lifetime_packets or 0,
        child_lifetime_bytes=ts.lifetime_bytes or 0,
        jitter=jitter,
        rekey_lazy=ts.rekey == "lazy",
        name=cmap.name,
    )
