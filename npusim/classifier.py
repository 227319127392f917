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

Rule indices are global across maps (map order, then line order).  The
search above finds the lowest matching index; when that rule is a permit (the
common case) it decides.  When it is a deny ("not via this map", move on to the
next map) the packet takes the deny path, which never restarts the search:
every bucket the packet hits is split at build time into *classes*, candidates
with the same port conditions (they match or not together), each with an id.
The ids of the classes the packet matches are the key of a bounded memo whose
value is the exact outcome, computed once from those classes' rules in index
order (skip the rest of a map after its first deny).  A packet that every map
denies with the same line (10,000 maps) costs one pass over the groups and one
dict probe, not one restart per map.  Deny counters of such an outcome are
added in bulk when ``counters`` is read.  A packet whose ports were cut off
takes the same path with address-only classes (a rule that needs the missing
ports and comes first drops it).

Counters: ``counters[map_name]`` has ``protect`` and ``deny`` (a deny line of
that map matched); ``counters[GLOBAL]`` has ``bypass``, ``bypass_ike_esp``,
``drop`` and one entry per drop reason.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
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

# Candidates of one bucket with the same port conditions: (class id, source port
# ranges, destination port ranges; None = no condition). They match together.
_Class = tuple[int, tuple[tuple[int, int], ...] | None, tuple[tuple[int, int], ...] | None]
# One candidate in a group's bucket: (global rule index, source port ranges,
# destination port ranges still to check; None = nothing to check).
_Candidate = tuple[int, tuple[tuple[int, int], ...] | None, tuple[tuple[int, int], ...] | None]
# A group: (lowest index, highest index, src mask, dst mask, dport mask, bucket).
# The dport mask is -1 when the group's rules all have one exact destination
# port (it is part of the key) and 0 otherwise; a packet without visible ports
# carries dport -1, which no exact-port key equals.
_Group = tuple[
    int,
    int,
    int,
    int,
    int,
    dict[tuple[int, int, int], "list[_Candidate] | _PortIndex"],
    dict[tuple[int, int, int], "list[_Class] | _PortIndex"],
]
# Per family: groups by exact protocol, and the groups for other protocols
# (rules with protocol "ip" only).
_Index = tuple[dict[int, list[_Group]], list[_Group]]

_NO_MATCH: Final = 1 << 62
_DROP_TRUNCATED: Final = -1
# Probe value of the destination port for a packet whose ports were cut off: the
# groups keyed on an exact port then answer with all their candidates (address only).
_ANY_PORT: Final = -2
# Deny-path outcomes remembered (a full memo is folded and cleared, see _remember)
_MEMO_MAX: Final = 65536
# An outcome with more denies than this adds them to the counters in bulk, later
_BULK_DENIES: Final = 8


# A bucket with more candidates than this, some with port conditions, gets a _PortIndex
_PORT_INDEX_MIN: Final = 8
_PORT_MEMO_MAX: Final = 256


class _PortIndex:
    """A bucket of many candidates with port conditions (every map denies its own
    port range, say): instead of testing each, the ports are cut into elementary
    intervals (every range start and end + 1 is a boundary), inside which every
    condition is true or false throughout. What matches in a pair of intervals
    (a *cell*) is computed once; a few hundred cells are remembered."""

    __slots__ = ("_db", "_memo", "_sb", "all", "cands", "uid")

    def __init__(self, cands: list[_Candidate], uid: int) -> None:
        self.cands = cands
        self.uid = uid
        self.all = tuple(i for i, _, _ in cands)  # address-only match (ports cut off)
        sb: set[int] = set()
        db: set[int] = set()
        for _, sr, dr in cands:
            for lo, hi in sr or ():
                sb.update((lo, hi + 1))
            for lo, hi in dr or ():
                db.update((lo, hi + 1))
        self._sb = sorted(sb)
        self._db = sorted(db)
        self._memo: dict[tuple[int, int], tuple[int, tuple[int, ...]]] = {}

    def cell(self, sport: int, dport: int, ports: bool) -> tuple[int, int]:
        if not ports:
            return (-1, -1)  # only candidates without port conditions can match
        return bisect_right(self._sb, sport), bisect_right(self._db, dport)

    def lookup(
        self, cell: tuple[int, int], sport: int, dport: int, ports: bool
    ) -> tuple[int, tuple[int, ...]]:
        """(lowest matching index or _NO_MATCH, every matching index) in ``cell``,
        which (sport, dport, ports) lie in."""
        found = self._memo.get(cell)
        if found is None:
            matching = tuple(
                i
                for i, sr, dr in self.cands
                if (sr is None or (ports and in_ranges(sport, sr)))
                and (dr is None or (ports and in_ranges(dport, dr)))
            )
            found = (matching[0] if matching else _NO_MATCH, matching)
            if len(self._memo) >= _PORT_MEMO_MAX:
                self._memo.clear()
            self._memo[cell] = found
        return found


class _Outcome:
    """What a set of matched classes decides: a rule index (or _NO_MATCH,
    _DROP_TRUNCATED), and the counters of the maps whose deny came first."""

    __slots__ = ("denies", "hits", "index")

    def __init__(self, index: int, denies: tuple[dict[str, int], ...]) -> None:
        self.index = index
        self.denies = denies
        self.hits = 0  # deny counts not yet added (only with many denies)


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
        self._memo: dict[tuple[int, ...], _Outcome] = {}
        self._unfolded: dict[_Outcome, None] = {}
        self._counters: dict[str, dict[str, int]] = {
            m.name: {"protect": 0, "deny": 0} for m in self.crypto_maps
        }
        self._counters[GLOBAL] = self._global = dict.fromkeys(
            ("bypass", "bypass_ike_esp", "drop", *_CLASSIFIER_DROPS), 0
        )
        # Per global rule index: (rule, Protect verdict or None for deny,
        # counter dict of its map, first index of the next map).
        self._entries: list[tuple[Rule, Protect | None, dict[str, int], int]] = []
        for cmap in self.crypto_maps:
            end = len(self._entries) + len(cmap.acl.rules)
            counters = self._counters[cmap.name]
            for rule in cmap.acl.rules:
                verdict = Protect(cmap, rule) if rule.permit else None
                self._entries.append((rule, verdict, counters, end))
        # Class id -> the rule indices of that class, ascending
        self._members: list[tuple[int, ...]] = []
        self._port_indexes: list[_PortIndex] = []  # by uid - 1
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
            p: _groups(
                [(i, r) for i, r in applicable if r.protocol in (p, ANY_PROTOCOL)],
                self._members,
                self._port_indexes,
            )
            for p in protocols
        }
        other = _groups(
            [(i, r) for i, r in applicable if r.protocol == ANY_PROTOCOL],
            self._members,
            self._port_indexes,
        )
        return by_proto, other

    @property
    def counters(self) -> dict[str, dict[str, int]]:
        """Per map ``protect``/``deny``, and the global counters (``GLOBAL``)."""
        self._fold()
        return self._counters

    @counters.setter
    def counters(self, value: dict[str, dict[str, int]]) -> None:
        # (the split data path shows the OUTBOUND worker's counters through this object)
        self._fold()
        self._counters = value

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
        # Tuple-space search (inlined: this is the per-packet hot path) for the
        # lowest matching rule index.
        best = _NO_MATCH
        for lo, _, sm, dm, dpm, table, _ in groups:
            if lo >= best:
                break  # groups are sorted by lowest index: none can do better
            cands = table.get((src & sm, dst & dm, dport & dpm))
            if cands is None:
                continue
            if isinstance(cands, _PortIndex):
                first = cands.lookup(cands.cell(sport, dport, ports), sport, dport, ports)[0]
                if first < best:
                    best = first
                continue
            for index, sr, dr in cands:
                if index >= best:
                    break
                if sr is not None and not (ports and in_ranges(sport, sr)):
                    continue
                if dr is not None and not (ports and in_ranges(dport, dr)):
                    continue
                best = index
                break
        if best == _NO_MATCH:
            self._global["bypass"] += 1
            return BYPASS
        _, verdict, counters, _ = self._entries[best]
        if verdict is not None:
            counters["protect"] += 1
            return verdict
        # A deny line: not via this map. The other maps decide (the deny path).
        return self._deny_path(groups, src, dst, sport, dport, ports, False)

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
        table counts the verdict. Bounded like the deny path (:meth:`_outcome`)."""
        src, dst, sport, dport = dst, src, dport, sport
        if version == 6 and _link_scoped(src, dst):
            return False
        if proto in _CONTROL_PROTOCOLS and self._is_control(
            version, proto, src, dst, sport, dport, pstate
        ):
            return False  # the reply would bypass: never via a tunnel
        by_proto, other = self._index[version]
        groups = by_proto.get(proto, other)
        if pstate == PORTS_TRUNCATED:
            outcome = self._outcome(groups, src, dst, _ANY_PORT, _ANY_PORT, False, True)
        else:
            outcome = self._outcome(groups, src, dst, sport, dport, pstate == PORTS_OK, False)
        if outcome.index in (_NO_MATCH, _DROP_TRUNCATED):
            return False
        verdict = self._entries[outcome.index][1]
        return verdict is not None and verdict.crypto_map.name == name

    def clear_counters(self) -> None:
        """Zero every counter (the dicts stay the same objects)."""
        for outcome in self._unfolded:
            outcome.hits = 0
        self._unfolded.clear()
        zero(self._counters)

    def _classify_truncated(self, version: int, proto: int, src: int, dst: int) -> Verdict:
        """The rare path for a packet whose TCP/UDP ports were cut off."""
        by_proto, other = self._index[version]
        groups = by_proto.get(proto, other)
        return self._deny_path(groups, src, dst, _ANY_PORT, _ANY_PORT, False, True)

    def _outcome(
        self,
        groups: list[_Group],
        src: int,
        dst: int,
        sport: int,
        dport: int,
        ports: bool,
        truncated: bool,
    ) -> _Outcome:
        """The decision from every class the packet matches, remembered by their ids
        (nothing counted). Bounded: one probe per group and one test per class of the
        buckets hit; the outcome itself is computed once per set of classes (_decide)."""
        hit: list[int] = [truncated]
        for _, _, sm, dm, dpm, _, classes in groups:
            found = classes.get((src & sm, dst & dm, dport & dpm))
            if found is None:
                continue
            if isinstance(found, _PortIndex):
                # the cell stands for its matching candidates (-uid: not a class id)
                hit += (
                    (-found.uid, -2, -2)
                    if truncated
                    else (-found.uid, *found.cell(sport, dport, ports))
                )
                continue
            for cid, sr, dr in found:
                if not truncated:
                    if sr is not None and not (ports and in_ranges(sport, sr)):
                        continue
                    if dr is not None and not (ports and in_ranges(dport, dr)):
                        continue
                hit.append(cid)
        key = tuple(hit)
        outcome = self._memo.get(key)
        if outcome is None:
            outcome = self._decide(hit[1:], truncated, sport, dport, ports)
            self._remember(key, outcome)
        return outcome

    def _deny_path(
        self,
        groups: list[_Group],
        src: int,
        dst: int,
        sport: int,
        dport: int,
        ports: bool,
        truncated: bool,
    ) -> Verdict:
        """The verdict of a packet the first matching line does not protect (a deny
        line, or ports cut off), with its counters: see :meth:`_outcome`."""
        outcome = self._outcome(groups, src, dst, sport, dport, ports, truncated)
        if len(outcome.denies) > _BULK_DENIES:
            outcome.hits += 1
            self._unfolded[outcome] = None
        else:
            for counters in outcome.denies:
                counters["deny"] += 1
        index = outcome.index
        if index == _NO_MATCH:
            self._global["bypass"] += 1
            return BYPASS
        if index == _DROP_TRUNCATED:
            self._global["drop"] += 1
            self._global[DROP_TRUNCATED_L4] += 1
            return _DROPS[DROP_TRUNCATED_L4]
        _, verdict, counters, _ = self._entries[index]
        assert verdict is not None
        counters["protect"] += 1
        return verdict

    def _decide(
        self, hit: list[int], truncated: bool, sport: int, dport: int, ports: bool
    ) -> _Outcome:
        """First-match per map over the matched classes' rules, maps in order: a
        permit decides, a deny skips the rest of its map (Cisco crypto ACLs)."""
        members = self._members
        found: set[int] = set()
        it = iter(hit)
        for cid in it:
            if cid >= 0:
                found.update(members[cid])
                continue
            pi = self._port_indexes[-cid - 1]
            cell = (next(it), next(it))
            found.update(pi.all if truncated else pi.lookup(cell, sport, dport, ports)[1])
        indices = sorted(found)
        denies: list[dict[str, int]] = []
        skip = -1
        for index in indices:
            if index < skip:
                continue
            rule, verdict, counters, end = self._entries[index]
            if truncated and rule.needs_ports:
                # RFC 4301 §5.1: the rule that decides needs the missing ports
                return _Outcome(_DROP_TRUNCATED, tuple(denies))
            if verdict is not None:
                return _Outcome(index, tuple(denies))
            denies.append(counters)
            skip = end
        return _Outcome(_NO_MATCH, tuple(denies))

    def _remember(self, key: tuple[int, ...], outcome: _Outcome) -> None:
        if len(self._memo) >= _MEMO_MAX:
            self._fold()
            self._memo.clear()
        self._memo[key] = outcome

    def _fold(self) -> None:
        """Add the deny counts kept in bulk to the maps' counters."""
        for outcome in self._unfolded:
            for counters in outcome.denies:
                counters["deny"] += outcome.hits
            outcome.hits = 0
        self._unfolded.clear()

    def _is_control(
        self, version: int, proto: int, src: int, dst: int, sport: int, dport: int, pstate: int
    ) -> bool:
        peers = self._peers[version]
        if src not in peers and dst not in peers:
            return False
        if proto == PROTO_ESP:
            return True
        return pstate == PORTS_OK and (sport in _IKE_PORTS or dport in _IKE_PORTS)


def _link_scoped(src: int, dst: int) -> bool:
    # fe80::/10 link-local or :: unspecified source; ff01::/16 or ff02::/16
    # (any flags) interface-/link-local multicast destination.
    return src >> 118 == 0x3FA or src == 0 or (dst >> 120 == 0xFF and (dst >> 112) & 0xF in (1, 2))


def _groups(
    rules: list[tuple[int, Rule]],
    class_members: list[tuple[int, ...]],
    port_indexes: list[_PortIndex],
) -> list[_Group]:
    """Tuple-space groups for (global index, rule) pairs, in index order.

    Rules sharing a (source mask, destination mask) pair form one group, keyed
    on the masked addresses, unless that would pile many exact-port rules onto
    the same address pair (``permit tcp any host X eq N`` for many N): then
    the exact-port rules get a group of their own with the port in the key.
    One probe fewer per packet in the common case, no long candidate lists in
    the port-heavy one.

    Each bucket is also split into classes for the deny path (see the module
    docstring); their rule indices are appended to ``class_members``. A group keyed
    on exact ports also answers ``_ANY_PORT`` with one class per address pair
    holding all its rules (for packets whose ports were cut off).
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
        tables: dict[int, dict[tuple[int, int, int], list[_Candidate] | _PortIndex]] = {}
        bounds: dict[int, list[int]] = {}
        for index, rule in members:
            dp = rule.dst_ports
            exact = split and dp is not None and len(dp) == 1 and dp[0][0] == dp[0][1]
            dpm = -1 if exact else 0
            key = (rule.src, rule.dst, dp[0][0] if dp is not None and exact else 0)
            cand: _Candidate = (index, rule.src_ports, None if exact else dp)
            bucket = tables.setdefault(dpm, {}).setdefault(key, [])
            assert isinstance(bucket, list)
            bucket.append(cand)
            bounds.setdefault(dpm, [index, index])[1] = index
        for dpm, table in tables.items():
            classes = _classes(table, dpm, class_members)
            for key, cands in list(table.items()):
                assert isinstance(cands, list)
                if len(cands) > _PORT_INDEX_MIN and any(sr or dr for _, sr, dr in cands):
                    pi = _PortIndex(cands, len(port_indexes) + 1)
                    port_indexes.append(pi)
                    table[key] = classes[key] = pi
            groups.append((bounds[dpm][0], bounds[dpm][1], sm, dm, dpm, table, classes))
    groups.sort(key=lambda g: g[0])
    return groups


def _classes(
    table: dict[tuple[int, int, int], list[_Candidate] | _PortIndex],
    dpm: int,
    members: list[tuple[int, ...]],
) -> dict[tuple[int, int, int], list[_Class] | _PortIndex]:
    """Per bucket: its candidates grouped by their port conditions, one class id each."""
    out: dict[tuple[int, int, int], list[_Class] | _PortIndex] = {}
    every: dict[tuple[int, int, int], list[int]] = {}
    for key, cands in table.items():
        assert isinstance(cands, list)
        by_ports: dict[tuple[object, object], list[int]] = {}
        conditions: dict[tuple[object, object], _Class] = {}
        for index, sr, dr in cands:
            by_ports.setdefault((sr, dr), []).append(index)
            conditions.setdefault((sr, dr), (0, sr, dr))
        found: list[_Class] = []
        out[key] = found
        for cond, indices in by_ports.items():
            _, sr, dr = conditions[cond]
            found.append((len(members), sr, dr))
            members.append(tuple(indices))
        if dpm == -1:
            every.setdefault((key[0], key[1], _ANY_PORT), []).extend(i for i, _, _ in cands)
    for key, indices in every.items():
        out[key] = [(len(members), None, None)]
        members.append(tuple(sorted(indices)))
    return out
