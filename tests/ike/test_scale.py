"""One responder endpoint with many peers (#19): indexes and timers that must
give the same answers as the scans they replaced, and the COOKIE check's
payload walk against the full decoder."""

from __future__ import annotations

import dataclasses
import random

import pytest

from ike.buffer import DecodeError
from ike.config import Identity, IkeConfig
from ike.constants import ExchangeType, IdType, NotifyType
from ike.endpoint import IkeEndpoint, _cookie_and_nonce
from ike.payloads import (
    KEPayload,
    NoncePayload,
    NotifyPayload,
    TrafficSelector,
    build_plain_message,
)
from ike.sa import IkeSA, State

from .pair import Pair, configs

R_ADDR = ("2001:db8::1", 500)
PSK = b"correct horse battery staple"


def peer(i: int) -> tuple[str, int]:
    return (f"2001:db8:1::{i + 1:x}", 500)


def responder_configs(n: int, half_open_timeout: float = 30.0) -> list[IkeConfig]:
    return [
        IkeConfig(
            R_ADDR,
            peer(i),
            Identity.address(R_ADDR[0]),
            Identity(IdType.ID_FQDN, f"nas{i}.example"),
            PSK,
            name=f"m{i}",
            half_open_timeout=half_open_timeout,
        )
        for i in range(n)
    ]


def initiator(cr: IkeConfig, seed: int) -> IkeSA:
    ci = dataclasses.replace(
        cr,
        local_addr=cr.peer_addr,
        peer_addr=cr.local_addr,
        local_id=cr.remote_id,
        remote_id=cr.local_id,
        name="i",
    )
    return IkeSA(ci, True, random.Random(seed).randbytes)


def exchange(ep: IkeEndpoint, sas: dict[tuple[str, int], IkeSA], now: float) -> None:
    """Move datagrams between the initiators and the endpoint until quiet."""
    for _ in range(10):
        moved = False
        for addr, sa in sas.items():
            for data, _ in sa.datagrams_to_send(now):
                ep.receive_datagram(data, addr, now)
                moved = True
        for data, dst in ep.datagrams_to_send(now):
            sas[dst].receive_datagram(data, R_ADDR, now)
            moved = True
        if not moved:
            return


def earliest(ep: IkeEndpoint) -> float:
    """What the old IkeEndpoint.get_timer computed: a scan of every SA."""
    return min(t for t in (s.get_timer() for s in ep.sas) if t is not None)


def test_config_for_finds_each_peer_among_many() -> None:
    cfgs = responder_configs(3000)
    ep = IkeEndpoint(cfgs)
    assert ep.config_for(peer(2999), None) is cfgs[2999]
    # another spelling of the same IPv6 address finds it too
    assert ep.config_for(("2001:0db8:0001:0000:0000:0000:0000:0bb8", 500), None) is cfgs[2999]
    assert ep.config_for(("2001:db8:2::1", 500), None) is None
    assert ep.config_for(("not an address", 500), None) is None
    # a reload replaces the index; the first config for an address wins, as the scan did
    twin = dataclasses.replace(cfgs[5], name="twin")
    ep.configs = [*cfgs[:3], twin, cfgs[5]]
    assert ep.config_for(peer(5), None) is twin and ep.config_for(peer(10), None) is None


def test_half_open_count_timers_and_child_spis_follow_the_sas() -> None:
    """20 peers: 12 complete, 8 stop after IKE_SA_INIT; the counter, the timer heap
    and the Child SPI index agree with what a scan of the SAs says."""
    cfgs = responder_configs(20, half_open_timeout=30.0)
    ep = IkeEndpoint(cfgs, rng=random.Random(7).randbytes)
    sas = {c.peer_addr: initiator(c, i) for i, c in enumerate(cfgs)}
    for sa in sas.values():
        sa.initiate(0.0)
    # IKE_SA_INIT only, for everyone
    for addr, sa in sas.items():
        for data, _ in sa.datagrams_to_send(0.0):
            ep.receive_datagram(data, addr, 0.0)
    for data, dst in ep.datagrams_to_send(0.0):
        sas[dst].receive_datagram(data, R_ADDR, 0.0)
    assert ep.half_open() == 20
    # 12 send IKE_AUTH
    done = dict(list(sas.items())[:12])
    exchange(ep, done, 1.0)
    assert all(sa.established for sa in done.values())
    scan = [s for s in ep.sas if not s.initiator and s.state == State.INIT_DONE]
    assert ep.half_open() == len(scan) == 8
    spis = {c.inbound_spi for s in ep.sas for c in s.children.values()}
    assert len(spis) == 12 and all(ep._spi_taken(spi) for spi in spis)
    assert ep.get_timer() == earliest(ep) == 30.0  # the half-open limit of the first 8
    # Only the due SAs run: the 8 half-open ones go, the 12 established stay
    ep.handle_timer(30.0)
    assert len(ep.sas) == 12 and ep.half_open() == 0
    assert ep.counters["sa_half_open_expired"] == 8
    assert ep.get_timer() == earliest(ep)
    # A peer restarts (INITIAL_CONTACT): its old SA is replaced, the index follows
    first = next(iter(done))
    again = initiator(cfgs[0], 99)
    again.initiate(2.0)
    exchange(ep, {first: again}, 2.0)
    assert again.established and len(ep.sas) == 12
    assert ep.counters["replaced_by_initial_contact"] == 1
    assert [s.name for s in ep.sas_of(cfgs[0])] == [f"m0-{again.ch.spi_i.hex()}"]


def _init_request(first_cookie: bytes | None, nonce: bytes) -> bytes:
    payloads = [KEPayload(31, bytes(32)), NoncePayload(nonce)]
    if first_cookie is not None:
        payloads.insert(0, NotifyPayload(NotifyType.COOKIE, first_cookie))
    return build_plain_message(b"\x11" * 8, bytes(8), ExchangeType.IKE_SA_INIT, 0x08, 0, payloads)


def test_cookie_walk_reads_what_the_decoder_reads() -> None:
    nonce = bytes(range(32))
    assert _cookie_and_nonce(_init_request(b"\x00\x00\x00\x01" + bytes(32), nonce)) == (
        b"\x00\x00\x00\x01" + bytes(32),
        nonce,
    )
    assert _cookie_and_nonce(_init_request(None, nonce)) == (None, nonce)


@pytest.mark.parametrize("cut", [30, 31, 40, 60])
def test_cookie_walk_refuses_truncated_payloads(cut: int) -> None:
    msg = _init_request(b"\x01" * 36, bytes(32))
    with pytest.raises(DecodeError):
        _cookie_and_nonce(msg[:cut])


def test_cookie_walk_without_a_nonce_is_malformed() -> None:
    msg = build_plain_message(
        b"\x11" * 8, bytes(8), ExchangeType.IKE_SA_INIT, 0x08, 0, [KEPayload(31, bytes(32))]
    )
    with pytest.raises(DecodeError):
        _cookie_and_nonce(msg)


def test_update_configs_follows_a_reload_of_a_few_peers() -> None:
    """SIGHUP with a few maps changed (#19.7): the index changes only there. A
    responder matches the new configs and no longer the removed ones, an SA built
    before keeps its config and keeps working, and the PSK-derived key of a removed
    config is dropped (a kept config's stays: the same object, not derived again)."""
    cfgs = responder_configs(4)
    cfgs[1] = dataclasses.replace(cfgs[1], local_psk=b"peer one's own key 01234")
    cfgs[2] = dataclasses.replace(cfgs[2], local_psk=b"peer two's own key 01234")
    ep = IkeEndpoint(cfgs, rng=random.Random(3).randbytes)
    up = {cfgs[i].peer_addr: initiator(cfgs[i], i) for i in (0, 1)}
    for sa in up.values():
        sa.initiate(0.0)
    exchange(ep, up, 0.0)
    assert all(sa.established for sa in up.values())
    assert ep.caches.sizes()["psk_keys"] == 2
    (kept_sa,) = ep.sas_of(cfgs[0])
    (old_sa,) = ep.sas_of(cfgs[1])

    new1 = dataclasses.replace(cfgs[1], local_psk=b"peer one's new key 01234")
    added = responder_configs(10)[9]
    assert ep.update_configs([new1, added], [cfgs[1], cfgs[2]]) == []
    assert [id(c) for c in ep.configs] == [id(c) for c in (cfgs[0], cfgs[3], new1, added)]
    assert ep.config_for(peer(0), None) is cfgs[0]
    assert ep.config_for(peer(1), None) is new1
    assert ep.config_for(peer(2), None) is None
    assert ep.config_for(peer(9), None) is added
    assert ep.config_for(("2001:0db8:0001::000a", 500), None) is added  # packed index too
    # peer one's old key is gone, the shared PSK's (kept configs) stays
    assert ep.caches.sizes()["psk_keys"] == 1
    # SAs built before keep their config objects, and keep working: a new Child SA
    assert kept_sa.config is cfgs[0] and old_sa.config is cfgs[1]
    up[peer(0)].create_child(1.0)
    exchange(ep, {peer(0): up[peer(0)]}, 1.0)
    assert len(kept_sa.children) == 2 and len(up[peer(0)].children) == 2

    # the removed peer gets no answer; the changed one's new config answers
    gone = initiator(cfgs[2], 7)
    gone.initiate(2.0)
    for data, _ in gone.datagrams_to_send(2.0):
        ep.receive_datagram(data, peer(2), 2.0)
    assert ep.counters.get("no_config") == 1
    assert all(dst != peer(2) for _, dst in ep.datagrams_to_send(2.0))
    again = {peer(1): initiator(new1, 8), peer(9): initiator(added, 9)}
    for sa in again.values():
        sa.initiate(2.0)
    exchange(ep, again, 2.0)
    assert all(sa.established for sa in again.values())
    assert [sa.established for sa in ep.sas_of(new1)] == [True]
    assert [sa.established for sa in ep.sas_of(added)] == [True]


def test_update_configs_keeps_the_first_config_of_a_shared_peer_address() -> None:
    """Two configs for one peer: the one indexed first answers; an added one it
    shadows is reported (the caller knows the configuration's order), and takes
    over when the first is removed."""
    cfgs = responder_configs(4)
    ep = IkeEndpoint(cfgs)
    twin = dataclasses.replace(cfgs[3], name="twin")
    assert ep.update_configs([twin], []) == [twin]
    assert ep.config_for(peer(3), None) is cfgs[3]
    assert ep.update_configs([], [cfgs[3]]) == []
    assert ep.config_for(peer(3), None) is twin
    assert ep.config_for(("2001:0db8:0001::0004", 500), None) is twin
    # removing a config that is not indexed (or twice) changes nothing
    assert ep.update_configs([], [cfgs[3]]) == []
    assert ep.config_for(peer(3), None) is twin and len(ep.configs) == 4


def _filed_as_scanned(ep: IkeEndpoint) -> None:
    """The endpoint's SPI indexes hold exactly what a scan of its live SAs gives."""
    by_spi = {spi: s for s in ep.sas for spi in s.local_spis() if spi != bytes(8)}
    child_in = {c.inbound_spi: s for s in ep.sas for c in s.children.values()}
    child_out = {(s.peer_addr[0], c.outbound_spi): s for s in ep.sas for c in s.children.values()}
    assert ep._by_spi == by_spi
    assert ep._child_spis == child_in
    assert ep._by_child_out == child_out


def test_indexes_follow_child_and_ike_rekeys_a_float_and_the_end() -> None:
    """The per-SA record the endpoint files its entries under: a second Child SA,
    a Child rekey (two children for a while, then the new one), an IKE rekey (two
    IKE SPIs for a while), the peer moving (NAT), and the SA's end leave no stale
    entry and miss none."""
    ts = (TrafficSelector.from_network("10.0.0.0/24"), TrafficSelector.from_network("10.1.0.0/24"))
    nat = ("203.0.113.7", 500)  # the initiator is behind a NAT (on 4500 after IKE_SA_INIT)
    p = Pair(
        *configs(
            r_peer_addr=nat,
            i_local_ts=ts[:1],
            i_remote_ts=ts[1:],
            r_local_ts=ts[1:],
            r_remote_ts=ts[:1],
        )
    )
    p.i_src, p.i_src_4500 = ("203.0.113.7", 1024), ("203.0.113.7", 1025)
    p.handshake()
    assert p.r.nat_t
    _filed_as_scanned(p.ep)
    p.i.create_child(p.now)
    p.roundtrip()
    assert len(p.r.children) == 2
    _filed_as_scanned(p.ep)
    p.r.rekey_child(1, p.now)
    p.roundtrip()
    assert sorted(p.r.children) == [2, 3]
    _filed_as_scanned(p.ep)
    old_spi = p.r.ch.local_spi
    p.i.rekey_ike(p.now)
    p.roundtrip()
    assert p.r.ch.local_spi != old_spi and old_spi not in p.ep._by_spi
    _filed_as_scanned(p.ep)
    p.i_src_4500 = ("203.0.113.8", 2048)  # the NAT maps the initiator to another address
    p.i.liveness_check(p.now)
    p.roundtrip()
    assert p.r.peer_addr == ("203.0.113.8", 2048)
    _filed_as_scanned(p.ep)
    p.i.delete(p.now)
    p.roundtrip()
    assert not p.ep.sas
    assert not p.ep._by_spi and not p.ep._child_spis and not p.ep._by_child_out


def test_a_config_shared_by_three_sas_lists_them_until_each_goes() -> None:
    """One config answers three peers (the endpoint's find_config): sas_of lists
    them in order while two or more are up, and the last one alone; find_sa
    finds each by name; a deleted SA is no longer found."""
    shared = responder_configs(1)[0]
    ep = IkeEndpoint([], rng=random.Random(3).randbytes, find_config=lambda a, loc: shared)
    sas = {peer(i): initiator(dataclasses.replace(shared, peer_addr=peer(i)), i) for i in range(3)}
    for sa in sas.values():
        sa.initiate(0.0)
    exchange(ep, sas, 0.0)
    assert all(sa.established for sa in sas.values())
    ours = list(ep.sas)
    assert ep.sas_of(shared) == ours and len(ours) == 3
    assert all(ep.find_sa(sa.name) is sa for sa in ours)
    for gone in range(2):
        sas[peer(gone)].delete(1.0)
        exchange(ep, sas, 1.0)
        assert ep.sas_of(shared) == ours[gone + 1 :]
        assert ep.find_sa(ours[gone].name) is None
    assert ep.find_sa(ours[2].name) is ours[2]
    sas[peer(2)].delete(2.0)
    exchange(ep, sas, 2.0)
    assert ep.sas_of(shared) == [] and not ep._by_config and not ep._by_name
