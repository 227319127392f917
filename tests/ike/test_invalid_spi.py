"""INVALID_SPI (RFC 7296 §1.5, §3.10.1): two IkeEndpoints in memory, a fake clock.

A is "our" gateway (the initiator), B its peer. B "restarts" by being replaced
with a fresh endpoint that has the same configuration and no SA.
"""

from __future__ import annotations

import random

from ike.constants import ExchangeType
from ike.endpoint import IkeEndpoint
from ike.events import (
    ChildSaInstalled,
    IkeEvent,
    IkeSaDeleted,
    InvalidSpiReceived,
    PeerDead,
)
from ike.invalid_spi import SourceLimit, build_invalid_spi
from ike.payloads import parse_header
from ike.sa import IkeSA

from .pair import I_ADDR, R_ADDR, configs

TIMEOUT, TRIES = 0.25, 2  # the short schedule of a probe


class Net:
    """A and B exchange datagrams through ``wire``; ``drop_to_b`` loses what A sends."""

    def __init__(self) -> None:
        self.ci, self.cr = configs()
        self.now = 0.0
        self.a = IkeEndpoint([self.ci], rng=random.Random(1).randbytes)
        self.b = IkeEndpoint([self.cr], rng=random.Random(2).randbytes)
        self.wire: list[tuple[str, float, bytes]] = []
        self.a_events: list[IkeEvent] = []
        self.b_events: list[IkeEvent] = []

    def run(self) -> None:
        for _ in range(30):
            out_a = self.a.datagrams_to_send(self.now)
            out_b = self.b.datagrams_to_send(self.now)
            if not out_a and not out_b:
                break
            for data, _dst in out_a:
                self.wire.append(("a>b", self.now, data))
                self.b.receive_datagram(data, I_ADDR, self.now)
            for data, _dst in out_b:
                self.wire.append(("b>a", self.now, data))
                self.a.receive_datagram(data, R_ADDR, self.now)
        while (e := self.a.next_event()) is not None:
            self.a_events.append(e)
        while (e := self.b.next_event()) is not None:
            self.b_events.append(e)

    def advance(self, to: float) -> None:
        while (t := self.a.get_timer()) is not None and t <= to:
            self.now = max(self.now, t)
            self.a.handle_timer(self.now)
            self.run()
        self.now = to
        self.run()

    def establish(self) -> IkeSA:
        sa = self.a.initiate(self.ci, self.now)
        self.run()
        assert sa.established and len(self.b.sas) == 1 and self.b.sas[0].established
        self.now += 1.0  # what follows is told apart from the handshake by its time
        return sa

    def restart_b(self) -> None:
        self.b = IkeEndpoint([self.cr], rng=random.Random(3).randbytes)

    def sent(self, direction: str, since: float = 0.0) -> list[tuple[float, bytes]]:
        return [(t, d) for who, t, d in self.wire if who == direction and t >= since]


def test_the_unprotected_message_known_answer() -> None:
    """§1.5: SPIi random, SPIr 0, INFORMATIONAL (37), flags I (0x08), message ID 0;
    §3.10: N(INVALID_SPI = 11), protocol 0, SPI size 0, data = the ESP SPI."""
    msg = build_invalid_spi(0x0A0B0C0D, lambda n: bytes(range(1, n + 1)))
    assert msg.hex() == (
        "0102030405060708" "0000000000000000"  # SPIi (random), SPIr (zero)
        "29" "20" "25" "08" "00000000" "00000028"  # N, 2.0, INFORMATIONAL, I, msg 0, 40 bytes
        "00" "00" "000c" "00" "00" "000b" "0a0b0c0d"  # N: last, 12 bytes, proto 0, size 0, 11
    )  # fmt: skip


def test_restarted_peer_hint_then_short_probe_then_peer_dead() -> None:
    net = Net()
    sa = net.establish()
    (child,) = sa.children.values()
    net.restart_b()
    # B gets A's ESP for an SPI it no longer knows: it tells A, unprotected
    assert net.b.send_invalid_spi(child.outbound_spi, I_ADDR, net.now) is True
    (pkt, dst), *rest = net.b.datagrams_to_send(net.now)
    assert not rest and dst == I_ADDR
    hdr = parse_header(pkt)
    assert (hdr.exchange, hdr.msg_id, hdr.is_response, hdr.spi_r) == (
        ExchangeType.INFORMATIONAL,
        0,
        False,
        b"\0" * 8,
    )
    assert net.b.counters["invalid_spi_sent"] == 1
    net.a.receive_datagram(pkt, R_ADDR, net.now)
    net.run()
    # A: a hint, nothing torn down, nothing answered (§1.5: no reply to a one-way message)
    (hint,) = [e for e in net.a_events if isinstance(e, InvalidSpiReceived)]
    assert (hint.ike_sa, hint.spi, hint.child_id, hint.authenticated) == (
        sa.name,
        child.outbound_spi,
        child.child_id,
        False,
    )
    assert sa.established and not net.sent("a>b", since=net.now)
    assert net.a.counters["invalid_spi_received"] == 1
    # The reaction: a liveness check at once, 0.25 s apart, two resends, then dead
    start = net.now
    sa.probe(net.now, TIMEOUT, TRIES)
    net.run()
    net.advance(start + 5.0)
    probes = [t - start for t, _ in net.sent("a>b", since=start)]
    assert probes == [0.0, 0.25, 0.5]
    assert net.b.counters["unknown_spi"] == 3  # B has no IKE SA: it answers nothing
    assert [e for e in net.a_events if isinstance(e, PeerDead)]
    (gone,) = [e for e in net.a_events if isinstance(e, IkeSaDeleted)]
    assert gone.reason == "peer-dead" and sa.dead
    assert sa.counters["gave_up"] == 1


def test_forged_hint_with_live_peer_costs_one_liveness_exchange() -> None:
    net = Net()
    sa = net.establish()
    (child,) = sa.children.values()
    before = len(net.wire)
    # An on-path attacker forges B's INVALID_SPI for the SPI A sends on
    forged = build_invalid_spi(child.outbound_spi, random.Random(9).randbytes)
    net.a.receive_datagram(forged, R_ADDR, net.now)
    net.run()
    assert [e for e in net.a_events if isinstance(e, InvalidSpiReceived)]
    sa.probe(net.now, TIMEOUT, TRIES)
    net.run()
    net.advance(net.now + 5.0)
    # exactly one INFORMATIONAL request and its answer; the SA and its Child SA stay
    exchanged = net.wire[before:]
    assert [who for who, _, _ in exchanged] == ["a>b", "b>a"]
    assert sa.established and child.child_id in sa.children
    assert sa.counters["liveness_ok"] == 1
    assert not [e for e in net.a_events if isinstance(e, IkeSaDeleted | PeerDead)]


def test_hints_for_spis_we_do_not_send_on_or_from_elsewhere_are_ignored() -> None:
    net = Net()
    sa = net.establish()
    (child,) = sa.children.values()
    rng = random.Random(5).randbytes
    net.a.receive_datagram(build_invalid_spi(child.inbound_spi, rng), R_ADDR, net.now)
    net.a.receive_datagram(build_invalid_spi(0x12345678, rng), R_ADDR, net.now)
    net.a.receive_datagram(
        build_invalid_spi(child.outbound_spi, rng), ("203.0.113.9", 500), net.now
    )
    net.run()
    assert not [e for e in net.a_events if isinstance(e, InvalidSpiReceived)]
    assert net.a.counters["invalid_spi_ignored"] == 3
    assert "invalid_spi_received" not in net.a.counters
    assert not net.sent("a>b", since=net.now)  # never answered


def test_an_unprotected_invalid_spi_is_never_answered() -> None:
    """§1.5: answering a one-way message could loop between two restarted peers."""
    net = Net()
    net.b.receive_datagram(build_invalid_spi(0x1000, random.Random(1).randbytes), I_ADDR, 0.0)
    assert net.b.datagrams_to_send(0.0) == [] and net.b.next_event() is None
    assert net.b.counters["invalid_spi_ignored"] == 1


def test_send_is_rate_limited_per_source_and_in_all() -> None:
    ep = IkeEndpoint([], rng=random.Random(1).randbytes)
    sent = [ep.send_invalid_spi(0x1000 + i, I_ADDR, i * 0.1) for i in range(25)]
    # at most one per second per source: at 0.0, 1.0 (+ float slack), 2.0
    assert [round(i * 0.1, 1) for i, ok in enumerate(sent) if ok] == [0.0, 1.0, 2.0]
    assert ep.counters["invalid_spi_rate_limited"] == 22
    assert len(ep.datagrams_to_send(3.0)) == 3
    # NAT-T: to the ESP-in-UDP source port, behind the non-ESP marker (RFC 3948 §2.2)
    assert ep.send_invalid_spi(0x2000, ("198.51.100.7", 4501), 3.0, nat_t=True)
    ((pkt, dst),) = ep.datagrams_to_send(3.0)
    assert dst == ("198.51.100.7", 4501) and pkt[:4] == b"\0\0\0\0"
    assert parse_header(pkt[4:]).exchange == ExchangeType.INFORMATIONAL
    # Spoofed sources: at most per_second in all
    lim = SourceLimit(per_second=100)
    ok = sum(lim.allow(f"192.0.2.{i % 250}-{i}", 10.0 + i / 10_000) for i in range(1000))
    assert ok == 100
    assert lim.allow("192.0.2.1", 11.5)


def test_with_an_ike_sa_it_is_sent_protected_and_the_peer_gets_it_authenticated() -> None:
    """§1.5: with an IKE SA towards that address, INVALID_SPI goes inside it."""
    net = Net()
    sa = net.establish()
    (child,) = sa.children.values()
    b_sa = net.b.sas[0]
    # B receives ESP for an SPI it does not know, from A (it has an IKE SA with A)
    assert net.b.send_invalid_spi(child.outbound_spi, I_ADDR, net.now)
    assert net.b.counters["invalid_spi_sent_protected"] == 1
    net.run()
    (hint,) = [e for e in net.a_events if isinstance(e, InvalidSpiReceived)]
    assert hint.authenticated and hint.child_id == child.child_id
    assert sa.counters["received_INVALID_SPI"] == 1
    assert b_sa.counters["invalid_spi_acknowledged"] == 1
    _, last = net.sent("b>a")[-1]
    assert parse_header(last).next_payload == 46  # SK: protected


def test_probe_with_a_request_in_flight_resends_it_on_the_short_schedule() -> None:
    """Window size 1 (§2.3): a probe cannot overtake the request in flight, so that
    request (its answer proves liveness as well, §2.4) is resent at once, 0.25 s apart."""
    net = Net()
    sa = net.establish()
    net.restart_b()
    sa.liveness_check(net.now, 10.0, 3)  # an ordinary DPD check, 10 s apart
    net.run()
    t0 = net.now
    net.advance(t0 + 1.0)
    assert len(net.sent("a>b", since=t0)) == 1
    sa.probe(net.now, TIMEOUT, TRIES)
    net.run()
    net.advance(net.now + 3.0)
    sends = [round(t - t0, 2) for t, _ in net.sent("a>b", since=t0)]
    assert sends == [0.0, 1.0, 1.25, 1.5]  # the request in flight, resent twice, then dead
    assert len({d for _, d in net.sent("a>b", since=t0)}) == 1
    assert sa.dead and [e for e in net.a_events if isinstance(e, PeerDead)]


def test_the_child_sa_index_follows_rekeys_and_deaths() -> None:
    """The hint lookup is an index (no scan over all SAs): it must follow the Child
    SAs as they are rekeyed and forget them with their IKE SA."""
    net = Net()
    sa = net.establish()
    (old,) = sa.children.values()
    sa.rekey_child(old.child_id, net.now)
    net.run()
    (new,) = sa.children.values()
    assert new.outbound_spi != old.outbound_spi
    assert [e for e in net.a_events if isinstance(e, ChildSaInstalled)][-1].rekeyed_from
    rng = random.Random(7).randbytes
    net.a.receive_datagram(build_invalid_spi(old.outbound_spi, rng), R_ADDR, net.now)
    net.a.receive_datagram(build_invalid_spi(new.outbound_spi, rng), R_ADDR, net.now)
    net.run()
    (hint,) = [e for e in net.a_events if isinstance(e, InvalidSpiReceived)]
    assert hint.spi == new.outbound_spi
    sa.delete(net.now)
    net.run()
    assert sa.dead
    net.a.receive_datagram(build_invalid_spi(new.outbound_spi, rng), R_ADDR, net.now)
    assert net.a.counters["invalid_spi_ignored"] == 2


def test_the_rate_limiters_memory_is_bounded() -> None:
    """Spoofed sources cannot grow the sender's memory: past max_sources, the
    sources older than the interval are dropped (at most per_second are younger)."""
    lim = SourceLimit(per_second=100, max_sources=500)
    for i in range(20_000):  # 100 new sources per second, for 200 s
        lim.allow(f"2001:db8::{i:x}", i / 100)
    assert len(lim._last) <= 500
    assert not lim.allow("2001:db8::4e1f", 199.995)  # the last one is still remembered


def test_mangled_unprotected_messages_never_raise() -> None:
    """Bad input from the network is dropped and counted, never raised: flipped,
    cut and extended copies of the message, to an endpoint with a live SA."""
    net = Net()
    sa = net.establish()
    (child,) = sa.children.values()
    good = build_invalid_spi(child.outbound_spi, random.Random(1).randbytes)
    rnd = random.Random(42)
    for _ in range(3000):
        msg = bytearray(good)
        for _ in range(rnd.randint(1, 4)):
            msg[rnd.randrange(len(msg))] = rnd.randrange(256)
        cut = rnd.choice([len(msg), rnd.randrange(len(msg)), len(msg) + rnd.randint(1, 16)])
        data = bytes(msg[:cut]) + bytes(rnd.randrange(256) for _ in range(cut - len(msg)))
        net.a.receive_datagram(data, R_ADDR, net.now)
    net.run()
    assert sa.established and child.child_id in sa.children
    assert not net.sent("a>b", since=net.now)  # nothing answered, nothing probed
