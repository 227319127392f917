"""Deadlines by key in a binary heap: the next one in O(1), a change in O(log n).

The engine keeps one deadline per IKE SA here (the earliest of its
retransmissions, lifetimes and half-open limit), the daemon's manager one per
piece of periodic work. Nothing is swept: a timer event costs the same with 10
or 10,000 SAs.

An entry is a (deadline, key) pair: keys due at the same time are ordered by
the keys themselves (``<``), so keys must be orderable (the engine's IkeSA
orders by name, the manager's are tuples of str or int). A tie-break counter
would keep first-set-first-out, at the price of an int and a wider tuple per
entry (40 bytes; three entries per peer at 10,000 peers).

Changing or cancelling a deadline does not search the heap: the old entry
stays and is skipped when it surfaces (``_when`` says which entry is current).
The heap is rebuilt when stale entries exceed half the live ones, so its size
stays within 1.5 times the number of keys (an entry is ~100 bytes; an IKE SA
whose deadline moves once after it is up, e.g. the manager's rekey jitter, would
otherwise keep a stale entry for its whole life). Each rebuild is O(n) after at
least n/2 changes: O(1) per change, amortised.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class TimerHeap(Generic[K]):
    """At most one deadline per key; ``None`` means none."""

    __slots__ = ("_heap", "_when")

    def __init__(self) -> None:
        self._heap: list[tuple[float, K]] = []
        self._when: dict[K, float] = {}

    def __len__(self) -> int:
        return len(self._when)

    def __contains__(self, key: object) -> bool:
        return key in self._when

    def __iter__(self) -> Iterator[K]:
        return iter(self._when)

    def get(self, key: K) -> float | None:
        return self._when.get(key)

    def set(self, key: K, when: float | None) -> None:
        """Give ``key`` the deadline ``when`` (replacing its old one; None: cancel)."""
        if when is None:
            self._when.pop(key, None)
            return
        if self._when.get(key) == when:
            return
        self._when[key] = when
        heapq.heappush(self._heap, (when, key))
        if len(self._heap) > len(self._when) * 3 // 2 + 64:
            self._compact()

    def cancel(self, key: K) -> None:
        self._when.pop(key, None)

    def next(self) -> float | None:
        """The earliest deadline, or None (stale entries on top are dropped)."""
        heap, when = self._heap, self._when
        while heap:
            t, key = heap[0]
            if when.get(key) == t:
                return t
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float) -> list[K]:
        """The keys whose deadline is ``now`` or earlier, earliest first; their
        deadlines are removed (whoever handles them sets the next one)."""
        return [key for key, _ in self._pop_due(now)]

    def due(self, now: float) -> list[K]:
        """The keys due at ``now``, earliest first, keeping their deadlines."""
        entries = self._pop_due(now)
        for key, t in entries:
            self.set(key, t)
        return [key for key, _ in entries]

    def _pop_due(self, now: float) -> list[tuple[K, float]]:
        heap, when = self._heap, self._when
        out: list[tuple[K, float]] = []
        while heap and heap[0][0] <= now:
            t, key = heapq.heappop(heap)
            if when.get(key) == t:
                del when[key]  # a duplicate entry (same key, same time) is now stale
                out.append((key, t))
        return out

    def _compact(self) -> None:
        when = self._when
        self._heap = [e for e in self._heap if when.get(e[1]) == e[0]]
        heapq.heapify(self._heap)
