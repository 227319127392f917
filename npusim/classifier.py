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

Matching is per-field bit-vector intersection (Lakshman and Stiliadis, "High-speed
policy-based packet forwarding using efficient multi-dimensional range matching",
SIGCOMM 1998), per address family. Every rule is one bit of a Python int, in
global order (map order, then line order, one spare bit after each map). Each
field (protocol, source and destination address, source and destination port)
maps a packet's value to the int of the rules whose condition on that field
holds; their AND is every rule the packet matches, whatever the masks, ranges
or number of maps. The fields' tables (segment trees over elementary intervals,
IPv4 byte tables) are in :mod:`npusim.fieldindex`.

First match with Cisco's deny ("not via this map", RFC 4301 §4.4.1 ordering
per map) is three big-int operations, not a loop over maps: with ``R`` the
bits of every rule (the spare bit after each map is 0), ``P`` the matched
permits and ``D`` the matched denies, ``R + D`` carries from each map's first
matched deny up to its spare bit, clearing the rest of that map, so ``P & (R +
D)`` are the permits no earlier deny of their map hides, and its lowest bit
decides. A packet whose ports were cut off matches on protocol and addresses
only, and a rule that needs ports is then terminal like a permit (it drops).

The elementary-interval numbers (the byte classes for a byte-table field)
key a bounded memo of the outcome: the steady per-packet cost is the
parse, one ``bisect`` per field (O(log intervals)) and one dict probe, whatever
the masks, ranges, denies or number of maps; a new key costs the bit-vector
work, bounded by the tree height (at most 17 ORs per field) and the int length
(rules / 30 machine words per operation). The deny counts of an outcome with
many denying maps are kept as a bit mask and added to the maps' counters when
``counters`` is read.

The same index answers the inbound check (RFC 4301 §5.2) per packet
(:meth:`Classifier.permits_reply`) or once per SA (:meth:`Classifier.covers_reply`:
every cell an SA's selectors span is protected by its map).

Counters: ``counters[map_name]`` has ``protect`` and ``deny`` (a deny line of
that map matched); ``counters[GLOBAL]`` has ``bypass``, ``bypass_ike_esp``,
``drop`` and one entry per drop reason.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Final

from npusim.acl import ANY_FAMILY, ANY_PROTOCOL, Acl, Rule
from npusim.counters import GLOBAL, zero
from npusim.fieldindex import _CUT, _OPAQUE, _bits, _classes, _Family, _positions
from npusim.packet import (
    ALL_DROP_REASONS,
    DROP_TRUNCATED_L4,
    PORT_PROTOCOLS,
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

# Outcomes remembered (a full memo is folded and cleared, see _remember)
_MEMO_MAX: Final = 65536
# An outcome with more denying maps than this adds them to the counters in bulk, later
_BULK_DENIES: Final = 8
# Cells (products of elementary intervals) covers_reply looks at before it gives
# up and answers False (the SA-flow table then checks each packet)
_COVER_CELLS: Final = 64
_V6_LINK_LOCAL: Final = (0xFE80 << 112, (0xFEC0 << 112) - 1)  # fe80::/10
_V6_MULTICAST: Final = (0xFF << 120, (1 << 128) - 1)  # ff00::/8

Box = tuple[int, int, int, int, int, int, int, int, int, int]
"""Packets as an SA's selectors admit them (one source and one destination
selector): (version, protocol or 0 for any, source first, last, destination
first, last, source port first, last, destination port first, last)."""


class _Outcome:
    """What one key (protocol and field classes) decides: the verdict, the counters
    it bumps, and the maps whose deny came first (a tuple of their counters, or
    with many, ``deny_bits`` and ``hits`` not yet added: see Classifier._fold)."""

    __slots__ = ("count", "denies", "deny_bits", "hits", "verdict")

    def __init__(
        self,
        verdict: Verdict,
        count: tuple[tuple[dict[str, int], str], ...],
        denies: tuple[dict[str, int], ...] | None,
        deny_bits: int,
    ) -> None:
        self.verdict = verdict
        self.count = count
        self.denies = denies
        self.deny_bits = deny_bits
        self.hits = 0


_Key = tuple[int, int, int, int, int, int]


class Classifier:
    """Compiled crypto-map set; :meth:`classify` is the per-packet call."""

    def __init__(self, crypto_maps: Sequence[CryptoMap]) -> None:
        names = [m.name for m in crypto_maps]
        if GLOBAL in names:
            raise ValueError(f"crypto map name {GLOBAL!r} is reserved for global counters")
        if len(set(names)) != len(names):
            raise ValueError("crypto map names must be unique")
        self.crypto_maps: tuple[CryptoMap, ...] = tuple(crypto_maps)
        self._memo: dict[_Key, _Outcome] = {}
        self._unfolded: dict[_Outcome, None] = {}
        self._counters: dict[str, dict[str, int]] = {
            m.name: {"protect": 0, "deny": 0} for m in self.crypto_maps
        }
        self._counters[GLOBAL] = self._global = dict.fromkeys(
            ("bypass", "bypass_ike_esp", "drop", *_CLASSIFIER_DROPS), 0
        )
        # Bit layout: the rules of each map in line order, then one spare bit that
        # no rule uses (it stops the carry of R + D, see the module docstring).
        # Per bit: the Protect verdict (None for deny or spare) and the map's counters.
        self._verdicts: list[Protect | None] = []
        self._map_counters: list[dict[str, int]] = []
        rules: list[tuple[int, Rule]] = []
        permits: list[int] = []
        needs_ports: list[int] = []
        for cmap in self.crypto_maps:
            counters = self._counters[cmap.name]
            for rule in cmap.acl.rules:
                position = len(self._verdicts)
                rules.append((position, rule))
                if rule.permit:
                    permits.append(position)
                if rule.needs_ports:
                    needs_ports.append(position)
                self._verdicts.append(Protect(cmap, rule) if rule.permit else None)
                self._map_counters.append(counters)
            self._verdicts.append(None)
            self._map_counters.append(counters)
        self._runs = _bits([p for p, _ in rules])
        self._permits = _bits(permits)
        self._needs_ports = _bits(needs_ports)
        self._families = {
            v: _Family([(p, r) for p, r in rules if r.version in (ANY_FAMILY, v)], v)
            for v in (4, 6)
        }
        g = self._global
        self._bypass: tuple[tuple[dict[str, int], str], ...] = ((g, "bypass"),)
        self._drop_cut: tuple[tuple[dict[str, int], str], ...] = (
            (g, "drop"),
            (g, DROP_TRUNCATED_L4),
        )
        # Peer addresses as ints per family, for the IKE/ESP exemption.
        peers: dict[int, set[int]] = {4: set(), 6: set()}
        for cmap in self.crypto_maps:
            for peer in cmap.peers:
                ip = ipaddress.ip_address(peer)
                peers[ip.version].add(int(ip))
        self._peers: dict[int, frozenset[int]] = {v: frozenset(s) for v, s in peers.items()}
        self._peer_list = {v: sorted(s) for v, s in peers.items()}

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
        # (inlined _key: this is the per-packet hot path)
        fam = self._families[version]
        if pstate == PORTS_OK:
            sp = fam.sport.find(sport)
            dp = fam.dport.find(dport)
        else:
            sp = dp = _CUT if pstate == PORTS_TRUNCATED else _OPAQUE
        key = (
            version,
            proto if proto in fam.protocols else ANY_PROTOCOL,
            fam.src.find(src),
            fam.dst.find(dst),
            sp,
            dp,
        )
        outcome = self._memo.get(key)
        if outcome is None:
            outcome = self._outcome(key)
        denies = outcome.denies
        if denies is None:
            outcome.hits += 1
            self._unfolded[outcome] = None
        else:
            for counters in denies:
                counters["deny"] += 1
        for counters, name in outcome.count:
            counters[name] += 1
        return outcome.verdict

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
        table counts the verdict. The same memo and bounds as :meth:`classify`."""
        src, dst, sport, dport = dst, src, dport, sport
        if version == 6 and _link_scoped(src, dst):
            return False
        if proto in _CONTROL_PROTOCOLS and self._is_control(
            version, proto, src, dst, sport, dport, pstate
        ):
            return False  # the reply would bypass: never via a tunnel
        key = self._key(version, proto, src, dst, sport, dport, pstate)
        outcome = self._memo.get(key)
        if outcome is None:
            outcome = self._outcome(key)
        verdict = outcome.verdict
        return isinstance(verdict, Protect) and verdict.crypto_map.name == name

    def covers_reply(self, name: str, boxes: Sequence[Box]) -> bool:
        """Whether :meth:`permits_reply` is True for every packet inside ``boxes``
        (what an SA's selectors admit), decrypted from map ``name``: then the SA's
        selectors alone decide (RFC 4301 §5.2) and the per-packet ACL check can be
        skipped. Exact on the cells it looks at (every combination of the fields'
        elementary intervals inside a box, every protocol class, and the packets
        without visible ports where the selectors admit them); False, the safe
        answer, when the boxes span more than _COVER_CELLS cells, an IPv4 wildcard
        field a range of more addresses, or may hold a packet that permits_reply
        refuses before the ACL (IKE/ESP of a peer, IPv6 link scope)."""
        budget = _COVER_CELLS
        for box in boxes:
            cells = self._cells(box, budget)
            if cells is None:
                return False
            budget -= len(cells)
            for key in cells:
                outcome = self._memo.get(key) or self._outcome(key)
                verdict = outcome.verdict
                if not (isinstance(verdict, Protect) and verdict.crypto_map.name == name):
                    return False
        return True

    def _cells(self, box: Box, budget: int) -> list[_Key] | None:
        """The memo keys of the replies to the packets in ``box``, or None."""
        version, protocol, slo, shi, dlo, dhi, splo, sphi, dplo, dphi = box
        # The reply: addresses and ports swapped.
        slo, shi, dlo, dhi = dlo, dhi, slo, shi
        splo, sphi, dplo, dphi = dplo, dphi, splo, sphi
        if protocol in (0, PROTO_UDP, PROTO_ESP):
            peers = self._peer_list[version]
            for lo, hi in ((slo, shi), (dlo, dhi)):
                at = bisect_left(peers, lo)
                if at < len(peers) and peers[at] <= hi:
                    return None  # the IKE/ESP exemption may apply
        if version == 6 and (
            _overlaps(slo, shi, *_V6_LINK_LOCAL) or slo == 0 or _overlaps(dlo, dhi, *_V6_MULTICAST)
        ):
            return None
        fam = self._families[version]
        src = _classes(fam.src, slo, shi, budget)
        dst = _classes(fam.dst, dlo, dhi, budget)
        if src is None or dst is None or len(src) * len(dst) > budget:
            return None
        if protocol == 0:
            protocols = [*fam.protocols, ANY_PROTOCOL]
        else:
            protocols = [protocol if protocol in fam.protocols else ANY_PROTOCOL]
        ports: list[tuple[int, int]] = [(_OPAQUE, _OPAQUE)]
        sports = _classes(fam.sport, splo, sphi, budget)
        dports = _classes(fam.dport, dplo, dphi, budget)
        if sports is None or dports is None:
            return None
        visible = [(sp, dp) for sp in sports for dp in dports]
        if splo == dplo == 0 and sphi == dphi == 65535:
            # ports unknown pass a selector only when it has no port range
            visible += [(_OPAQUE, _OPAQUE), (_CUT, _CUT)]
        cells: list[_Key] = []
        for p in protocols:
            # ("ip" rules, the only ones of the other-protocol class, have no
            # port conditions: one port cell stands for all)
            for sp, dp in visible if p in PORT_PROTOCOLS else ports:
                for s in src:
                    for d in dst:
                        cells.append((version, p, s, d, sp, dp))
                        if len(cells) > budget:
                            return None
        return cells

    def clear_counters(self) -> None:
        """Zero every counter (the dicts stay the same objects)."""
        for outcome in self._unfolded:
            outcome.hits = 0
        self._unfolded.clear()
        zero(self._counters)

    def _key(
        self, version: int, proto: int, src: int, dst: int, sport: int, dport: int, pstate: int
    ) -> _Key:
        """The memo key: the packet's protocol (if some rule names it) and the class
        of each field's value (its elementary interval, or the address itself)."""
        fam = self._families[version]
        if pstate == PORTS_OK:
            sp = fam.sport.find(sport)
            dp = fam.dport.find(dport)
        else:
            sp = dp = _CUT if pstate == PORTS_TRUNCATED else _OPAQUE
        return (
            version,
            proto if proto in fam.protocols else ANY_PROTOCOL,
            fam.src.find(src),
            fam.dst.find(dst),
            sp,
            dp,
        )

    def _outcome(self, key: _Key) -> _Outcome:
        """Compute and remember what ``key`` decides (nothing counted). Bounded: a
        few ANDs per field, a tree walk per interval field, three big-int operations
        for first match per map (see the module docstring)."""
        version, protocol, s, d, sp, dp = key
        fam = self._families[version]
        matched = fam.protocols.get(protocol, fam.any_protocol)
        matched &= fam.src.bits(s) & fam.dst.bits(d)
        if sp == _CUT:
            # RFC 4301 §5.1: ports unknown; a rule that needs them and comes
            # first (before any permit) decides: drop.
            terminal = matched & (self._permits | self._needs_ports)
        else:
            matched &= fam.sport.bits(sp) & fam.dport.bits(dp)
            terminal = matched & self._permits
        runs = self._runs
        deny = matched ^ terminal
        # Each map's first matched deny carries to its spare bit: the terminal
        # rules left are those before their map's first deny.
        valid = terminal & (runs + deny)
        # The lowest matched rule of each map (R + M clears all but later ones).
        first = matched ^ (matched & (runs + matched))
        count = self._bypass
        verdict: Verdict = BYPASS
        if valid:
            lowest = valid & -valid
            first &= lowest - 1  # only the maps before the deciding one
            if lowest & self._needs_ports and sp == _CUT:
                verdict = _DROPS[DROP_TRUNCATED_L4]
                count = self._drop_cut
            else:
                protect = self._verdicts[lowest.bit_length() - 1]
                assert protect is not None
                verdict = protect
                count = ((self._map_counters[lowest.bit_length() - 1], "protect"),)
        denied = first & deny
        denies: tuple[dict[str, int], ...] | None = None
        if denied.bit_count() <= _BULK_DENIES:
            denies = tuple(self._map_counters[p] for p in _positions(denied))
        outcome = _Outcome(verdict, count, denies, denied)
        self._remember(key, outcome)
        return outcome

    def _remember(self, key: _Key, outcome: _Outcome) -> None:
        if len(self._memo) >= _MEMO_MAX:
            self._fold()
            self._memo.clear()
        self._memo[key] = outcome

    def _fold(self) -> None:
        """Add the deny counts kept in bulk to the maps' counters."""
        for outcome in self._unfolded:
            for p in _positions(outcome.deny_bits):
                self._map_counters[p]["deny"] += outcome.hits
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


def _overlaps(lo: int, hi: int, first: int, last: int) -> bool:
    return lo <= last and first <= hi


def _link_scoped(src: int, dst: int) -> bool:
    # fe80::/10 link-local or :: unspecified source; ff01::/16 or ff02::/16
    # (any flags) interface-/link-local multicast destination.
    return src >> 118 == 0x3FA or src == 0 or (dst >> 120 == 0xFF and (dst >> 112) & 0xF in (1, 2))
