"""Per-SA counters and lifetime status.

The SA only counts and compares; it never reads a clock. The caller passes ``now``
(whatever monotonic clock it uses for ``created``) to :meth:`Lifetime.status`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["DROP_REASONS", "Drops", "Lifetime", "LifetimeStatus", "SaCounters"]

#: Every drop counter name an :class:`esp.errors.EspError` subclass may name.
DROP_REASONS: tuple[str, ...] = (
    "malformed",
    "truncated",
    "bad_padding",
    "replayed",
    "icv_failed",
    "unknown_spi",
    "dummy",
    "seq_exhausted",
)


class Drops(dict[str, int]):
    """Drop counts by reason: a reason never counted reads 0 and is not stored
    (one with every reason is 272 bytes, one with a single reason 232)."""

    __slots__ = ()

    def __missing__(self, reason: str) -> int:
        return 0


class SaCounters:
    """Packets and payload bytes that passed, and the drops by reason
    (``drops[reason]`` reads 0 for every reason in :data:`DROP_REASONS` not yet seen).

    The drop counts are a :class:`Drops` made on the first drop: most SAs never drop
    one, and an empty dict is 64 bytes per SA (10,000s on a responder). Reading them
    makes nothing; :meth:`count_drop` counts.
    """

    __slots__ = ("_drops", "bytes", "packets")

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self._drops: Drops | None = None

    @property
    def drops(self) -> Mapping[str, int]:
        """The drop counts by reason, read only (count with :meth:`count_drop`)."""
        return _NO_DROPS if self._drops is None else MappingProxyType(self._drops)

    @drops.setter
    def drops(self, value: Mapping[str, int]) -> None:
        # e.g. counts copied from a data-path worker as a plain dict
        self._drops = Drops(value) if value else None

    def count_drop(self, reason: str, n: int = 1) -> None:
        """``n`` more packets dropped for ``reason`` (one of :data:`DROP_REASONS`)."""
        drops = self._drops
        if drops is None:
            drops = self._drops = Drops()
        drops[reason] += n

    def as_dict(self) -> dict[str, int]:
        """Flat snapshot, e.g. for the control API's JSON output (every drop reason)."""
        out = {"packets": self.packets, "bytes": self.bytes}
        out.update(dict.fromkeys(DROP_REASONS, 0))
        out.update(self.drops)
        return out

    def __repr__(self) -> str:
        dropped = {k: v for k, v in self.drops.items() if v}
        return f"SaCounters(packets={self.packets}, bytes={self.bytes}, drops={dropped})"


# What an SA that never dropped a packet reads (shared; read only)
_NO_DROPS: Mapping[str, int] = MappingProxyType(Drops())


@dataclass(frozen=True, slots=True)
class LifetimeStatus:
    """Which limits are reached: names from ``{"packets", "bytes", "seconds", "seq"}``."""

    soft: frozenset[str]
    hard: frozenset[str]

    @property
    def soft_expired(self) -> bool:
        """True once any soft limit is reached (time to rekey, RFC 4301 §4.4.2.1)."""
        return bool(self.soft)

    @property
    def hard_expired(self) -> bool:
        """True once any hard limit is reached (the SA must go)."""
        return bool(self.hard)


@dataclass(frozen=True, slots=True)
class Lifetime:
    """Soft and hard limits of one SA; ``None`` means no limit of that kind."""

    soft_packets: int | None = None
    hard_packets: int | None = None
    soft_bytes: int | None = None
    hard_bytes: int | None = None
    soft_seconds: float | None = None
    hard_seconds: float | None = None

    def status(
        self,
        counters: SaCounters,
        age: float,
        seq: int,
        soft_seq: int,
        hard_seq: int,
    ) -> LifetimeStatus:
        """Compare counters, ``age`` (seconds) and the sequence number with the limits."""
        soft: set[str] = set()
        hard: set[str] = set()
        for name, value, soft_limit, hard_limit in (
            ("packets", counters.packets, self.soft_packets, self.hard_packets),
            ("bytes", counters.bytes, self.soft_bytes, self.hard_bytes),
            ("seconds", age, self.soft_seconds, self.hard_seconds),
            ("seq", seq, soft_seq, hard_seq),
        ):
            if soft_limit is not None and value >= soft_limit:
                soft.add(name)
            if hard_limit is not None and value >= hard_limit:
                hard.add(name)
                # A hard limit implies the soft one, even if no soft limit was set.
                soft.add(name)
        return LifetimeStatus(frozenset(soft), frozenset(hard))
