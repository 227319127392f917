"""Steps 4 and 5 and the IKE events, from two real managers talking in memory."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

import esp
import npusim
from ipsecmgr.config import load_config
from ipsecmgr.daemon import parse_acls, validate_acl
from ipsecmgr.datapath import Datapath
from ipsecmgr.lab.configs import lab_gateway_config
from ipsecmgr.lab.topology import LabAddresses
from ipsecmgr.manager import Manager
from ipsecmgr.trace import Event, Peer, Tracer

from .test_trace import FakeSock, reply, syn

A = LabAddresses("tunnel")
NOW = 100.0


class Side:
    def __init__(self, tmp: Path, side: str) -> None:
        psk = tmp / "psk"
        psk.write_bytes(b"lab-psk-0123456789")
        psk.chmod(0o600)
        conf = tmp / f"{side}.toml"
        conf.write_text(lab_gateway_config(A, side, psk_file=psk, management_interface="wan0"))
        config = load_config(conf, validate_acl=validate_acl)
        acls = parse_acls(config)
        classifier = npusim.Classifier(
            [npusim.CryptoMap(n, acls[m.match_address], (str(m.peer),))
             for n, m in config.crypto_maps.items()]
        )  # fmt: skip
        self.saflow = npusim.SaFlowTable()
        self.esp_sock = FakeSock()
        self.dp = Datapath(
            classifier,
            self.saflow,
            {socket.AF_INET: self.esp_sock},
            {},
            lambda n, p: None,  # type: ignore[dict-item]
        )
        self.out: list[tuple[bytes, tuple[str, int]]] = []
        self.mgr = Manager(config, acls, self.dp, lambda d, p, _: self.out.append((d, p)))
        self.local = A.client_wan4 if side == "client" else A.gw_wan4
        peers = {str(m.peer): Peer(str(m.local_address), n) for n, m in config.crypto_maps.items()}
        self.tracer = Tracer([self.dp, self.mgr], peers)
        self.sub = self.tracer.subscribe({})

    def events(self) -> list[Event]:
        out = []
        while not self.sub.queue.empty():
            item = self.sub.queue.get_nowait()
            if item is not None:
                out.append(item)
        return out


def exchange(a: Side, b: Side) -> None:
    """Move IKE datagrams between the two managers until both are quiet."""
    for _ in range(20):
        moved = False
        for src, dst in ((a, b), (b, a)):
            out, src.out = src.out, []
            for data, _peer in out:
                dst.mgr.on_ike_datagram(data, (dst.local, 500), (src.local, 500), NOW)
                moved = True
        if not moved:
            return


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Side, Side]:
    (tmp_path / "c").mkdir()
    (tmp_path / "g").mkdir()
    return Side(tmp_path / "c", "client"), Side(tmp_path / "g", "gw")


def test_first_packet_triggers_ike_and_is_dropped_all_in_its_flow(pair: Any) -> None:
    client, gw = pair
    first = syn()
    client.mgr.on_no_sa("tacacs", first, NOW)
    exchange(client, gw)
    evs = client.events()
    summary = [(e["step"], e["event"], e.get("exchange"), e.get("response")) for e in evs]
    assert summary == [
        ("4", "ike_triggered", None, None),
        ("5", "first_packet_dropped", None, None),
        ("4", "ike_sent", "IKE_SA_INIT", False),
        ("4", "ike_received", "IKE_SA_INIT", True),
        ("4", "ike_sent", "IKE_AUTH", False),
        ("4", "ike_received", "IKE_AUTH", True),
        ("4", "ike_sa_up", None, None),
        ("4", "child_sa_installed", None, None),
    ]
    assert len({e["flow"] for e in evs}) == 1 and evs[0]["tcp_flags"] == "S"
    assert evs[2]["payloads"].startswith("SA, KE, Nonce")
    # IKE_AUTH is decrypted for the summary (RFC 7296 §1.2 payloads)
    assert evs[4]["payloads"] == "SK{IDi, N(INITIAL_CONTACT), IDr, AUTH, SA, TSi(1), TSr(1)}"
    assert evs[5]["payloads"] == "SK{IDr, AUTH, SA, TSi(1), TSr(1)}"
    assert evs[2]["local"] == A.client_wan4 and evs[2]["peer"] == A.gw_wan4
    assert bytes.fromhex(evs[2]["wire"])[:8].hex() == evs[2]["ike_spi_i"]
    # The responder traced the same exchanges (it has no packet flow: "ike:<map>")
    gw_evs = gw.events()
    assert [e["event"] for e in gw_evs][:2] == ["ike_received", "ike_sent"]
    assert {e["flow"] for e in gw_evs} == {"ike:tacacs"}


def test_no_event_carries_a_key(pair: Any) -> None:
    client, gw = pair
    client.mgr.on_no_sa("tacacs", syn(), NOW)
    exchange(client, gw)
    text = repr(client.events()) + repr(client.mgr.maps["tacacs"].children)
    keys = client.mgr.export_keys()
    secrets = [r["key"] for r in keys["esp"]] + [r["sk_ei"] for r in keys["ike"]]
    assert len(secrets) == 3
    assert not any(s in text for s in secrets)


def test_exported_esp_keys_decrypt_what_the_sas_send(pair: Any) -> None:
    client, gw = pair
    client.mgr.on_no_sa("tacacs", syn(), NOW)
    exchange(client, gw)
    keys = client.mgr.export_keys()
    binding = client.dp.outbound["tacacs"]
    row = next(r for r in keys["esp"] if int(r["spi"], 16) == binding.sa.spi)
    assert (row["src"], row["dst"]) == (A.client_wan4, A.gw_wan4)
    wire = binding.sa.encapsulate(syn(), 4)
    inner, nh = esp.InboundSA(binding.sa.spi, bytes.fromhex(row["key"])).decapsulate(wire)
    assert (inner, nh) == (syn(), 4)
    # ... and the inbound row opens what the peer sends us
    gw_out = gw.dp.outbound["tacacs"]
    in_row = next(r for r in keys["esp"] if int(r["spi"], 16) == gw_out.sa.spi)
    assert (in_row["src"], in_row["dst"]) == (A.gw_wan4, A.client_wan4)
    wire = gw_out.sa.encapsulate(reply(), 4)
    assert esp.InboundSA(gw_out.sa.spi, bytes.fromhex(in_row["key"])).decapsulate(wire)[0] == (
        reply()
    )
    (ike_row,) = keys["ike"]
    assert ike_row["encryption"].startswith("AES-GCM") and ike_row["sk_ai"] == ""


def test_queue_mode_and_delete_events(pair: Any, tmp_path: Path) -> None:
    client, gw = pair
    client.mgr.maps["tacacs"].cmap = client.mgr.maps["tacacs"].cmap.__class__(
        **{**client.mgr.maps["tacacs"].cmap.__dict__, "first_packet": "queue"}
    )
    client.mgr.on_no_sa("tacacs", syn(), NOW)
    exchange(client, gw)
    evs = client.events()
    assert evs[1]["event"] == "first_packet_queued"
    # The queued SYN goes out as ESP once the Child SA is installed (step 7, same flow)
    assert evs[-1]["step"] == "7" and evs[-1]["flow"] == evs[0]["flow"]
    client.mgr.clear(NOW)
    exchange(client, gw)
    tail = client.events()
    assert ("ike", "ike_sent", "INFORMATIONAL") in [
        (e["step"], e["event"], e.get("exchange")) for e in tail
    ]
    assert "SK{D(IKE, 0 SPI)}" in [e.get("payloads") for e in tail]
    assert tail[-1]["event"] == "ike_sa_deleted" and tail[-1]["flow"] == "ike:tacacs"
