"""SA lifetime policy (ike.lifetimes): the engine alone rekeys and deletes.

Two engines in memory with a fake clock (``pair.Pair``) and a deterministic
jitter source. Times on the wire are read from the IKE header of each request
(exchange type at octet 18, the R flag 0x20 at octet 19, RFC 7296 §3.1).
Lifetime 100 s; the original initiator's soft share is 90 %, the responder's
93 %; with ``jitter() = 0.5`` and ``rekey_jitter = 0.05``, 2.5 % comes off
(RFC 7296 §2.8: rekey earlier by a random share), so 87.5 s and 90.5 s.

    CREATE_CHILD_SA { N(REKEY_SA), SA, Ni, TSi, TSr }  -->    (87.5, initiator)
                          <--  CREATE_CHILD_SA { SA, Nr, TSi, TSr }
    INFORMATIONAL { D(ESP, old) }  -->  <--  INFORMATIONAL { D(ESP, old) }
"""

from __future__ import annotations

from collections.abc import Callable

from ike.constants import DhGroup, ExchangeType
from ike.events import (
    ChildSaDeleted,
    ChildSaInstalled,
    ExchangeFailed,
    IkeEvent,
    IkeSaDeleted,
    LifetimeExpired,
)
from ike.lifetimes import ChildUsage
from ike.sa import IkeSA

from .pair import Pair, configs

CREATE_CHILD_SA = ExchangeType.CREATE_CHILD_SA
INFORMATIONAL = ExchangeType.INFORMATIONAL


def half() -> float:
    return 0.5


def requests(p: Pair, direction: str, exchange: int) -> list[float]:
    """When ``direction`` ("i>r"/"r>i") sent a request of ``exchange``."""
    return [
        t
        for d, t, data in p.wire
        if d == direction and data[18] == exchange and not data[19] & 0x20
    ]


def up(jitter: Callable[[], float] = half, **kw: object) -> Pair:
    p = Pair(*configs(jitter=jitter, **kw))
    p.handshake()
    assert p.i.established and p.r.established
    return p


class Counted:
    """The data path's counts per (IKE SA name, child id), as the daemon reports them."""

    def __init__(self) -> None:
        self.packets: dict[tuple[str, int], int] = {}
        self.seq_soft = False
        self.asked = 0

    def __call__(self, name: str, child_id: int, now: float) -> ChildUsage | None:
        self.asked += 1
        n = self.packets.get((name, child_id), 0)
        return ChildUsage(n, 40 * n, self.seq_soft)


def lifetime_events(events: list[IkeEvent]) -> list[tuple[int | None, bool, str, str]]:
    return [
        (e.child_id, e.hard, e.limits, e.action) for e in events if isinstance(e, LifetimeExpired)
    ]


def test_soft_lifetime_with_jitter_rekeys_once_per_generation() -> None:
    draws: list[float] = []

    def jitter() -> float:
        draws.append(0.5)
        return 0.5

    p = up(jitter, child_lifetime=100.0, ike_lifetime=0.0)
    p.advance(87.4)
    assert requests(p, "i>r", CREATE_CHILD_SA) == []
    p.advance(175.0 - 0.1)
    # One rekey of generation 1, by the initiator only (the responder's copy, due at
    # 90.5, was replaced first); generation 2 (installed at 87.5) is not due yet
    assert requests(p, "i>r", CREATE_CHILD_SA) == [87.5]
    assert requests(p, "r>i", CREATE_CHILD_SA) == []
    assert lifetime_events(p.i_events) == [(1, False, "seconds", "rekey")]
    assert list(p.i.children) == list(p.r.children) == [2]
    p.advance(175.0)
    assert requests(p, "i>r", CREATE_CHILD_SA) == [87.5, 175.0]  # the next generation's
    assert p.i.counters["child_rekey_timer"] == 2 and "child_rekey_timer" not in p.r.counters
    # One draw per Child SA: 2 at IKE_AUTH (both sides) + 2 per rekey
    assert len(draws) == 6


def test_jitter_source_moves_the_soft_lifetime() -> None:
    """jitter() = 0: exactly 90 %; jitter() near 1: up to 5 % earlier (85 s)."""
    for value, due in ((0.0, 90.0), (0.999, 85.005)):
        p = up(lambda v=value: v, child_lifetime=100.0, ike_lifetime=0.0)
        p.advance(due - 0.01)
        assert requests(p, "i>r", CREATE_CHILD_SA) == []
        p.advance(due)
        assert requests(p, "i>r", CREATE_CHILD_SA) == [due]


def test_ike_sa_soft_lifetime_rekeys_with_jitter_and_hard_lifetime_deletes() -> None:
    p = up(ike_lifetime=200.0, child_lifetime=0.0)
    p.advance(175.0)  # 200 × (90 % - 2.5 %)
    assert requests(p, "i>r", CREATE_CHILD_SA) == [175.0]
    assert lifetime_events(p.i_events) == [(None, False, "seconds", "rekey")]
    # Hard lifetime: the engine deletes an IKE SA that was not replaced in time
    # (here its next rekey, due at 350, is turned off to let it run there)
    p.i.ike_rekey_at = None
    p.r.ike_rekey_at = None
    p.advance(375.0)
    assert requests(p, "i>r", INFORMATIONAL)[-1:] == [375.0]
    assert lifetime_events(p.i_events)[-1] == (None, True, "seconds", "delete")
    assert p.i.dead and p.events_of("r", IkeSaDeleted)[0].reason == "deleted-by-peer"


def test_hard_lifetime_deletes_a_child_whose_rekey_failed() -> None:
    """The peer refuses the rekey (PFS group mismatch: NO_PROPOSAL_CHOSEN); the old
    Child SA stays in use until its hard lifetime, then the engine deletes it."""
    p = up(
        i_pfs_group=DhGroup.ECP_256,
        r_pfs_group=DhGroup.CURVE25519,
        i_child_lifetime=100.0,
        r_child_lifetime=0.0,
        ike_lifetime=0.0,
    )
    p.advance(99.9)
    assert requests(p, "i>r", CREATE_CHILD_SA) == [87.5]
    assert p.events_of("i", ExchangeFailed)[0].notify == "NO_PROPOSAL_CHOSEN"
    assert list(p.i.children) == list(p.r.children) == [1]  # still there
    p.advance(100.0)
    assert requests(p, "i>r", INFORMATIONAL) == [100.0]
    assert lifetime_events(p.i_events)[-1] == (1, True, "seconds", "delete")
    assert [e.child_id for e in p.events_of("r", ChildSaDeleted)] == [1]
    assert not p.i.children and not p.r.children and p.i.established


def test_rekey_lazy_skips_an_idle_child_and_deletes_it_at_the_hard_lifetime() -> None:
    p = up(child_lifetime=100.0, ike_lifetime=0.0, rekey_lazy=True)
    usage = Counted()
    p.i.usage = p.ep.usage = p.r.usage = usage
    p.advance(99.9)
    assert requests(p, "i>r", CREATE_CHILD_SA) == [] and usage.asked >= 1
    assert lifetime_events(p.i_events) == [(1, False, "seconds", "idle")]
    assert lifetime_events(p.r_events) == [(1, False, "seconds", "idle")]
    p.advance(100.0)
    assert lifetime_events(p.i_events)[-1] == (1, True, "seconds", "delete")
    assert not p.i.children and not p.r.children and p.i.established


def test_rekey_lazy_still_rekeys_a_child_that_carried_traffic() -> None:
    p = up(child_lifetime=100.0, ike_lifetime=0.0, rekey_lazy=True)
    usage = Counted()
    p.i.usage = usage
    usage.packets[(p.i.name, 1)] = 1
    p.advance(99.0)
    assert requests(p, "i>r", CREATE_CHILD_SA) == [87.5]


def test_volume_soft_limit_rekeys_once_and_the_timer_stands_down() -> None:
    # soft = int(100 × (90 % - 2.5 %)) = 87 packets
    p = up(child_lifetime=100.0, child_lifetime_packets=100, ike_lifetime=0.0)
    usage = Counted()
    p.i.usage = usage
    usage.packets[(p.i.name, 1)] = 86
    p.now = 10.0
    p.i.check_usage(p.now)
    p.roundtrip()
    assert requests(p, "i>r", CREATE_CHILD_SA) == []
    usage.packets[(p.i.name, 1)] = 87
    p.i.check_usage(p.now)
    p.i.check_usage(p.now)  # looked at twice before the answer: still one rekey
    p.roundtrip()
    assert requests(p, "i>r", CREATE_CHILD_SA) == [10.0]
    assert lifetime_events(p.i_events) == [(1, False, "packets", "rekey")]
    assert list(p.i.children) == [2]
    # The new generation has its own limits and deadline: 10 + 87.5
    p.advance(97.4)
    assert requests(p, "i>r", CREATE_CHILD_SA) == [10.0]
    p.advance(97.5)
    assert requests(p, "i>r", CREATE_CHILD_SA) == [10.0, 97.5]


def test_sequence_number_soft_limit_rekeys() -> None:
    p = up()
    usage = Counted()
    p.i.usage = usage
    usage.seq_soft = True  # RFC 4303 §3.3.3: the data path says the numbers run out
    p.i.check_usage(p.now)
    p.roundtrip()
    assert requests(p, "i>r", CREATE_CHILD_SA) == [0.0]
    assert lifetime_events(p.i_events) == [(1, False, "seq", "rekey")]


def test_volume_hard_limit_deletes() -> None:
    p = up(child_lifetime_packets=100, child_lifetime_bytes=3000)
    usage = Counted()
    p.i.usage = usage
    usage.packets[(p.i.name, 1)] = 100  # 4000 bytes: both hard limits
    p.i.check_usage(p.now)
    p.roundtrip()
    assert requests(p, "i>r", CREATE_CHILD_SA) == []
    assert requests(p, "i>r", INFORMATIONAL) == [0.0]
    assert lifetime_events(p.i_events) == [(1, True, "bytes,packets", "delete")]
    assert not p.i.children and not p.r.children


def test_make_before_break_the_old_child_survives_until_the_new_one_is_installed() -> None:
    p = up(child_lifetime=100.0, ike_lifetime=0.0)
    held: list[bytes] = []

    def hold_answers(direction: str, seq: int, data: bytes) -> list[bytes]:
        if direction == "r>i" and data[18] == CREATE_CHILD_SA:
            held.append(data)
            return []
        return [data]

    p.advance(87.5, hold_answers)
    # The rekey is in flight: the responder installed the new SA, the initiator
    # has not seen it and keeps both directions of the old one
    assert len(held) == 1 and list(p.i.children) == [1] and list(p.r.children) == [1, 2]
    p.i.receive_datagram(held[0], p.i.peer_addr, p.now)
    p.roundtrip()
    order = [
        (type(e).__name__, getattr(e, "child_id", None))
        for e in p.i_events
        if isinstance(e, ChildSaInstalled | ChildSaDeleted)
    ]
    # New one installed (rekeyed_from=1) before the old one is deleted
    assert order == [("ChildSaInstalled", 1), ("ChildSaInstalled", 2), ("ChildSaDeleted", 1)]
    assert p.events_of("i", ChildSaInstalled)[1].rekeyed_from == 1
    assert list(p.i.children) == list(p.r.children) == [2]


def test_show_facts_are_read_only_properties() -> None:
    p = up()
    sa: IkeSA = p.i
    assert (sa.spi_i, sa.spi_r) == (p.r.spi_i, p.r.spi_r) and len(sa.spi_r) == 8
    assert (sa.role, p.r.role) == ("initiator", "responder")
    assert sa.suite is not None and sa.suite == p.r.suite
    assert sa.state == "established" and sa.info()["state"] == "established"
