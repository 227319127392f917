"""Outbound classification: which crypto map, if any, protects a packet.

This is the reference's step 3: IpsecMgr hands every packet read from the TUN
to NPUSIM, which answers

* ``Protect(crypto_map, rule)``: a crypto map's ACL permits it (step 3a);
* ``BYPASS``: no crypto map protects it, send it in clear (step 3b);
* ``Drop(reason)``: it cannot be classified (malformed, not IP).

Semantics (Cisco crypto maps; RFC 4301 §4.4.1 SPD ordering):

* Crypto maps are consulted in the order given.  Within a map's ACL the first
  matching line decides.  ``permit`` protects the packet with that map.
  ``deny`` means "not via this map": evaluation continues with the next map
  (a Cisco crypto ACL deny does not block traffic, it only exempts it from
  that map).  The end of an ACL is an implicit "no match" and also moves on.
  When no map protects the packet, it bypasses.
* IKE (UDP 500/4500) and ESP (protocol 50) to or from a configured peer always
  bypass, so that a broad ACL cannot swallow the tunnel's own control traffic
  (RFC 4301 §5.2 and §4.5.1 make the same exemption for IKE).  Only packets
  whose ports are visible qualify: a non-first UDP fragment to a peer is
  classified like any other packet, so protected traffic never leaks in clear.
* IPv6 packets that may not leave their link (link-local or unspecified
  source, link- or interface-local multicast destination: router
  solicitations, neighbour discovery, MLD) are dropped, never bypassed.
* Non-first fragments (RFC 4301 §7, ports OPAQUE) match only rules without port
  conditions.  A packet whose TCP/UDP header is cut short is dropped if a rule
  that would need its ports could decide it, and classified otherwise.

Matching is a tuple-space search (the scheme Open vSwitch uses): rules are
partitioned by address family and protocol (an ``ip`` rule joins every
partition of its family), then grouped by (source mask, destination mask,
and, where many rules share an address pair, exact destination port), and
each group is a dict from the masked header
fields to the rule indices that have them.  A lookup costs one dict probe per group,
not one test per rule, and groups are visited in the order of their lowest
rule index so that the search stops as soon as no group can beat the best
match found.  Sets of many host or prefix rules that share a few masks are
therefore nearly as cheap as small ones; a set with hundreds of distinct
wildcard masks degrades towards a linear scan (each mask is a group).

Rule indices are global across maps (map order, then line order).  The "deny
moves on to the next map" rule is a search with a floor: after a deny in map
*m* the search repeats for indices at or beyond the first rule of map *m + 1*.

Counters: ``counters[map_name]`` has ``protect`` and ``deny`` (a deny line of
that map matched); ``counters[GLOBAL]`` has ``bypass``, ``bypass_ike_esp``,
``drop`` and one entry per drop reason.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Final

from npusim.acl import ANY_FAMILY, ANY_PROTOCOL, Acl, Rule, in_ranges
from npusim.counters import GLOBAL, zero
from npusim.packet import (
    ALL_DROP_REASONS,
    DROP_TRUNCATED_L4,
    PORTS_OK,
    PORTS_TRUNCATED,
    PROTO_ESP,
    PROTO_UDP,
    parse_selectors,
)

_IKE_PORTS: Final = frozenset((500, 4500))  # RFC 7296 §2, RFC 3948 §2
_CONTROL_PROTOCOLS: Final = frozenset((PROTO_UDP, PROTO_ESP))


@dataclass(frozen=True, eq=False)
class CryptoMap:
    """A crypto map as the classifier sees it: a name, its ACL, its peers."""

    name: str
    acl: Acl = field(repr=False)
    peers: Sequence[str] = ()


class Bypass:
    """Send in clear (reference step 3b).  Use the singleton :data:`BYPASS`."""

    __slots__ = ()
    kind: ClassVar[str] = "bypass"

    def __repr__(self) -> str:
        return "BYPASS"


BYPASS: Final = Bypass()


@dataclass(frozen=True, slots=True, eq=False)
class Protect:
    """Protect with ``crypto_map``; ``rule`` is the ACL line that decided."""

    crypto_map: CryptoMap
    rule: Rule
    kind: ClassVar[str] = "protect"

    def __repr__(self) -> str:
        return f"Protect({self.crypto_map.name}, {self.rule.where})"


@dataclass(frozen=True, slots=True)
class Drop:
    """Do not forward; ``reason`` is a constant string and a counter name."""

    reason: str
    kind: ClassVar[str] = "drop"


Verdict = Bypass | Protect | Drop

DROP_LINK_SCOPE: Final = "ipv6_link_scope"
"""An IPv6 packet that may not leave its link (RFC 4291 §2.5.6, §2.7): a
link-local or unspecified source, or an interface- or link-local multicast
destination.  The TUN sees router solicitations and neighbour discovery of its
own; they are neither protected nor sent out of the management interface."""

_CLASSIFIER_DROPS: Final = (*ALL_DROP_REASONS, DROP_LINK_SCOPE)
_DROPS: Final = {reason: Drop(reason) for reason in _CLASSIFIER_DROPS}

# One candidate in a group's bucket: (global rule index, source port ranges,
# destination port ranges still to check; None = nothing to check).
_Candidate = tuple[int, tuple[tuple[int, int], ...] | None, tuple[tuple[int, int], ...] | None]
# A group: (lowest index, highest index, src mask, dst mask, dport mask, bucket).
# The dport mask is -1 when the group's rules all have one exact destination
# port (it is part of the key) and 0 otherwise; a packet without visible ports
# carries dport -1, which no exact-port key equals.
_Group = tuple[int, int, int, int, int, dict[tuple[int, int, int], list[_Candidate]]]
# Per family: groups by exact protocol, and the groups for other protocols
# (rules with protocol "ip" only).
_Index = tuple[dict[int, list[_Group]], list[_Group]]

_NO_MATCH: Final = 1 << 62
# Rules with the same masked address pair that one group may hold before the
# exact destination port becomes part of the key (see _groups).
_MAX_CANDIDATES: Final = 4


class Classifier:
    """Compiled crypto-map set; :meth:`classify` is the per-packet call."""

    def __init__(self, crypto_maps: Sequence[CryptoMap]) -> None:
        names = [m.name for m in crypto_maps]
        if GLOBAL in names:
            raise ValueError(f"crypto map name {GLOBAL!r} is reserved for global counters")
        if len(set(names)) != len(names):
            raise ValueError("crypto map names must be unique")
        self.crypto_maps: tuple[CryptoMap, ...] = tuple(crypto_maps)
        self.counters: dict[str, dict[str, int]] = {
            m.name: {"protect": 0, "deny": 0} for m in self.crypto_maps
        }
        self.counters[GLOBAL] = self._global = dict.fromkeys(
            ("bypass", "bypass_ike_esp", "drop", *_CLASSIFIER_DROPS), 0
        )
        # Per global rule index: (rule, Protect verdict or None for deny,
        # counter dict of its map, first index of the next map).
        self._entries: list[tuple[Rule, Protect | None, dict[str, int], int]] = []
        for cmap in self.crypto_maps:
            end = len(self._entries) + len(cmap.acl.rules)
            counters = self.counters[cmap.name]
            for rule in cmap.acl.rules:
                verdict = Protect(cmap, rule) if rule.permit else None
                self._entries.append((rule, verdict, counters, end))
        self._index: dict[int, _Index] = {4: self._build(4), 6: self._build(6)}
        # Peer addresses as ints per family, for the IKE/ESP exemption.
        peers: dict[int, set[int]] = {4: set(), 6: set()}
        for cmap in self.crypto_maps:
            for peer in cmap.peers:
                ip = ipaddress.ip_address(peer)
                peers[ip.version].add(int(ip))
        self._peers: dict[int, frozenset[int]] = {v: frozenset(s) for v, s in peers.items()}

    def _build(self, version: int) -> _Index:
        applicable = [
            (index, rule)
            for index, (rule, _, _, _) in enumerate(self._entries)
            if rule.version in (ANY_FAMILY, version)
        ]
        protocols = {rule.protocol for _, rule in applicable if rule.protocol >= 0}
        # Partitioning by protocol first keeps a TCP packet from probing the
        # groups of UDP-only rules, and takes the protocol out of the key.
        by_proto = {
            p: _groups([(i, r) for i, r in applicable if r.protocol in (p, ANY_PROTOCOL)])
            for p in protocols
        }
        other = _groups([(i, r) for i, r in applicable if r.protocol == ANY_PROTOCOL])
        return by_proto, other

    def classify(self, packet: bytes | bytearray | memoryview) -> Verdict:
        """Verdict for one outbound IP packet (as read from the TUN)."""
        sel = parse_selectors(packet)
        if isinstance(sel, str):
            g = self._global
            g["drop"] += 1
            g[sel] += 1
            return _DROPS[sel]
        version, proto, src, dst, sport, dport, pstate = sel
        if version == 6 and _link_scoped(src, dst):
            g = self._global
            g["drop"] += 1
            g[DROP_LINK_SCOPE] += 1
            return _DROPS[DROP_LINK_SCOPE]
        if proto in _CONTROL_PROTOCOLS and self._is_control(
            version, proto, src, dst, sport, dport, pstate
        ):
            self._global["bypass_ike_esp"] += 1
            return BYPASS
        if pstate == PORTS_TRUNCATED:
            return self._classify_truncated(version, proto, src, dst)
        ports = pstate == PORTS_OK
        by_proto, other = self._index[version]
        groups = by_proto.get(proto, other)
        entries = self._entries
        floor = 0
        while True:
            # Tuple-space search (inlined: this is the per-packet hot path) for
            # the lowest matching rule index at or above `floor`.
            best = _NO_MATCH
            for lo, hi, sm, dm, dpm, table in groups:
                if lo >= best:
                    break  # groups are sorted by lowest index: none can do better
                if hi < floor:
                    continue
                cands = table.get((src & sm, dst & dm, dport & dpm))
                if cands is None:
                    continue
                for index, sr, dr in cands:
                    if index >= best:
                        break
                    if index < floor:
                        continue
                    if sr is not None and not (ports and in_ranges(sport, sr)):
                        continue
                    if dr is not None and not (ports and in_ranges(dport, dr)):
                        continue
                    best = index
                    break
            if best == _NO_MATCH:
                self._global["bypass"] += 1
                return BYPASS
            _, verdict, counters, floor = entries[best]
            if verdict is not None:
                counters["protect"] += 1
                return verdict
            # A deny line: not via this map; search again from the next map.
            counters["deny"] += 1

    def permits_reply(
        self,
        name: str,
        version: int,
        proto: int,
        src: int,
        dst: int,
        sport: int,
        dport: int,
        pstate: int,
    ) -> bool:
        """Inbound ACL check (RFC 4301 §5.2) for a packet decrypted from crypto map
        ``name``: whether :meth:`classify` would protect its reply (addresses and
        ports swapped) with that same map. A Cisco crypto ACL is written for the
        outbound direction and mirrored for inbound. Counts nothing: the SA-flow
        table counts the verdict."""
        src, dst, sport, dport = dst, src, dport, sport
        if version == 6 and _link_scoped(src, dst):
            return False
        if proto in _CONTROL_PROTOCOLS and self._is_control(
            version, proto, src, dst, sport, dport, pstate
        ):
            return False  # the reply would bypass: never via a tunnel
        floor = 0
        while True:
            if pstate == PORTS_TRUNCATED:
                best = self._scan(version, proto, src, dst, floor)
                if best < 0:
                    return False
            else:
                by_proto, other = self._index[version]
                best = _search(
                    by_proto.get(proto, other), floor, src, dst, sport, dport, pstate == PORTS_OK
                )
            if best == _NO_MATCH:
                return False
            _, verdict, _, floor = self._entries[best]
            if verdict is not None:
                return verdict.crypto_map.name == name

    def clear_counters(self) -> None:
        """Zero every counter (the dicts stay the same objects)."""
        zero(self.counters)

    def _classify_truncated(self, version: int, proto: int, src: int, dst: int) -> Verdict:
        """The rare path for a packet whose TCP/UDP ports were cut off."""
        floor = 0
        while True:
            index = self._scan(version, proto, src, dst, floor)
            if index < 0:
                self._global["drop"] += 1
                self._global[DROP_TRUNCATED_L4] += 1
                return _DROPS[DROP_TRUNCATED_L4]
            if index == _NO_MATCH:
                self._global["bypass"] += 1
                return BYPASS
            _, verdict, counters, floor = self._entries[index]
            if verdict is not None:
                counters["protect"] += 1
                return verdict
            counters["deny"] += 1

    def _is_control(
        self, version: int, proto: int, src: int, dst: int, sport: int, dport: int, pstate: int
    ) -> bool:
        peers = self._peers[version]
        if src not in peers and dst not in peers:
            return False
        if proto == PROTO_ESP:
            return True
        return pstate == PORTS_OK and (sport in _IKE_PORTS or dport in _IKE_PORTS)

    def _scan(self, version: int, proto: int, src: int, dst: int, floor: int) -> int:
        """Linear search for a packet whose ports were cut off.

        Returns the first index >= floor whose rule matches without needing
        ports, _NO_MATCH, or -1 when a rule needing the missing ports comes
        first (the packet cannot be classified: RFC 4301 §5.1 discards it).
        """
        for index in range(floor, len(self._entries)):
            rule = self._entries[index][0]
            if rule.matches_addresses(version, proto, src, dst):
                return -1 if rule.needs_ports else index
        return _NO_MATCH


def _search(
    groups: list[_Group], floor: int, src: int, dst: int, sport: int, dport: int, ports: bool
) -> int:
    """The tuple-space search of :meth:`Classifier.classify` (inlined there, the
    outbound hot path): the lowest matching rule index at or above ``floor``."""
    best = _NO_MATCH
    for lo, hi, sm, dm, dpm, table in groups:
        if lo >= best:
            break
        if hi < floor:
            continue
        cands = table.get((src & sm, dst & dm, dport & dpm))
        if cands is None:
            continue
        for index, sr, dr in cands:
            if index >= best:
                break
            if index < floor:
                continue
            if sr is not None and not (ports and in_ranges(sport, sr)):
                continue
            if dr is not None and not (ports and in_ranges(dport, dr)):
                continue
            best = index
            break
    return best


def _link_scoped(src: int, dst: int) -> bool:
    # fe80::/10 link-local or :: unspecified source; ff01::/16 or ff02::/16
    # (any flags) interface-/link-local multicast destination.
    return src >> 118 == 0x3FA or src == 0 or (dst >> 120 == 0xFF and (dst >> 112) & 0xF in (1, 2))


def _groups(rules: list[tuple[int, Rule]]) -> list[_Group]:
    """Tuple-space groups for (global index, rule) pairs, in index order.

    Rules sharing a (source mask, destination mask) pair form one group, keyed
    on the masked addresses, unless that would pile many exact-port rules onto
    the same address pair (``permit tcp any host X eq N`` for many N): then
    the exact-port rules get a group of their own with the port in the key.
    One probe fewer per packet in the common case, no long candidate lists in
    the port-heavy one.
    """
    by_masks: dict[tuple[int, int], list[tuple[int, Rule]]] = {}
    for index, rule in rules:
        by_masks.setdefault((rule.src_mask, rule.dst_mask), []).append((index, rule))
    groups: list[_Group] = []
    for (sm, dm), members in by_masks.items():
        per_pair: dict[tuple[int, int], int] = {}
        for _, rule in members:
            pair = (rule.src, rule.dst)
            per_pair[pair] = per_pair.get(pair, 0) + 1
        split = max(per_pair.values()) > _MAX_CANDIDATES
        tables: dict[int, dict[tuple[int, int, int], list[_Candidate]]] = {}
        bounds: dict[int, list[int]] = {}
        for index, rule in members:
            dp = rule.dst_ports
            exact = split and dp is not None and len(dp) == 1 and dp[0][0] == dp[0][1]
            dpm = -1 if exact else 0
            key = (rule.src, rule.dst, dp[0][0] if dp is not None and exact else 0)
            cand: _Candidate = (index, rule.src_ports, None if exact else dp)
            tables.setdefault(dpm, {}).setdefault(key, []).append(cand)
            bounds.setdefault(dpm, [index, index])[1] = index
        for dpm, table in tables.items():
            groups.append((bounds[dpm][0], bounds[dpm][1], sm, dm, dpm, table))
    groups.sort(key=lambda g: g[0])
    return groups
