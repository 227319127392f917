"""SIGHUP with one crypto map changed among many (issue #19 item 7): the work
follows the change, not the number of maps.

A responder :class:`Manager` for N peers (one ACL, peer and identity each, as
tools/bench/config_scale.py generates them), some of them established through
in-memory initiators on our engine. A reload changes one established map and
one idle one, at N = 20 and N = 300: the unchanged maps keep their state
objects, IKE SAs, Child SAs and data-path bindings; what is redone (map states
built, SAs deleted, DELETEs sent, ACLs parsed, fail-closed prefixes touched,
classifier rebuilt, configs indexed and dropped in the IKE endpoint, the
tracer's peer table) is counted and the same at both sizes.
"""

from __future__ import annotations

import copy
import dataclasses
import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest

import ike
import npusim
from ike.constants import ExchangeType
from ike.payloads import parse_header
from ipsecmgr import config as cfg
from ipsecmgr import reload
from ipsecmgr.daemon import build_classifier, parse_acls, validate_acl
from ipsecmgr.datapath import Datapath
from ipsecmgr.failclosed import ProtectedPrefixes, protected_prefixes
from ipsecmgr.manager import Manager
from ipsecmgr.records import Address
from ipsecmgr.trace import PeerTable, peers_from_config

GW = "2001:db8::1"
SERVER = "2001:db8:ffff::49"
PSK_ENV = "RELOAD_SCALE_PSK"
ENV = {PSK_ENV: "reload-scale-test-psk-0123456789"}
UP = 4  # maps established before the reload: m0..m3


def peer(i: int) -> str:
    return f"2001:db8:1::{i + 1:x}"


def config_data(n: int, dpd: dict[int, int] | None = None) -> dict[str, Any]:
    """N responder maps; ``dpd``: map index -> a DPD interval other than the default."""
    lines = [
        "[ike_transform_set.ike]\ndh_group = 31\n",
        '[ipsec_transform_set.esp]\nmode = "tunnel"\n',
        f'[gateway]\nlocal_addresses = ["{GW}"]\n',
    ]
    for i in range(n):
        extra = f"dpd = {{ interval = {dpd[i]} }}\n" if dpd and i in dpd else ""
        lines.append(
            f'[access_list.a{i}]\nrules = ["permit ipv6 host {SERVER} host {peer(i)}"]\n'
            f'[crypto_map.m{i}]\nmatch_address = "a{i}"\npeer = "{peer(i)}"\n'
            f'role = "responder"\nlocal_psk = {{ env = "{PSK_ENV}" }}\n'
            f'ike_transform_sets = ["ike"]\nipsec_transform_sets = ["esp"]\n{extra}'
        )
    lines.append("[tun.t]\ncrypto_maps = [" + ", ".join(f'"m{i}"' for i in range(n)) + "]\n")
    return tomllib.loads("\n".join(lines))


def parse(data: dict[str, Any]) -> cfg.Config:
    d = cfg.parse_config(data, environ=ENV, validate_acl=validate_acl)
    assert d.config is not None, d.errors[:3]
    return d.config


class NullSock:
    def sendto(self, data: bytes, addr: Address) -> int:
        return len(data)


class Responder:
    """The Manager as the daemon builds it, without sockets, TUN and kernel."""

    def __init__(self, config: cfg.Config) -> None:
        self.config = config
        self.acls = parse_acls(config)
        self.saflow = npusim.SaFlowTable()
        sock = NullSock()
        esp_socks: dict[int, Any] = {socket.AF_INET: sock, socket.AF_INET6: sock}
        self.datapath = Datapath(
            build_classifier(config, self.acls), self.saflow, esp_socks, {}, lambda n, p: None
        )
        self.sent: list[tuple[bytes, Address]] = []
        self.manager = Manager(config, self.acls, self.datapath, self._send)

    def _send(self, data: bytes, dst: Address, local: Address | None) -> None:
        self.sent.append((data, dst))

    def establish(self, names: list[str], now: float) -> None:
        """One in-memory initiator per map (the mirrored IkeConfig), until up."""
        for name in names:
            c = self.manager.maps[name].ike_config
            mine = dataclasses.replace(
                c, local_addr=c.peer_addr, peer_addr=c.local_addr, local_id=c.remote_id,
                remote_id=c.local_id, local_psk=c.peer_psk, remote_psk=c.local_psk,
                local_ts=c.remote_ts, remote_ts=c.local_ts, name="i",
            )  # fmt: skip
            sa = ike.IkeSA(mine, True)
            sa.initiate(now)
            for _ in range(4):
                for data, _ in sa.datagrams_to_send(now):
                    self.manager.on_ike_datagram(data, c.local_addr, mine.local_addr, now)
                answers, self.sent = self.sent, []
                for data, _ in answers:
                    sa.receive_datagram(data, c.local_addr, now)
            assert sa.established and sa.children, name
            assert self.manager.maps[name].status == "established"


@pytest.mark.parametrize("n", [20, 300])
def test_sighup_one_map_changed_redoes_one_maps_work(n: int) -> None:
    old = parse(config_data(n))
    r = Responder(old)
    r.establish([f"m{i}" for i in range(UP)], 100.0)
    m = r.manager
    states = dict(m.maps)
    sas = {name: states[name].ike_sa for name in states}
    children = {name: states[name].children for name in states}
    outbound = dict(r.datapath.outbound)
    spis = {name: [c.inbound.spi for c in children[name]] for name in children}
    assert all(len(spis[f"m{i}"]) == 1 for i in range(UP))

    # m1 (established) and m7 (idle) get another DPD interval: their SAs must go
    new = parse(config_data(n, dpd={1: 15, 7: 20}))
    diff = reload.MapDiff.of(old, new)
    assert diff.changed == {"m1", "m7"} and not diff.added and not diff.removed
    assert len(diff.kept) == n - 2
    acls, parsed = reload.reuse_acls(old, r.acls, new)
    assert parsed == 0 and all(acls[a] is r.acls[a] for a in acls)  # the running objects
    touched = diff.changed | diff.added | diff.removed
    assert not reload.classifier_changed(old, new, touched)  # no rebuild
    assert m.endpoint.caches.sizes()["psk_keys"] == 1
    old_configs = {name: states[name].ike_config for name in ("m1", "m7")}

    m.reconfigure(new, acls, set(diff.kept), 101.0)
    work = m.last_reload
    assert sorted(work.built) == ["m1", "m7"]
    assert [s.cmap.name for s in work.dropped] == ["m1", "m7"]
    assert (work.kept, work.sas_deleted, work.children_removed) == (n - 2, 1, 1)
    # The endpoint's config index: the two maps' configs out and in, not rebuilt
    assert (work.configs_indexed, work.configs_dropped, work.index_rebuilt) == (2, 2, False)
    assert len(m.endpoint.configs) == n
    for name, i in (("m1", 1), ("m7", 7)):
        found = m.endpoint.config_for((peer(i), 500), None)
        assert found is m.maps[name].ike_config and found is not old_configs[name]
    assert m.endpoint.config_for((peer(2), 500), None) is states["m2"].ike_config
    # the changed maps' PSK (the one PSK of this file) was dropped, derived on demand
    assert m.endpoint.caches.sizes()["psk_keys"] == 0
    # One DELETE, to m1's peer, and nothing to anybody else
    assert [dst[0] for _, dst in r.sent] == [peer(1)]
    assert parse_header(r.sent[0][0]).exchange == ExchangeType.INFORMATIONAL
    for name, state in m.maps.items():
        if name in ("m1", "m7"):
            assert state is not states[name] and state.ike_sa is None
            assert state.cmap.dpd.interval in (15, 20)
            continue
        # the same objects: SAs, Child SAs, counters untouched
        assert state is states[name] and state.ike_sa is sas[name]
        assert state.children == children[name]
    for i in (0, 2, 3):
        assert m.maps[f"m{i}"].ike_sa is not None and m.maps[f"m{i}"].ike_sa.established
        assert r.datapath.outbound[f"m{i}"] is outbound[f"m{i}"]
    assert "m1" not in r.datapath.outbound
    # m1's old state had a deadline (its DPD and volume looks): gone with it; the
    # kept established maps keep theirs
    assert states["m1"] not in m.looks
    assert all(m.maps[f"m{i}"] in m.looks for i in (0, 2, 3))
    for i in range(UP):  # the SA-flow table: m1's inbound SPI gone, the others there
        (spi,) = spis[f"m{i}"]
        assert (r.saflow.lookup(spi) is None) == (i == 1)
    # the responder still answers the changed map's peer with its new config
    r.sent.clear()
    r.establish(["m1"], 102.0)


def test_unchanged_reload_does_nothing() -> None:
    old = parse(config_data(50))
    r = Responder(old)
    r.establish(["m0"], 100.0)
    new = parse(config_data(50))
    diff = reload.MapDiff.of(old, new)
    assert len(diff.kept) == 50 and not (diff.changed | diff.added | diff.removed)
    r.manager.reconfigure(new, r.acls, set(diff.kept), 101.0)
    work = r.manager.last_reload
    assert (work.built, work.dropped, work.sas_deleted) == ([], [], 0)
    assert r.sent == []


@pytest.mark.parametrize("n", [20, 300])
def test_acls_and_fail_closed_prefixes_follow_the_change(n: int) -> None:
    """One ACL edited, one map added, one removed: one ACL parsed, the prefixes
    blocked and unblocked are exactly those of the touched maps."""
    old = parse(config_data(n))
    old_acls = parse_acls(old)
    blocks = ProtectedPrefixes(old, old_acls)
    assert blocks.prefixes() == protected_prefixes(old, old_acls)[0]
    data = config_data(n)
    data["access_list"]["a3"]["rules"] = [f"permit ipv6 host {SERVER} host 2001:db8:3::3"]
    del data["crypto_map"]["m5"], data["access_list"]["a5"]
    data["tun"]["t"]["crypto_maps"].remove("m5")
    # a new map protecting the same destination as m6: m6's block must stay
    data["crypto_map"]["extra"] = dict(data["crypto_map"]["m6"], peer="2001:db8:9::9")
    data["tun"]["t"]["crypto_maps"].append("extra")
    new = parse(data)
    diff = reload.MapDiff.of(old, new)
    assert (diff.changed, diff.added, diff.removed) == ({"m3"}, {"extra"}, {"m5"})
    acls, parsed = reload.reuse_acls(old, old_acls, new)
    assert parsed == 1
    block, unblock = blocks.update(new, acls, diff.changed | diff.added | diff.removed)
    assert block == ["2001:db8:3::3/128"]
    assert sorted(unblock) == sorted([f"{peer(3)}/128", f"{peer(5)}/128"])
    assert sorted(blocks.prefixes()) == sorted(protected_prefixes(new, acls)[0])
    assert reload.classifier_changed(old, new, diff.changed | diff.added | diff.removed)

    # The Manager: the touched maps' configs leave and enter the endpoint's index
    r = Responder(old)
    r.manager.reconfigure(new, acls, set(diff.kept), 101.0)
    work = r.manager.last_reload
    assert sorted(work.built) == ["extra", "m3"]
    assert sorted(s.cmap.name for s in work.dropped) == ["m3", "m5"]
    assert (work.configs_indexed, work.configs_dropped, work.index_rebuilt) == (2, 2, False)
    ep = r.manager.endpoint
    assert len(ep.configs) == n
    assert ep.config_for((peer(5), 500), None) is None
    assert ep.config_for(("2001:db8:9::9", 500), None) is r.manager.maps["extra"].ike_config
    assert ep.config_for((peer(3), 500), None) is r.manager.maps["m3"].ike_config
    assert list(r.manager.maps) == list(new.crypto_maps)


def test_a_new_map_for_a_peer_another_map_has_keeps_the_file_order() -> None:
    """Two maps for one peer: the first in the file answers, as at start; the
    endpoint's index is then built again (the one case where it is)."""
    old = parse(config_data(20))
    r = Responder(old)
    data = config_data(20)
    data["crypto_map"]["again"] = dict(data["crypto_map"]["m2"], match_address="a3")
    data["tun"]["t"]["crypto_maps"].append("again")
    new = parse(data)
    diff = reload.MapDiff.of(old, new)
    assert diff.added == {"again"} and not diff.changed
    r.manager.reconfigure(new, r.acls, set(diff.kept), 101.0)
    work = r.manager.last_reload
    assert work.index_rebuilt and work.built == ["again"]
    ep = r.manager.endpoint
    assert ep.config_for((peer(2), 500), None) is r.manager.maps["m2"].ike_config
    assert [id(c) for c in ep.configs] == [id(s.ike_config) for s in r.manager.maps.values()]


def test_a_moved_map_rebuilds_the_classifier() -> None:
    """The classifier's first match follows the maps' order: a move is a change."""
    old = parse(config_data(5))
    data = config_data(5)
    data["crypto_map"] = dict(reversed(list(data["crypto_map"].items())))
    new = parse(data)
    assert list(new.crypto_maps) == [f"m{i}" for i in reversed(range(5))]
    assert reload.classifier_changed(old, new, ())
    assert not reload.classifier_changed(old, parse(config_data(5)), ())


@pytest.mark.parametrize("n", [20, 300])
def test_tracer_peer_table_follows_the_change(n: int) -> None:
    """The tracer's peer address -> crypto map table after a reload is what it
    would be built from the new file, with only the touched maps looked at."""
    old = parse(config_data(n))
    table = PeerTable(old)
    data = config_data(n)
    data["crypto_map"]["m3"]["peer"] = "2001:db8:9::3"
    del data["crypto_map"]["m5"], data["access_list"]["a5"]
    data["tun"]["t"]["crypto_maps"].remove("m5")
    data["crypto_map"]["extra"] = dict(data["crypto_map"]["m6"], peer="2001:db8:9::9")
    data["tun"]["t"]["crypto_maps"].append("extra")
    new = parse(data)
    before = table.peers
    assert not table.update(old, new, {"m3", "m5", "extra"})
    assert table.peers is before and table.peers == peers_from_config(new)
    # a peer shared by two maps: the table is built again (the last map is named)
    data["crypto_map"]["twin"] = dict(data["crypto_map"]["m8"])
    data["tun"]["t"]["crypto_maps"].append("twin")
    newer = parse(data)
    assert table.update(new, newer, {"twin"})
    assert table.peers == peers_from_config(newer)
    assert table.peers[peer(8)].crypto_map == "twin"
    assert table.update(newer, new, {"twin"})  # twin leaves: m8 named again
    assert table.peers == peers_from_config(new) and table.peers[peer(8)].crypto_map == "m8"


def test_a_psk_file_rewritten_under_the_same_name_is_a_change(tmp_path: Path) -> None:
    """The file says the same (``local_psk = { file = ... }``), the key file does
    not: the map is changed (its SAs were authenticated with the old key), the
    others kept."""
    key = tmp_path / "psk-m2"
    key.write_bytes(b"the-first-psk-of-m2-0123456789")
    key.chmod(0o600)
    data = config_data(20)
    data["crypto_map"]["m2"]["local_psk"] = {"file": str(key)}

    def load() -> cfg.Config:
        d = cfg.parse_config(data, base_dir=tmp_path, environ=ENV, validate_acl=validate_acl)
        assert d.config is not None, d.errors[:3]
        return d.config

    old = load()
    assert not (reload.MapDiff.of(old, load()).changed)  # the same key: nothing to do
    key.write_bytes(b"the-second-psk-of-m2-012345678")
    diff = reload.MapDiff.of(old, load())
    assert diff.changed == {"m2"} and len(diff.kept) == 19
    # and a key from the environment likewise (every map here shares that one)
    other = cfg.parse_config(data, base_dir=tmp_path, environ={PSK_ENV: "x" * 32},
                             validate_acl=validate_acl).config  # fmt: skip
    assert other is not None
    assert reload.MapDiff.of(load(), other).changed == {f"m{i}" for i in range(20)} - {"m2"}


def test_a_changed_transform_set_or_tun_changes_only_its_maps() -> None:
    """The sections a map names are compared once each: a transform set changes
    the maps that use it, a map moved to another TUN is changed, the rest kept."""
    data = config_data(20)
    data["ike_transform_set"]["ike2"] = {"dh_group": 31}
    data["ipsec_transform_set"]["esp2"] = {"mode": "tunnel"}
    data["crypto_map"]["m4"]["ike_transform_sets"] = ["ike2"]
    data["crypto_map"]["m5"]["ipsec_transform_sets"] = ["esp2"]
    data["tun"]["u"] = {"crypto_maps": ["m6"]}
    data["tun"]["t"]["crypto_maps"].remove("m6")
    old = parse(data)
    assert reload.MapDiff.of(old, parse(data)).kept == set(old.crypto_maps)
    edited = copy.deepcopy(data)
    edited["ike_transform_set"]["ike2"]["dh_group"] = 14
    edited["ipsec_transform_set"]["esp2"]["lifetime_seconds"] = 1800
    edited["tun"]["t"]["crypto_maps"].remove("m7")
    edited["tun"]["u"]["crypto_maps"].append("m7")
    diff = reload.MapDiff.of(old, parse(edited))
    assert (diff.changed, diff.added, diff.removed) == ({"m4", "m5", "m7"}, set(), set())
    assert len(diff.kept) == 17
    # a TUN's list reordered binds no map elsewhere: nothing changed
    edited = copy.deepcopy(data)
    edited["tun"]["t"]["crypto_maps"].reverse()
    assert reload.MapDiff.of(old, parse(edited)).kept == set(old.crypto_maps)


@pytest.mark.parametrize("n", [20, 300])
def test_sighup_ends_the_hold_downs_of_kept_maps_looking_only_at_those(n: int) -> None:
    """SIGHUP is the operator's "try again" (#15.5): every peer's hold-down ends,
    those of kept maps too. Only the maps with a hold-down are reset, not all n:
    the same count at both sizes (ReloadWork.hold_downs_ended)."""
    r = Responder(parse(config_data(n)))
    r.establish(["m0", "m1", "m2"], 100.0)
    m = r.manager
    t = 100.0
    while not all(m.maps[f"m{i}"].peers.failed_once() for i in range(3)):
        t += 1.0  # nobody answers DPD: the three peers are found dead (RFC 7296 §2.4)
        assert t < 400.0
        m.on_timer(t)
    held = {i: m.maps[f"m{i}"].peers for i in range(3)}
    assert all(held[i].all_held(t) for i in range(3))
    assert m.failover.rows(t)["m0"]["peers"][0]["state"] == "dead"
    # m1 changed (rebuilt: a fresh peer list), m0 and m2 kept with their hold-downs
    new = parse(config_data(n, dpd={1: 15}))
    diff = reload.MapDiff.of(r.config, new)
    m.reconfigure(new, r.acls, set(diff.kept), t)
    assert m.last_reload.hold_downs_ended == 3  # the three lists that had one, not n
    for i in (0, 2):
        assert m.maps[f"m{i}"].peers is held[i]  # kept ...
        peer_row = m.failover.rows(t)[f"m{i}"]["peers"][0]
        assert (peer_row["state"], peer_row["failures"]) == ("standby", 0)  # ... and free
        assert not held[i].all_held(t) and held[i].choose(t) is not None
    assert not m.maps["m1"].peers.failed_once()
    m.reconfigure(new, r.acls, set(new.crypto_maps), t)  # nothing held any more
    assert m.last_reload.hold_downs_ended == 0
