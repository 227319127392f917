"""The classifier's per-field index: which rules a packet's field values satisfy.

Per address family (:class:`_Family`), each field (protocol, source and
destination address, source and destination port) maps a packet's value to a
class, and a class to the int of the rules whose condition on that field holds
(one bit a rule, in the global order of :mod:`npusim.classifier`). A prefix or
port range is an interval: a field's interval ends, sorted, cut it into
elementary intervals (one ``bisect``), and a segment tree over them gives an
interval's rule bits with at most one OR per tree level. An IPv4 field with a
non-contiguous wildcard is four byte tables instead (a rule holds for an
address when it holds for each byte: one AND per byte).

Memory: one int per segment-tree node, the size of the span of its rules; a
byte-table field at most 1,024 ints of rules / 8 bytes.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from functools import partial
from typing import Final

from npusim.acl import ANY_PROTOCOL, PortRanges, Rule

# Port class of a packet whose ports are not visible (a non-first fragment, RFC
# 4301 §7: only rules without port conditions can match) and of one whose TCP/UDP
# header was cut short (ports ignored; a rule that needs them drops it).
_OPAQUE: Final = -1
_CUT: Final = -2


def _bits(positions: Sequence[int]) -> int:
    """The int with exactly these bits set, in O(len + max / 8) (no int per bit)."""
    if not positions:
        return 0
    buf = bytearray((max(positions) >> 3) + 1)
    for p in positions:
        buf[p >> 3] |= 1 << (p & 7)
    return int.from_bytes(buf, "little")


def _positions(bits: int) -> list[int]:
    """The set bits of ``bits``, lowest first, in one pass over its binary text."""
    text = format(bits, "b")[::-1]
    found: list[int] = []
    at = text.find("1")
    while at >= 0:
        found.append(at)
        at = text.find("1", at + 1)
    return found


class _Intervals:
    """One field whose conditions are ranges (ports; addresses under prefixes).

    ``find(value)`` is the value's elementary interval (the ranges' ends cut the
    field); ``bits(interval)`` the rules whose ranges contain it: the rules
    without a condition, ORed with the nodes of a segment tree on the path from
    the interval's leaf to the root (a range is stored in the O(log n) nodes that
    tile it). A node keeps its rules as (lowest bit, bits shifted down) so a node
    of one rule of the ten-thousandth map is a small int, not a 20,000-bit one."""

    __slots__ = ("always", "find", "nodes", "size")

    def __init__(self, ranged: list[tuple[int, PortRanges]], always: list[int]) -> None:
        bounds = sorted({b for _, ranges in ranged for lo, hi in ranges for b in (lo, hi + 1)})
        size = 1
        while size < len(bounds) + 1:
            size <<= 1
        found: dict[int, list[int]] = {}
        for pos, ranges in ranged:
            for lo, hi in ranges:
                left = bisect_right(bounds, lo) + size
                right = bisect_right(bounds, hi) + size + 1
                while left < right:
                    if left & 1:
                        found.setdefault(left, []).append(pos)
                        left += 1
                    if right & 1:
                        right -= 1
                        found.setdefault(right, []).append(pos)
                    left >>= 1
                    right >>= 1
        self.nodes: dict[int, tuple[int, int]] = {}
        for node, positions in found.items():
            low = min(positions)
            self.nodes[node] = (low, _bits([p - low for p in positions]))
        self.always = _bits(always)
        self.size = size
        self.find: Callable[[int], int] = partial(bisect_right, bounds)

    def bits(self, interval: int) -> int:
        """Rules holding in ``interval``; _OPAQUE: those without a condition."""
        acc = self.always
        if interval < 0:
            return acc
        node = interval + self.size
        nodes = self.nodes
        while node:
            found = nodes.get(node)
            if found is not None:
                acc |= found[1] << found[0]
            node >>= 1
        return acc


class _ByteTables:
    """An IPv4 address field with a non-contiguous wildcard (Cisco allows any
    mask): no longer intervals, so one table per byte of the address; a rule
    holds when it holds for every byte (``a & mask == value`` bytewise). The
    bytes of a table with the same rules share a class, and ``find`` packs the
    four byte classes into one int (the memo key), so that addresses with the
    same rules share their memo entries."""

    __slots__ = ("find", "tables")

    def __init__(self, items: list[tuple[int, int, int]]) -> None:
        by_byte: list[list[list[int]]] = [[[] for _ in range(256)] for _ in range(4)]
        for k, table in enumerate(by_byte):
            shift = 24 - 8 * k
            groups: dict[tuple[int, int], list[int]] = {}
            for pos, value, mask in items:
                groups.setdefault(((mask >> shift) & 255, (value >> shift) & 255), []).append(pos)
            for (mask, value), positions in groups.items():
                for byte in (value,) if mask == 255 else range(256):
                    if byte & mask == value:
                        table[byte].extend(positions)
        classes: list[list[int]] = []
        self.tables: list[list[int]] = []  # per byte position: class -> rule bits
        for table in by_byte:
            ids: dict[int, int] = {}
            classes.append([ids.setdefault(_bits(ps), len(ids)) for ps in table])
            self.tables.append(list(ids))
        c0, c1, c2, c3 = classes
        self.find: Callable[[int], int] = partial(_byte_classes, c0, c1, c2, c3)

    def bits(self, key: int) -> int:
        t0, t1, t2, t3 = self.tables
        return t0[key >> 24] & t1[(key >> 16) & 255] & t2[(key >> 8) & 255] & t3[key & 255]


def _byte_classes(c0: list[int], c1: list[int], c2: list[int], c3: list[int], a: int) -> int:
    return c0[a >> 24] << 24 | c1[(a >> 16) & 255] << 16 | c2[(a >> 8) & 255] << 8 | c3[a & 255]


class _Family:
    """The fields of one address family over the rules that apply to it."""

    __slots__ = ("any_protocol", "dport", "dst", "protocols", "sport", "src")

    def __init__(self, rules: list[tuple[int, Rule]], version: int) -> None:
        by_protocol: dict[int, list[int]] = {}
        any_protocol: list[int] = []
        for position, rule in rules:
            if rule.protocol == ANY_PROTOCOL:
                any_protocol.append(position)
            else:
                by_protocol.setdefault(rule.protocol, []).append(position)
        self.any_protocol = _bits(any_protocol)
        # ("ip" rules join every protocol)
        self.protocols = {p: _bits(ps) | self.any_protocol for p, ps in by_protocol.items()}
        full = (1 << (32 if version == 4 else 128)) - 1
        self.src = _address_field([(p, r.src, r.src_mask) for p, r in rules], full)
        self.dst = _address_field([(p, r.dst, r.dst_mask) for p, r in rules], full)
        self.sport = _port_field([(p, r.src_ports) for p, r in rules])
        self.dport = _port_field([(p, r.dst_ports) for p, r in rules])


def _address_field(items: list[tuple[int, int, int]], full: int) -> _Intervals | _ByteTables:
    ranged: list[tuple[int, PortRanges]] = []
    always: list[int] = []
    for position, value, mask in items:
        free = ~mask & full
        if free & (free + 1):
            return _ByteTables(items)  # a non-contiguous wildcard (IPv4 only)
        if mask:
            ranged.append((position, ((value, value | free),)))
        else:
            always.append(position)
    return _Intervals(ranged, always)


def _port_field(items: list[tuple[int, PortRanges | None]]) -> _Intervals:
    # A condition that covers 0-65535 is still a condition: it needs visible ports.
    ranged = [(position, ranges) for position, ranges in items if ranges is not None]
    return _Intervals(ranged, [position for position, ranges in items if ranges is None])


def _classes(field: _Intervals | _ByteTables, lo: int, hi: int, budget: int) -> list[int] | None:
    """The classes of the values lo..hi of a field, or None if more than budget."""
    if isinstance(field, _ByteTables):
        if hi - lo >= budget:
            return None
        return list(dict.fromkeys(field.find(a) for a in range(lo, hi + 1)))
    first = field.find(lo)
    last = field.find(hi)
    return list(range(first, last + 1)) if last - first < budget else None
