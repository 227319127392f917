"""A gateway with two local addresses of one family answers IKE from the right one.

RFC 7296 §2.11: a response "MUST specify the address and port at which the
request was received as the source address and port". The gateway (responder)
gets a second WAN address and its crypto map is bound to it; the client
initiates to that second address. Every IKE datagram the gateway sends must
leave from it, not from the family's first address (which the daemon used to
pick for every IKE datagram of the family).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP

from ipsecmgr.lab.capture import Capture
from ipsecmgr.lab.gateways import LabGateways
from ipsecmgr.lab.topology import Lab

pytestmark = [pytest.mark.root, pytest.mark.slow]

SECOND = "198.51.100.12"  # the gateway's second WAN address (the lab's WAN is a /24)


def _replace_line(conf: Path, start: str, line: str) -> None:
    lines = conf.read_text().splitlines()
    assert sum(ln.startswith(start) for ln in lines) == 1, start
    conf.write_text("\n".join(line if ln.startswith(start) else ln for ln in lines) + "\n")


def test_ike_answers_leave_from_the_address_the_peer_talks_to(tmp_path: Path) -> None:
    secret = tmp_path / "tacacs-secret"
    secret.write_bytes(b"two-addresses-key")
    secret.chmod(0o600)
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"alice": {"password": "alice-pw-2addr"}}))
    with Lab("tunnel") as lab, LabGateways(lab) as gws:
        a = lab.addresses
        gw_if = lab.interfaces["gw.wan"]
        lab.ns("gw").ip("addr", "add", f"{SECOND}/{a.wan_prefix4}", "dev", gw_if)
        # The gateway listens on both (its first address first), the map on the second
        gw_conf = gws.write_config("gw", map_options={"local_address": SECOND})
        _replace_line(gw_conf, "local_addresses", f'local_addresses = ["{a.gw_wan4}", "{SECOND}"]')
        client_conf = gws.write_config("client")
        _replace_line(client_conf, "peer = ", f'peer = "{SECOND}"')
        gws.start("gw", config=gw_conf)
        gws.start("client", config=client_conf)
        lab.start_tacacs_server("server", secret_file=secret, users_file=users)
        with Capture(lab.client, lab.interfaces["client.wan"], tmp_path / "wan.pcap",
                     "udp port 500 or udp port 4500") as cap:  # fmt: skip
            login = lab.tacacs_query("client", server=a.server4, secret_file=secret,
                                     user="alice", password="alice-pw-2addr")  # fmt: skip
        assert login["status"] == "PASS", login
        ike = [p for p in cap.packets() if p.haslayer(UDP) and p[IP].dst == a.client_wan4]  # type: ignore[attr-defined,index]
        # IKE_SA_INIT and IKE_AUTH responses at least, every one from SECOND
        assert len(ike) >= 2, ike
        assert {p[IP].src for p in ike} == {SECOND}  # type: ignore[index]
        assert gws["gw"].snapshot()["ike_sas"][0]["local"] == f"{SECOND}:500"
