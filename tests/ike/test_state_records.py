"""ike.state's per-SA containers that hold their common case in slots: Children (an
IKE SA's Child SAs by ID) and SaCounters (its counters) read as the dicts they replace."""

from __future__ import annotations

import pytest

from ike.state import Children, ChildSA, SaCounters


def child(child_id: int) -> ChildSA:
    return ChildSA(child_id, 0x1000 + child_id, 0x2000 + child_id, b"k", b"k",
                   "tunnel", False, 256, [], [], 0.0)  # fmt: skip


def test_behaves_as_a_dict_through_one_two_and_back() -> None:
    c1, c2, c3 = child(1), child(2), child(3)
    kids = Children()
    ref: dict[int, ChildSA] = {}
    assert not kids and len(kids) == 0 and list(kids) == [] and 1 not in kids
    for k, c in ((1, c1), (2, c2), (3, c3)):
        kids[k] = ref[k] = c
        assert kids == ref and list(kids.values()) == list(ref.values())
    del kids[1], ref[1]  # a rekey's old Child SA goes: 2 and 3 stay, in that order
    assert kids == ref and list(kids) == [2, 3] and kids.get(1) is None
    del kids[2], ref[2]
    assert kids == ref and list(kids.items()) == [(3, c3)] and kids[3] is c3 and 3 in kids
    kids[1] = ref[1] = c1  # a second one again: after the first
    assert list(kids) == list(ref) == [3, 1]
    assert kids.pop(3) is c3 and list(kids.values()) == [c1]
    with pytest.raises(KeyError):
        del kids[3]
    with pytest.raises(KeyError):
        kids[3]
    kids[1] = c1  # the same key again replaces, it does not add
    assert len(kids) == 1
    kids.clear()
    assert not kids and list(kids.values()) == []


def test_counters_read_as_a_dict() -> None:
    """The same counts as a dict; requests, responses, decrypted first, then the
    others in the order first counted."""
    counts = SaCounters()
    ref: dict[str, int] = {}
    assert counts == ref and len(counts) == 0 and "requests" not in counts
    for what in ("decrypted", "liveness_ok", "requests", "decrypted", "responses", "gave_up"):
        counts.add(what)
        ref[what] = ref.get(what, 0) + 1
        assert counts == ref and len(counts) == len(ref) and dict(counts) == ref
    assert list(counts) == ["requests", "responses", "decrypted", "liveness_ok", "gave_up"]
    assert counts["decrypted"] == 2 and counts.get("bad_msg_id", 0) == 0
    with pytest.raises(KeyError):
        counts["bad_msg_id"]
