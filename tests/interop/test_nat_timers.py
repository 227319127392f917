"""NAT traversal in the manager, without root: two managers in memory, a NAPT
between them, a fake clock (no sockets, no sleeps).

The NAPT rewrites the initiator's source ports (500 → 1500, 4500 → 14500),
like the nftables NAT of test_nat.py, so the engines' NAT detection sees a
real NAT: the initiator is behind it, the responder is not. What is checked
is what the daemon then does: float to 4500, keepalives (one 0xFF octet)
only from the side behind the NAT at the configured interval, rebinding of
ESP when the mapping changes, rekeys at 90 % of short lifetimes, and
``encapsulation = "never"`` staying on raw ESP.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import npusim
from esp.udp_encap import NAT_KEEPALIVE
from ipsecmgr import config as cfg
from ipsecmgr.daemon import parse_acls
from ipsecmgr.datapath import Datapath
from ipsecmgr.lab.configs import lab_gateway_config
from ipsecmgr.lab.topology import LabAddresses
from ipsecmgr.manager import Manager
from ipsecmgr.records import Address

A = LabAddresses.for_mode("tunnel")
NON_ESP_MARKER = b"\x00" * 4


@dataclass
class FakeSock:
    """Stands for the raw ESP socket (port 0) or the UDP 4500 socket."""

    kind: str
    sent: list[tuple[bytes, Address]] = field(default_factory=list)
    family: int = socket.AF_INET

    def sendto(self, data: bytes, addr: Address) -> int:
        self.sent.append((data, addr))
        return len(data)


class Side:
    def __init__(self, tmp: Path, side: str, **options: Any) -> None:
        psk = tmp / "psk"
        psk.write_bytes(b"timers-psk-0123456789")
        psk.chmod(0o600)
        path = tmp / f"{side}.toml"
        path.write_text(
            lab_gateway_config(A, side, psk_file=psk, management_interface="eth0", **options)
        )
        config = cfg.load_config(path)
        acls = parse_acls(config)
        saflow = npusim.SaFlowTable()
        classifier = npusim.Classifier([])
        self.raw, self.udp = FakeSock("raw"), FakeSock("udp4500")
        self.local = A.client_wan4 if side == "client" else A.gw_wan4
        raw: dict[int, Any] = {socket.AF_INET: self.raw}
        self.datapath = Datapath(classifier, saflow, raw, {}, lambda n, p: None)
        self.datapath.add_natt_socket((self.local, 4500), self.udp, False)  # type: ignore[arg-type]
        self.outbox: list[tuple[bytes, Address]] = []
        self.manager = Manager(config, acls, self.datapath, self._send)

    def _send(self, data: bytes, peer: Address, local: Address | None) -> None:
        self.outbox.append((data, peer))

    @property
    def map(self) -> Any:
        return self.manager.maps["tacacs"]


class Wire:
    """Carries IKE between client and gw through a NAPT in front of the client."""

    def __init__(self, client: Side, gw: Side) -> None:
        self.client, self.gw = client, gw
        self.ports = {500: 1500, 4500: 14500}

    def run(self, now: float) -> None:
        for _ in range(20):
            if not (self.client.outbox or self.gw.outbox):
                return
            out, self.client.outbox = self.client.outbox, []
            for data, (_, dport) in out:
                sport = 4500 if data[:4] == NON_ESP_MARKER else 500
                self.gw.manager.on_ike_datagram(
                    data, (A.gw_wan4, dport), (A.client_wan4, self.ports[sport]), now
                )
            back, self.gw.outbox = self.gw.outbox, []
            for data, (_, dport) in back:
                # the NAPT maps the reply back; a stale mapping is dropped
                inside = {v: k for k, v in self.ports.items()}.get(dport)
                if inside is not None:
                    sport = 4500 if data[:4] == NON_ESP_MARKER else 500
                    self.client.manager.on_ike_datagram(
                        data, (A.client_wan4, inside), (A.gw_wan4, sport), now
                    )


def _up(
    tmp: Path,
    client_opts: dict[str, Any] | None = None,
    nat: bool = True,
    **gw_opts: Any,
) -> Wire:
    client = Side(tmp, "client", **(client_opts or {}))
    gw = Side(tmp, "gw", **gw_opts)
    wire = Wire(client, gw)
    if not nat:
        wire.ports = {500: 500, 4500: 4500}
    packet = bytes(20)  # the first packet only triggers IKE (first_packet = "drop")
    client.manager.on_no_sa("tacacs", packet, 0.0)
    wire.run(0.0)
    assert client.map.status == "established" and gw.map.status == "established"
    return wire


def test_behind_the_nat_we_float_and_send_keepalives(tmp_path: Path) -> None:
    wire = _up(tmp_path, {"map_options": {"nat_keepalive": 5.0}})
    c, g = wire.client, wire.gw
    assert c.map.ike_sa.nat_detected_local and c.map.ike_sa.nat_t
    assert g.map.ike_sa.nat_detected_remote and not g.map.ike_sa.nat_detected_local
    # ESP in UDP both ways, to the ports the NAT shows
    assert c.datapath.outbound["tacacs"].peer == (A.gw_wan4, 4500)
    assert g.datapath.outbound["tacacs"].peer == (A.client_wan4, 14500)
    assert c.datapath.outbound["tacacs"].sock is c.udp
    # keepalives: the client's timer is due at +5 s, then every 5 s; the gw sends none
    assert c.map.keepalive_at == 5.0  # (DPD also looks at the ESP counters every 3 s)
    for t in (5.0, 10.0, 15.0):
        c.manager.on_timer(t)
        g.manager.on_timer(t)
    assert c.udp.sent == [(NAT_KEEPALIVE, (A.gw_wan4, 4500))] * 3
    assert NAT_KEEPALIVE == b"\xff"
    assert g.udp.sent == [] and g.map.counters.get("nat_keepalives_sent", 0) == 0
    assert c.map.counters["nat_keepalives_sent"] == 3


def test_default_keepalive_interval_is_20_seconds(tmp_path: Path) -> None:
    wire = _up(tmp_path)
    assert wire.client.map.cmap.nat_keepalive == 20.0
    assert wire.client.map.keepalive_at == 20.0
    assert wire.gw.map.keepalive_at is None


def test_rebinding_moves_esp_to_the_new_port(tmp_path: Path) -> None:
    wire = _up(tmp_path, {"map_options": {"dpd": {"interval": 2.0}}})
    c, g = wire.client, wire.gw
    assert g.datapath.outbound["tacacs"].peer == (A.client_wan4, 14500)
    binding = g.datapath.outbound["tacacs"]
    wire.ports = {500: 1600, 4500: 24500}  # the NAT forgot us and chose new ports
    c.manager.on_timer(2.0)  # our liveness check (an authenticated request)
    wire.run(2.0)
    assert c.map.counters["liveness_checks"] == 1
    assert g.map.ike_sa.peer_addr == (A.client_wan4, 24500)
    assert g.datapath.outbound["tacacs"] is binding  # updated in place, same SA
    assert binding.peer == (A.client_wan4, 24500)
    assert g.map.counters["nat_rebinding"] == 1
    assert c.map.ike_sa.counters.get("liveness_ok") == 1  # the answer found its way back


def test_unauthenticated_datagram_does_not_move_the_peer(tmp_path: Path) -> None:
    wire = _up(tmp_path)
    g = wire.gw
    junk = NON_ESP_MARKER + g.map.ike_sa.spi_i + g.map.ike_sa.spi_r + bytes(40)
    g.manager.on_ike_datagram(junk, (A.gw_wan4, 4500), (A.client_wan4, 31337), 1.0)
    assert g.datapath.outbound["tacacs"].peer == (A.client_wan4, 14500)
    assert "nat_rebinding" not in g.map.counters


def test_no_nat_no_float(tmp_path: Path) -> None:
    wire = _up(tmp_path, nat=False)
    c, g = wire.client, wire.gw
    assert not c.map.ike_sa.nat_t and not g.map.ike_sa.nat_t
    assert c.datapath.outbound["tacacs"].sock is c.raw
    assert g.datapath.outbound["tacacs"].peer == (A.client_wan4, 0)
    assert c.map.keepalive_at is None and g.map.keepalive_at is None


def test_encapsulation_never_stays_on_raw_esp(tmp_path: Path) -> None:
    never = {"map_options": {"encapsulation": "never"}}
    wire = _up(tmp_path, never, **never)
    c, g = wire.client, wire.gw
    assert not c.map.ike_sa.nat_t and not g.map.ike_sa.nat_t
    assert c.datapath.outbound["tacacs"].sock is c.raw
    assert c.datapath.outbound["tacacs"].peer == (A.gw_wan4, 0)
    assert c.map.keepalive_at is None


def test_short_lifetimes_rekey_at_90_percent(tmp_path: Path) -> None:
    opts = {"ike_options": {"lifetime": 10}, "ipsec_options": {"lifetime_seconds": 4}}
    wire = _up(tmp_path, opts)
    c = wire.client
    assert c.map.ike_config.ike_lifetime == 10.0 and c.map.ike_config.child_lifetime == 4.0
    # The engine owns the soft lifetime (90 % of 4 s) and its jitter, which moves it
    # up to 5 % of the lifetime earlier (ike.lifetimes, docs/recovery.md)
    (child,) = c.map.ike_sa.children.values()
    assert 3.4 <= child.rekey_at <= 3.6
    c.manager.on_timer(3.6)
    wire.run(3.6)
    assert c.map.counters["child_rekey_started"] == 1 and c.map.counters["child_rekeyed"] == 1
    assert wire.gw.map.counters["child_rekeyed"] == 1
    c.manager.on_timer(9.0)
    wire.run(9.0)
    assert c.map.counters["ike_rekey_started"] == 1 and c.map.counters["ike_rekeyed"] == 1
    # the next IKE rekey is scheduled from the rekey, not from the first setup
    assert 17.5 <= c.map.ike_sa.ike_rekey_at <= 18.0


def test_encapsulation_always_floats_without_a_nat(tmp_path: Path) -> None:
    """strongSwan's encap = yes: a fake NAT_DETECTION_SOURCE_IP makes the peer
    see a NAT, so both sides float although none is behind one."""
    wire = _up(tmp_path, {"map_options": {"encapsulation": "always"}}, nat=False)
    c, g = wire.client, wire.gw
    assert not c.map.ike_sa.nat_detected_local  # no NAT really
    assert c.map.ike_sa.nat_t and g.map.ike_sa.nat_t
    assert g.map.ike_sa.nat_detected_remote  # the fake hash
    assert c.datapath.outbound["tacacs"].sock is c.udp
    assert g.datapath.outbound["tacacs"].sock is g.udp


def test_authentic_esp_from_a_new_port(tmp_path: Path) -> None:
    """The daemon calls on_esp_from only for ESP that decrypted; the side not
    behind the NAT moves there (§2.23), the side behind it keeps its mapping."""
    wire = _up(tmp_path)
    c, g = wire.client, wire.gw
    g.manager.on_esp_from("tacacs", (A.client_wan4, 24500))
    assert g.datapath.outbound["tacacs"].peer == (A.client_wan4, 24500)
    assert g.map.ike_sa.peer_addr == (A.client_wan4, 24500)
    assert g.map.counters["nat_rebinding"] == 1
    c.manager.on_esp_from("tacacs", (A.gw_wan4, 4501))  # we are behind the NAT: ignore
    assert c.datapath.outbound["tacacs"].peer == (A.gw_wan4, 4500)
    assert "nat_rebinding" not in c.map.counters


def test_short_lifetimes_are_accepted_with_a_warning(tmp_path: Path) -> None:
    opts = {"ike_options": {"lifetime": 3}, "ipsec_options": {"lifetime_seconds": 2}}
    side = Side(tmp_path, "client", **opts)
    warnings = side.manager.config.warnings
    assert "ike_transform_set.lab.lifetime: 3 s is very short" in " ".join(warnings)
    assert "ipsec_transform_set.lab.lifetime_seconds: 2 s is very short" in " ".join(warnings)
    too_short = {"ipsec_options": {"lifetime_seconds": 1}}
    with pytest.raises(cfg.ConfigError, match=r"lifetime_seconds: 1 is out of range"):
        Side(tmp_path, "client", **too_short)
