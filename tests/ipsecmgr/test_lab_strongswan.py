"""The reference setup: the lab with strongSwan on both gateways; TACACS+ through ESP (root)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ipsecmgr.lab.configs import lab_strongswan_args
from ipsecmgr.lab.strongswan import StrongSwanPeer
from ipsecmgr.lab.topology import Lab
from ipsecmgr.secret import Secret

PSK = Secret(b"lab-reference-psk")


def esp_packets(peer: StrongSwanPeer) -> tuple[int, int]:
    """(packets in, packets out) over all Child SAs of this peer."""
    sas = peer.swanctl("--list-sas", "--raw").stdout
    return (
        sum(int(n) for n in re.findall(r"packets-in=(\d+)", sas)),
        sum(int(n) for n in re.findall(r"packets-out=(\d+)", sas)),
    )


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("family", [4, 6])
def test_tacacs_through_strongswan_tunnel_in_the_lab(tmp_path: Path, family: int) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"tacacs-key")
    secret.chmod(0o600)
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"alice": {"password": "alice-pw"}}))
    with Lab("tunnel") as lab:
        a = lab.addresses
        peers = {}
        for side in ("gw", "client"):
            args = lab_strongswan_args(a, side, family=family)
            peers[side] = StrongSwanPeer(lab.ns(side), tmp_path / f"sw-{side}")
            peers[side].start(local=args.local, remote=args.remote, psk=PSK,
                              options=args.options, initiate=side == "client")  # fmt: skip
        server = a.server6 if family == 6 else a.server4
        src = a.src_ip6 if family == 6 else a.src_ip4
        srv = lab.start_tacacs_server("server", secret_file=secret, users_file=users)
        ok = lab.tacacs_query("client", server=server, secret_file=secret, user="alice",
                              password="alice-pw")  # fmt: skip
        assert ok["status"] == "PASS"
        assert srv.transactions()[0]["peer"] == src
        # the TCP exchange went through ESP (SYN, data, FIN: well over 3 packets each way)
        before = esp_packets(peers["client"])
        assert before[0] >= 3 and before[1] >= 3
        # the bypass server is not covered by any selector: its traffic stays out of ESP
        bypass = lab.start_tacacs_server("bypass", secret_file=secret, users_file=users)
        by = a.bypass6 if family == 6 else a.bypass4
        assert lab.tacacs_query("client", server=by, secret_file=secret, user="alice",
                                password="alice-pw")["ok"]  # fmt: skip
        assert bypass.transactions()[0]["peer"] == (a.client_wan6 if family == 6 else a.client_wan4)
        assert esp_packets(peers["client"]) == before
        for p in peers.values():
            p.stop()
