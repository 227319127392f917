"""Retransmission (§2.1), the response cache, loss, duplication, reordering, give-up."""

from __future__ import annotations

from ike.events import ChildSaInstalled, IkeSaDeleted, IkeSaEstablished, PeerDead

from .pair import Pair, configs, drop_nth


def test_lost_ike_auth_request_is_retransmitted_after_2s() -> None:
    p = Pair(*configs())
    p.handshake(drop_nth(3))  # 1: INIT req, 2: INIT resp, 3: AUTH req (lost)
    assert not p.i.established
    assert p.i.get_timer() == 2.0
    p.advance(2.0)
    assert p.i.established and p.r.established
    assert p.i.counters["retransmitted"] == 1
    assert len(p.events_of("i", ChildSaInstalled)) == 1


def test_lost_response_answered_from_cache() -> None:
    p = Pair(*configs())
    p.handshake(drop_nth(4))  # the IKE_AUTH response is lost
    assert p.r.established and not p.i.established
    p.advance(2.0)
    assert p.i.established
    assert p.r.counters["retransmit_answered"] == 1
    # the responder did not process the request twice
    assert len(p.events_of("r", ChildSaInstalled)) == 1
    assert len(p.events_of("r", IkeSaEstablished)) == 1
    resp = [d for who, _, d in p.wire if who == "r>i"]
    assert resp[1] == resp[2]  # byte-identical cached answer


def test_lost_init_response() -> None:
    p = Pair(*configs())
    p.handshake(drop_nth(2))
    p.advance(2.0)
    assert p.i.established and p.r.established
    assert len(p.ep.sas) == 1  # the retransmitted IKE_SA_INIT reached the same half-open SA


def test_everything_duplicated() -> None:
    p = Pair(*configs())
    p.handshake(lambda d, n, data: [data, data])
    assert p.i.established and p.r.established
    assert p.r.counters["retransmit_answered"] >= 2
    assert p.i.counters["unexpected_response"] >= 1
    assert len(p.events_of("i", ChildSaInstalled)) == len(p.events_of("r", ChildSaInstalled)) == 1
    p.i.liveness_check(p.now)
    p.roundtrip(lambda d, n, data: [data, data])
    assert p.i.counters["liveness_ok"] == 1


def test_reordered_stale_messages_are_ignored() -> None:
    p = Pair(*configs())
    p.handshake()
    old = [d for who, _, d in p.wire if who == "i>r"]
    # replay the old IKE_SA_INIT and IKE_AUTH requests out of order
    for d in reversed(old):
        p.ep.receive_datagram(d, p.i_src, p.now)
    p.roundtrip()
    assert p.r.established and len(p.ep.sas) == 1
    # the IKE_AUTH request (msg 1) is the cached one: answered again, never reprocessed
    assert p.r.counters["retransmit_answered"] == 1
    assert len(p.events_of("r", IkeSaEstablished)) == 1


def test_init_messages_dropped_after_auth_and_a_late_init_retransmission() -> None:
    """Once IKE_AUTH is done neither side keeps the IKE_SA_INIT messages, the nonces
    and SK_pi/SK_pr (kept only for the AUTH payloads, §2.15, and the first Child SA,
    §2.17). A retransmitted IKE_SA_INIT request that arrives after that is older than
    the last request answered: dropped unanswered and counted (§2.2), no second SA;
    the retransmitted IKE_AUTH request is still answered, byte-identical, from the
    response cache (§2.1)."""
    p = Pair(*configs())
    p.handshake()
    assert p.i.established and p.r.established
    for sa in (p.i, p.r):
        assert sa.init_request == sa.init_response == sa.ni == sa.nr == b""
        assert sa.ch.keys is not None and sa.ch.keys.sk_pi == sa.ch.keys.sk_pr == b""
    init_req, auth_req = [d for who, _, d in p.wire if who == "i>r"][:2]
    auth_resp = [d for who, _, d in p.wire if who == "r>i"][1]
    p.ep.receive_datagram(init_req, p.i_src, p.now)
    assert p.ep.datagrams_to_send(p.now) == []
    assert p.r.counters["bad_msg_id"] == 1
    assert len(p.ep.sas) == 1
    p.ep.receive_datagram(auth_req, p.i_src, p.now)
    assert [d for d, _ in p.ep.datagrams_to_send(p.now)] == [auth_resp]
    assert p.r.counters["retransmit_answered"] == 1
    assert len(p.events_of("r", IkeSaEstablished)) == 1


def test_gives_up_after_configured_retransmissions() -> None:
    p = Pair(*configs())
    p.handshake()
    p.i.liveness_check(p.now)
    p.roundtrip(lambda d, n, data: [])  # the peer is gone
    p.advance(100.0, lambda d, n, data: [])
    sends = [t for who, t, d in p.wire if who == "i>r" and t >= 0 and len(d) < 100]
    # §2.1: first send, then 2, 4, 8 s later (timeout 2.0, 3 retries), give up 16 s after that
    assert sends == [0.0, 2.0, 6.0, 14.0]
    assert p.events_of("i", PeerDead)
    (d,) = p.events_of("i", IkeSaDeleted)
    assert d.reason == "peer-dead" and d.child_ids == [1]
    assert p.i.dead and p.i.get_timer() is None


def test_custom_retransmit_settings_and_give_up_time() -> None:
    p = Pair(*configs(retransmit_timeout=0.5, retransmit_tries=2))
    p.i.initiate(0.0)
    p.roundtrip(lambda d, n, data: [])
    times = []
    while (t := p.i.get_timer()) is not None:
        times.append(t)
        p.now = t
        p.i.handle_timer(t)
        p.roundtrip(lambda d, n, data: [])
    assert times == [0.5, 1.5, 3.5]  # resend at 0.5 and 1.5, give up at 3.5
    assert p.events_of("i", PeerDead) and p.i.dead


def test_responder_forgets_half_open_sa() -> None:
    p = Pair(*configs(half_open_timeout=10.0))
    p.handshake(lambda d, n, data: [] if n >= 3 else [data])
    assert len(p.ep.sas) == 1
    p.advance(10.0, lambda d, n, data: [])
    assert not p.ep.sas
    assert not p.events_of("r", IkeSaDeleted)  # it never existed for the daemon


def test_initial_contact_replaces_stale_sas_at_the_responder() -> None:
    """The initiator restarts (new SPIs) and connects again: the responder drops the old SA."""
    p = Pair(*configs())
    p.handshake()
    old = p.r
    q = Pair(*configs(), seed=7)
    q.ep = p.ep  # same responder
    q.handshake()
    assert old.dead and len(p.ep.sas) == 1 and p.ep.sas[0] is not old
    deleted = [e for e in q.r_events if isinstance(e, IkeSaDeleted)]
    assert [(d.ike_sa, d.reason) for d in deleted] == [(old.name, "replaced (INITIAL_CONTACT)")]
    assert p.ep.counters["replaced_by_initial_contact"] == 1


def test_child_spis_unique_across_ike_sas() -> None:
    import os

    calls: list[int] = []

    def rng(n: int) -> bytes:
        """The first two 4-byte draws repeat: the second SA must not reuse the SPI."""
        if n != 4:
            return os.urandom(n)
        calls.append(n)
        return (0x1000 if len(calls) <= 2 else 0x2000).to_bytes(4, "big")

    p = Pair(*configs())
    p.ep.rng = rng
    p.handshake()
    q = Pair(*configs(initial_contact=False), seed=9)
    q.ep = p.ep
    q.handshake()
    spis = [c.inbound_spi for s in p.ep.sas for c in s.children.values()]
    assert len(p.ep.sas) == 2 and sorted(spis) == [0x1000, 0x2000]


def test_endpoint_sends_initial_contact_only_on_the_first_sa() -> None:
    from ike.endpoint import IkeEndpoint
    from ike.events import InitialContactReceived

    ci, cr = configs()
    ep_i, ep_r = IkeEndpoint([ci]), IkeEndpoint([cr])
    first = ep_i.initiate(ci, 0.0)
    second = ep_i.initiate(ci, 0.0)
    assert first.initial_contact and not second.initial_contact
    for _ in range(4):
        for d, _ in ep_i.datagrams_to_send(0.0):
            ep_r.receive_datagram(d, ci.local_addr, 0.0)
        for d, _ in ep_r.datagrams_to_send(0.0):
            ep_i.receive_datagram(d, cr.local_addr, 0.0)
    assert first.established and second.established and len(ep_r.sas) == 2
    events = []
    while (e := ep_r.next_event()) is not None:
        events.append(e)
    assert len([e for e in events if isinstance(e, InitialContactReceived)]) == 1


def test_replaced_sas_leave_the_responder_for_good() -> None:
    """60 connections in a row from one peer, each with INITIAL_CONTACT (§2.4), as a
    load generator makes them: the endpoint keeps one IKE SA, and a request on a
    replaced SA's SPIs finds nothing (dropped and counted, no answer)."""
    ci, cr = configs()
    first = Pair(ci, cr)
    first.handshake()
    ep = first.ep
    for seed in range(2, 61):
        q = Pair(ci, cr, seed=seed * 10)
        q.ep = ep
        q.handshake()
        assert q.i.established and len(ep.sas) == 1 and ep.sas[0].ch.spi_i == q.i.ch.spi_i
    assert ep.counters["replaced_by_initial_contact"] == 59
    first.i.liveness_check(first.now)  # INFORMATIONAL {} on the first, long replaced, SA
    assert first.roundtrip() == 1  # the request went out; nothing came back
    assert ep.counters["unknown_spi"] == 1 and len(ep.sas) == 1


def test_two_responder_sas_with_the_same_name_are_both_found() -> None:
    """Two initiators that picked the same SPIi (§2.1 demultiplexes IKE_SA_INIT by
    SPIi and address) give two responder SAs of the same name: ``find_sa`` returns
    the older one while it lives, then the other."""
    ci, cr = configs(initial_contact=False)
    a = Pair(ci, cr, seed=5)
    b = Pair(ci, cr, seed=5)  # the same SPIi, from another port (behind a NAT)
    b.ep = a.ep
    b.i_src, b.i_src_4500 = ("198.51.100.1", 1500), ("198.51.100.1", 14500)
    a.handshake()
    b.handshake()
    assert a.i.established and b.i.established and a.i.ch.spi_i == b.i.ch.spi_i
    older, newer = a.ep.sas
    assert older.name == newer.name and older.peer_addr != newer.peer_addr
    assert a.ep.find_sa(older.name) is older
    older.delete(a.now)
    a.roundtrip()
    assert a.ep.sas == [newer] and a.ep.find_sa(newer.name) is newer
