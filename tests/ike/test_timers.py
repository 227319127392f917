"""ike.timers.TimerHeap: the next deadline, changes and cancellations without a sweep."""

from __future__ import annotations

from ike.timers import TimerHeap


def test_next_is_the_earliest_live_deadline() -> None:
    h: TimerHeap[str] = TimerHeap()
    assert h.next() is None
    h.set("a", 5.0)
    h.set("b", 3.0)
    h.set("c", 4.0)
    assert h.next() == 3.0
    h.set("b", 9.0)  # moved later: its old entry is stale
    assert h.next() == 4.0
    h.cancel("c")
    assert h.next() == 5.0
    h.set("a", None)
    assert h.next() == 9.0 and len(h) == 1 and "b" in h and h.get("b") == 9.0


def test_pop_due_takes_each_key_once_in_time_order() -> None:
    h: TimerHeap[str] = TimerHeap()
    h.set("a", 2.0)
    h.set("b", 1.0)
    h.set("a", 3.0)
    h.set("a", 2.0)  # back to a time that has a stale entry: still one key
    h.set("c", 7.0)
    assert h.pop_due(5.0) == ["b", "a"]
    assert h.pop_due(5.0) == []
    assert h.next() == 7.0 and list(h) == ["c"]


def test_due_keeps_the_deadlines() -> None:
    h: TimerHeap[int] = TimerHeap()
    for k in range(5):
        h.set(k, float(k))
    assert h.due(2.0) == [0, 1, 2]
    assert h.next() == 0.0 and len(h) == 5
    assert h.pop_due(2.0) == [0, 1, 2]


def test_stale_entries_are_bounded() -> None:
    """Moving one deadline many times does not grow the heap without limit."""
    h: TimerHeap[str] = TimerHeap()
    for i in range(10_000):
        h.set("k", float(i))
    assert len(h._heap) <= 2 * len(h) + 65
    assert h.next() == 9999.0


def test_one_stale_entry_per_key_is_compacted() -> None:
    """Each of many keys moved once (as the manager moves each new IKE SA's rekey
    deadline): the stale entries do not stay, the heap stays within 1.5x the keys."""
    h: TimerHeap[int] = TimerHeap()
    for k in range(1000):
        h.set(k, 100.0 + k)
        h.set(k, 50.0 + k)
    assert len(h) == 1000
    assert len(h._heap) <= 1000 * 3 // 2 + 65
    assert h.pop_due(50.0 + 999) == list(range(1000))
    assert h.next() is None


def test_keys_due_at_the_same_time_come_out_in_key_order() -> None:
    """Ties are ordered by the keys (no tie-break counter per entry): whatever the
    order they were set in, and with a stale entry at the same time in between."""
    h: TimerHeap[tuple[str, str]] = TimerHeap()
    h.set(("volume", "b"), 5.0)
    h.set(("liveness", "z"), 5.0)
    h.set(("volume", "a"), 5.0)
    h.set(("liveness", "z"), 6.0)
    h.set(("liveness", "z"), 5.0)
    assert h.pop_due(5.0) == [("liveness", "z"), ("volume", "a"), ("volume", "b")]
    assert h.next() is None
