"""A crypto map's Child SA records (``MapState.children``): found by IKE SA and id,
oldest first, and what a record reads from its ESP SAs."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import esp
from ipsecmgr.records import ChildRecord, MapState

KEY = bytes(range(36))  # AES-256 key ‖ salt


def record(ike_name: str, child_id: int, spi: int, **options: Any) -> ChildRecord:
    return ChildRecord(
        ike_name,
        child_id,
        esp.InboundSA(spi, KEY, **options),
        esp.OutboundSA(spi + 1, KEY, **options),
        10.0,
        [],
        [],
        KEY,
        KEY,
    )


def state() -> MapState:
    # The children need neither the map's configuration nor its IKE config
    return MapState(None, None)  # type: ignore[arg-type]


def test_child_ids_are_per_ike_sa() -> None:
    """Two IKE SAs of one map (INITIAL_CONTACT replacing one) both have child 1."""
    s = state()
    old, new = record("m-aa", 1, 0x1000), record("m-bb", 1, 0x2000)
    s.add_child(old)
    s.add_child(new)
    assert s.child("m-aa", 1) is old and s.child("m-bb", 1) is new
    assert s.child("m-aa", 2) is None and s.child("m-cc", 1) is None
    assert s.children_of("m-bb") == [new]


def test_a_rekey_has_two_children_oldest_first() -> None:
    """Make-before-break (RFC 7296 §2.8): the new Child SA is the last one; removing
    the old one leaves it alone, removing an unknown one changes nothing."""
    s = state()
    old, new = record("m-aa", 1, 0x1000), record("m-aa", 2, 0x2000)
    s.add_child(old)
    s.add_child(new)
    assert s.children == (old, new) and s.children[-1] is new
    assert s.pop_child("m-aa", 3) is None and s.children == (old, new)
    assert s.pop_child("m-aa", 1) is old
    assert s.children == (new,) and s.child("m-aa", 1) is None
    assert s.pop_child("m-aa", 2) is new and not s.children


def test_mode_esn_and_key_size_are_the_esp_sas() -> None:
    rec = record("m-aa", 1, 0x1000, mode="transport", esn=True)
    assert (rec.mode, rec.esn, rec.key_bits) == ("transport", True, 256)
    assert KEY.hex() not in repr(rec)  # the keys stay out of repr


def test_maps_order_by_name() -> None:
    """Maps whose deadlines tie in the Manager's timer heap are compared (ike.timers
    may order entries by key): by their names, never by address."""

    def named(name: str) -> MapState:
        return MapState(SimpleNamespace(name=name), None)  # type: ignore[arg-type]

    b, a, c = named("b"), named("a"), named("c")
    assert sorted([b, c, a]) == [a, b, c]
    assert a < b and not b < a
