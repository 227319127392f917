"""INFORMATIONAL (liveness, DELETE) and CREATE_CHILD_SA (new Child, rekeys, collisions)."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from ike.constants import DhGroup
from ike.crypto import get_prf, skeyseed_rekey
from ike.events import (
    AuthenticationFailed,
    ChildSaDeleted,
    ChildSaInstalled,
    ChildSaRekeyed,
    ExchangeFailed,
    IkeSaDeleted,
    IkeSaRekeyed,
    PeerDead,
)
from ike.sa import ChildState, State

from .pair import R_ADDR, Pair, configs


def up(**kw: object) -> Pair:
    p = Pair(*configs(**kw))
    p.handshake()
    assert p.i.established and p.r.established
    return p


def test_liveness_empty_informational() -> None:
    p = up()
    p.i.liveness_check(p.now)
    p.roundtrip()
    assert p.i.counters["liveness_ok"] == 1
    req, resp = p.wire[-2][2], p.wire[-1][2]
    assert req[18] == resp[18] == 37  # INFORMATIONAL
    assert req[16] == 46 and req[28] == 0  # SK payload whose first inner payload is "none"
    p.r.liveness_check(p.now)  # the responder may probe too (its own message IDs)
    p.roundtrip()
    assert p.r.counters["liveness_ok"] == 1 and p.r.ch.next_id == 1 and p.i.ch.peer_id == 1


@pytest.mark.parametrize("by", ["i", "r"])
def test_delete_child(by: str) -> None:
    p = up()
    sa = p.i if by == "i" else p.r
    sa.delete_child(1, p.now)
    p.roundtrip()
    assert not p.i.children and not p.r.children
    (di,) = p.events_of("i", ChildSaDeleted)
    (dr,) = p.events_of("r", ChildSaDeleted)
    assert (di.inbound_spi, di.outbound_spi) == (dr.outbound_spi, dr.inbound_spi)
    assert p.i.established and p.r.established


@pytest.mark.parametrize("by", ["i", "r"])
def test_delete_ike_sa(by: str) -> None:
    p = up()
    (p.i if by == "i" else p.r).delete(p.now)
    p.roundtrip()
    assert p.i.dead and not p.ep.sas
    (di,) = p.events_of("i", IkeSaDeleted)
    (dr,) = p.events_of("r", IkeSaDeleted)
    assert {di.reason, dr.reason} == {"deleted", "deleted-by-peer"}
    assert di.child_ids == dr.child_ids == [1]


def test_crossing_child_deletes() -> None:
    p = up()
    p.i.delete_child(1, p.now)
    p.r.delete_child(1, p.now)
    p.roundtrip()
    assert not p.i.children and not p.r.children
    assert len(p.events_of("i", ChildSaDeleted)) == len(p.events_of("r", ChildSaDeleted)) == 1


@pytest.mark.parametrize("pfs", [None, DhGroup.ECP_256])
def test_create_additional_child(pfs: DhGroup | None) -> None:
    p = up(pfs_group=pfs)
    p.i.create_child(p.now)
    p.roundtrip()
    ci = p.events_of("i", ChildSaInstalled)
    cr = p.events_of("r", ChildSaInstalled)
    assert len(ci) == len(cr) == 2
    assert ci[1].inbound_key == cr[1].outbound_key and ci[1].outbound_key == cr[1].inbound_key
    assert ci[1].inbound_key != ci[0].inbound_key
    has_ke = 34 in _inner_types(p, -2)
    assert has_ke == (pfs is not None)


def _inner_types(p: Pair, idx: int) -> list[int]:
    """Inner payload types of a sent message, decrypted with the sender's keys."""
    from ike.buffer import Buffer
    from ike.payloads import parse_chain, parse_message

    who, _, data = p.wire[idx]
    _, _, sk = parse_message(data)
    assert sk is not None
    receiver = p.r if who == "i>r" else p.i
    inner = receiver.ch.inb.open(data, sk.offset)  # type: ignore[union-attr]
    payloads, _ = parse_chain(Buffer(inner), sk.first_inner)
    return [x.type for x in payloads]


@pytest.mark.parametrize("pfs", [None, DhGroup.CURVE25519, DhGroup.MODP_2048])
@pytest.mark.parametrize("by", ["i", "r"])
def test_child_rekey_make_before_break(pfs: DhGroup | None, by: str) -> None:
    p = up(pfs_group=pfs)
    a, b = (p.i, p.r) if by == "i" else (p.r, p.i)
    a.rekey_child(1, p.now)
    p.roundtrip()
    ci = p.events_of("i", ChildSaInstalled)
    cr = p.events_of("r", ChildSaInstalled)
    assert len(ci) == len(cr) == 2
    assert ci[1].rekeyed_from == cr[1].rekeyed_from == 1
    assert ci[1].inbound_key == cr[1].outbound_key
    assert ci[1].local_ts == ci[0].local_ts
    assert p.events_of("i", ChildSaRekeyed)[0].new_child_id == 2
    # the old SA is deleted after the new one is in place, on both sides
    assert [d.child_id for d in p.events_of("i", ChildSaDeleted)] == [1]
    assert [d.child_id for d in p.events_of("r", ChildSaDeleted)] == [1]
    assert {
        d.reason for d in p.events_of("i", ChildSaDeleted) + p.events_of("r", ChildSaDeleted)
    } == {"rekeyed"}
    assert list(a.children) == list(b.children) == [2]
    assert 41 in _inner_types(p, -4)  # N(REKEY_SA)


def test_child_rekey_collision_lowest_nonce_loses() -> None:
    """§2.8.1: both rekey child 1 at once; the SA with the lowest nonce is closed by its creator."""
    p = up()
    p.i.rekey_child(1, p.now)
    p.r.rekey_child(1, p.now)
    p.roundtrip()
    assert (
        p.i.counters.get("rekey_collision_lost", 0) + p.r.counters.get("rekey_collision_lost", 0)
        == 1
    )
    assert (
        p.i.counters.get("rekey_collision_won", 0) + p.r.counters.get("rekey_collision_won", 0) == 1
    )
    # exactly one new Child SA survives, the same pair on both sides, and the old one is gone
    assert len(p.i.children) == len(p.r.children) == 1
    (ci,) = p.i.children.values()
    (cr,) = p.r.children.values()
    assert (ci.inbound_spi, ci.outbound_spi) == (cr.outbound_spi, cr.inbound_spi)
    assert ci.inbound_key == cr.outbound_key
    assert 1 not in p.i.children and 1 not in p.r.children


@pytest.mark.parametrize("by", ["i", "r"])
def test_ike_rekey_moves_children(by: str) -> None:
    p = up()
    a = p.i if by == "i" else p.r
    old_keys = p.i.ch.keys
    old_spis = (p.i.ch.spi_i, p.i.ch.spi_r)
    a.rekey_ike(p.now)
    p.roundtrip()
    (ri,) = p.events_of("i", IkeSaRekeyed)
    (rr,) = p.events_of("r", IkeSaRekeyed)
    assert (ri.old_spi_i, ri.old_spi_r) == old_spis
    assert (ri.spi_i, ri.spi_r) == (rr.spi_i, rr.spi_r) != old_spis
    assert asdict(p.i.ch.keys) == asdict(p.r.ch.keys) != asdict(old_keys)
    # the rekey initiator is the new IKE SA's initiator (§2.18)
    assert a.ch.initiator and not (p.r if a is p.i else p.i).ch.initiator
    assert p.i.old_ch is None and p.r.old_ch is None  # old SA deleted
    assert 1 in p.i.children and 1 in p.r.children
    assert not p.events_of("i", IkeSaDeleted) and not p.events_of("r", IkeSaDeleted)
    # the new SA works: message IDs restart at 0, liveness and a Child rekey succeed
    p.i.liveness_check(p.now)
    p.roundtrip()
    p.r.rekey_child(1, p.now)
    p.roundtrip()
    assert p.i.counters["liveness_ok"] == 1 and list(p.i.children) == [2]
    assert p.ep.find_sa(p.r.name) is p.r


def test_ike_rekey_skeyseed_uses_old_sk_d() -> None:
    """§2.18 checked from outside: recompute the new SK_d from the old one and the wire."""
    from ike.buffer import Buffer
    from ike.payloads import KEPayload, NoncePayload, find, parse_chain, parse_message

    p = up()
    old = p.i.ch
    assert old.keys is not None and old.prf is not None and old.inb is not None
    p.i.rekey_ike(p.now)
    task = p.i.ch.pending.task  # type: ignore[union-attr]
    p.roundtrip()
    new = p.i.ch
    assert new.keys is not None and new.suite is not None
    # the answer was protected with the old keys: open it with them
    data = next(d for who, _, d in p.wire if who == "r>i" and d[18] == 36)
    _, _, sk = parse_message(data)
    assert sk is not None
    inner, _ = parse_chain(Buffer(old.inb.open(data, sk.offset)), sk.first_inner)
    nr = find(inner, NoncePayload)
    ke = find(inner, KEPayload)
    assert nr is not None and ke is not None
    g_ir = task.dh.shared_secret(ke.data)
    seed = skeyseed_rekey(old.prf, old.keys.sk_d, g_ir, task.ni, nr.nonce)
    prf = get_prf(new.suite.prf)
    assert prf.plus(seed, task.ni + nr.nonce + new.spi_i + new.spi_r, prf.size) == new.keys.sk_d


def test_rekey_of_unknown_child_is_refused() -> None:
    p = up()
    p.i.children[1].inbound_spi ^= 0xFFFF  # the responder no longer knows this SPI
    p.i.rekey_child(1, p.now)
    p.roundtrip()
    assert p.events_of("i", ExchangeFailed)[0].notify == "CHILD_SA_NOT_FOUND"
    assert p.i.established and p.i.children[1].state == ChildState.INSTALLED


def test_commands_before_establishment_wait() -> None:
    p = Pair(*configs())
    p.i.initiate(0)
    p.i.liveness_check(0)  # queued behind IKE_AUTH
    p.roundtrip()
    assert p.i.state == State.ESTABLISHED and p.i.counters["liveness_ok"] == 1


def test_child_pfs_group_mismatch() -> None:
    """One PFS group per side: a different group is not a proposal we accept (§2.7)."""
    p = up(i_pfs_group=DhGroup.ECP_256, r_pfs_group=DhGroup.CURVE25519)
    p.i.create_child(p.now)
    p.roundtrip()
    assert len(p.i.children) == len(p.r.children) == 1
    assert p.events_of("i", ExchangeFailed)[0].notify == "NO_PROPOSAL_CHOSEN"
    assert p.i.established and p.r.established


def test_lifetimes_drive_rekeys() -> None:
    """Soft lifetimes: the original initiator rekeys at 90 %, before the responder (93 %)."""
    p = up(child_lifetime=100.0, ike_lifetime=1000.0)
    p.advance(89.0)
    assert list(p.i.children) == [1]
    p.advance(90.0)
    assert p.i.counters["child_rekey_timer"] == 1
    assert "child_rekey_timer" not in p.r.counters  # its copy was replaced first
    assert list(p.i.children) == list(p.r.children) == [2]
    p.advance(900.0)
    assert p.i.counters["ike_rekey_timer"] == 1 and len(p.events_of("r", IkeSaRekeyed)) == 1
    assert p.i.established and p.r.established and p.i.old_ch is None


def test_hard_child_lifetime_deletes() -> None:
    p = up(i_child_lifetime=0.0, r_child_lifetime=50.0, ike_lifetime=0.0)
    p.r.children[1].rekey_at = None  # no rekey: let it run into the hard limit
    p.advance(50.0)
    assert p.r.counters["child_expired"] == 1
    assert not p.i.children and not p.r.children
    assert p.i.get_timer() is None


def _same_ike_sa(p: Pair) -> None:
    assert (p.i.ch.spi_i, p.i.ch.spi_r) == (p.r.ch.spi_i, p.r.ch.spi_r)
    assert asdict(p.i.ch.keys) == asdict(p.r.ch.keys)
    assert p.i.ch.initiator != p.r.ch.initiator
    assert not p.i.retiring and not p.r.retiring
    assert p.i.established and p.r.established and list(p.i.children) == list(p.r.children)


def test_simultaneous_ike_rekey_lowest_nonce_loses() -> None:
    """§2.8.2: both rekey the IKE SA at once; both exchanges succeed; the new IKE SA with
    the lowest of the four nonces is deleted by its initiator, the other one stays."""
    p = up()
    p.i.rekey_ike(p.now)
    p.r.rekey_ike(p.now)
    p.roundtrip()
    lost = p.i.counters.get("ike_rekey_collision_lost", 0) + p.r.counters.get(
        "ike_rekey_collision_lost", 0
    )
    won = p.i.counters.get("ike_rekey_collision_won", 0) + p.r.counters.get(
        "ike_rekey_collision_won", 0
    )
    assert (lost, won) == (1, 1)
    _same_ike_sa(p)
    assert not p.events_of("i", ExchangeFailed) and not p.events_of("r", ExchangeFailed)
    assert p.events_of("i", IkeSaRekeyed)[-1].spi_i == p.events_of("r", IkeSaRekeyed)[-1].spi_i
    p.i.liveness_check(p.now)
    p.r.rekey_child(1, p.now)
    p.roundtrip()
    assert p.i.counters["liveness_ok"] == 1 and list(p.i.children) == [2]


@pytest.mark.parametrize("seed", range(6))
def test_simultaneous_ike_rekey_with_reordering(seed: int) -> None:
    """The winner's DELETE of the old IKE SA overtakes its answer to the loser's request."""
    import random

    rnd = random.Random(seed)
    p = up()
    p.i.rekey_ike(p.now)
    p.r.rekey_ike(p.now)
    in_flight: list[tuple[str, bytes]] = []
    for _ in range(40):
        in_flight += [("i>r", d) for d, _ in p.i.datagrams_to_send(p.now)]
        in_flight += [("r>i", d) for d, _ in p.ep.datagrams_to_send(p.now)]
        if not in_flight:
            break
        who, data = in_flight.pop(rnd.randrange(len(in_flight)))  # any order
        if who == "i>r":
            p.ep.receive_datagram(data, p.i_src, p.now)
        else:
            p.i.receive_datagram(data, R_ADDR, p.now)
    p.roundtrip()
    p.advance(200.0)  # retransmissions, retries and expiries run out
    _same_ike_sa(p)
    for sa in (p.i, p.r):
        assert sa.counters.get("internal_error", 0) == 0


def test_initiator_reports_bad_responder_auth() -> None:
    """§2.21.2: a failing responder AUTH is told to the responder in an INFORMATIONAL."""
    p = Pair(*configs(i_remote_psk=b"not what the responder uses"))
    p.handshake()
    assert p.i.dead and p.events_of("i", AuthenticationFailed)
    assert not p.ep.sas  # the responder dropped its SA when told
    assert p.events_of("r", AuthenticationFailed)
    sent = [d for who, _, d in p.wire if who == "i>r"]
    assert sent[-1][18] == 37 and int.from_bytes(sent[-1][20:24], "big") == 2
    assert p.i.counters.get("dropped_dead", 0) == 1  # its empty answer found nobody


@pytest.mark.parametrize("order", ["child-first", "ike-first"])
def test_child_rekey_crossing_an_ike_rekey(order: str) -> None:
    """A Child rekey runs on the old IKE SA while the peer rekeys the IKE SA: KEYMAT
    comes from the SK_d of the IKE SA the exchange ran on (§2.17)."""
    p = up()
    if order == "child-first":
        p.i.rekey_child(1, p.now)
        p.r.rekey_ike(p.now)
    else:
        p.r.rekey_ike(p.now)
        p.i.rekey_child(1, p.now)
    p.roundtrip()
    assert len(p.events_of("i", IkeSaRekeyed)) == len(p.events_of("r", IkeSaRekeyed)) == 1
    assert list(p.i.children) == list(p.r.children) == [2]
    ci, cr = p.i.children[2], p.r.children[2]
    assert ci.inbound_key == cr.outbound_key and ci.outbound_key == cr.inbound_key
    assert p.i.old_ch is None and p.r.old_ch is None


def test_request_left_on_the_old_ike_sa_is_redone_on_the_new_one() -> None:
    p = up()
    p.i.liveness_check(p.now)
    p.r.rekey_ike(p.now)
    dropped: list[int] = []

    def lose_first_informational_answer(direction: str, n: int, data: bytes) -> list[bytes]:
        if direction == "r>i" and data[18] == 37 and data[19] & 0x20 and not dropped:
            dropped.append(n)
            return []
        return [data]

    p.roundtrip(lose_first_informational_answer)
    assert dropped and p.i.counters["requeued_from_old_sa"] == 1
    assert p.i.counters["liveness_ok"] == 1 and p.i.old_ch is None
    assert p.i.ch.pending is None and p.r.ch.pending is None


def test_child_rekey_arriving_on_the_replaced_ike_sa() -> None:
    """The responder's Child rekey crosses the initiator's IKE rekey and arrives after the
    switch, on the old IKE SA: refused with TEMPORARY_FAILURE, redone on the new IKE SA."""
    from .pair import R_ADDR

    p = up()
    p.r.rekey_child(1, p.now)
    (held,) = p.ep.datagrams_to_send(p.now)  # the Child rekey request, delayed in the network
    p.i.rekey_ike(p.now)
    ((req, _),) = p.i.datagrams_to_send(p.now)
    p.ep.receive_datagram(req, p.i_src, p.now)
    ((resp, _),) = p.ep.datagrams_to_send(p.now)  # the responder has switched
    p.i.receive_datagram(resp, R_ADDR, p.now)
    ((delete_old, _),) = p.i.datagrams_to_send(p.now)  # so has the initiator
    p.i.receive_datagram(held[0], R_ADDR, p.now)
    ((refusal, _),) = p.i.datagrams_to_send(p.now)
    assert p.i.counters["sent_TEMPORARY_FAILURE"] == 1
    p.ep.receive_datagram(refusal, p.i_src, p.now)
    p.ep.receive_datagram(delete_old, p.i_src, p.now)
    p.roundtrip()
    assert p.events_of("r", ExchangeFailed)[0].notify == "TEMPORARY_FAILURE"
    p.advance(10.0)  # the responder retries its Child rekey 2-5 s later
    assert p.r.counters["child_rekey_timer"] == 1
    assert p.i.established and p.r.established and p.i.old_ch is None and p.r.old_ch is None
    assert list(p.i.children) == list(p.r.children) == [2]
    assert p.i.children[2].inbound_key == p.r.children[2].outbound_key
    assert not p.events_of("i", PeerDead) and not p.events_of("r", PeerDead)


def test_back_to_back_ike_rekeys() -> None:
    """A second IKE rekey waits until the replaced IKE SA is deleted; duplicates coalesce."""
    from .pair import R_ADDR

    p = up()
    p.i.rekey_ike(p.now)
    p.i.rekey_ike(p.now)  # asked twice: one rekey satisfies both
    ((req, _),) = p.i.datagrams_to_send(p.now)
    p.ep.receive_datagram(req, p.i_src, p.now)
    ((resp, _),) = p.ep.datagrams_to_send(p.now)
    assert p.r.old_ch is not None  # switched; the old IKE SA awaits its DELETE
    p.r.rekey_ike(p.now)
    assert not p.ep.datagrams_to_send(p.now)  # waits
    p.i.receive_datagram(resp, R_ADDR, p.now)
    p.roundtrip()  # DELETE of the old SA, then the responder's own rekey
    first, second = p.events_of("r", IkeSaRekeyed)
    assert (first.spi_i, first.spi_r) == (second.old_spi_i, second.old_spi_r)
    assert len(p.events_of("i", IkeSaRekeyed)) == 2
    assert asdict(p.i.ch.keys) == asdict(p.r.ch.keys)
    assert p.i.old_ch is None and p.r.old_ch is None and p.i.established and p.r.established
    p.i.liveness_check(p.now)
    p.roundtrip()
    assert p.i.counters["liveness_ok"] == 1


def test_after_an_ike_rekey_only_the_new_spis_reach_the_sa() -> None:
    """The endpoint re-indexes an SA whose SPIs change (§2.18): once the old IKE SA
    is deleted, a message on its SPIs is unknown to the endpoint, and the new SPIs
    are routed."""
    p = up()
    old_auth = next(d for direction, _, d in p.wire if direction == "i>r" and d[18] == 35)
    p.i.rekey_ike(p.now)
    p.roundtrip()
    assert p.i.old_ch is None and p.r.old_ch is None  # the old IKE SA is deleted
    p.ep.receive_datagram(old_auth, p.i_src, p.now)  # old SPIs: IKE_AUTH request
    assert p.ep.counters.get("unknown_spi") == 1 and not p.ep.datagrams_to_send(p.now)
    p.i.liveness_check(p.now)
    p.roundtrip()
    assert p.i.counters["liveness_ok"] == 1
