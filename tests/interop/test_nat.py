"""NAT traversal with a real NAT between our daemon and strongSwan (root).

The "NAT" is nftables source NAT on the client host's own output: it
rewrites the UDP source ports 500 and 4500 (the address stays), which is
what a NAPT in front of the host does to IKE. NAT detection (RFC 7296
§2.23) then sees the client behind a NAT for real, not faked.

Also here: keepalives only from the side behind the NAT (RFC 3948 §2.3),
NAT rebinding (the mapping changes; our side follows the peer's new port
after an authenticated request, and ESP follows), ``encapsulation =
"never"`` against bookworm's strongSwan (which only does UDP-encapsulated
ESP) failing with a reason in our log, and raw ESP and ESP-in-UDP in one
daemon for two peers at once.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ipsecmgr.lab.gateways import LabGateways
from ipsecmgr.lab.strongswan import PeerOptions, StrongSwanPeer
from ipsecmgr.lab.topology import Lab
from ipsecmgr.secret import Secret

from .harness import PASSWORD, PSK_OURS, USER, Case, InteropLab, wait_for


def napt(lab: Lab, role: str, ike_port: int, natt_port: int) -> None:
    """(Re)map ``role``'s UDP source ports 500/4500 and forget the old mappings."""
    ns = lab.ns(role)
    ns.run(["nft", "delete", "table", "ip", "natt_test"], check=False)
    # Like a NAPT box: what comes back must belong to a mapping; a datagram to
    # the host's own port 500/4500 (no mapping) is dropped, as the NAT would.
    rules = (
        "table ip natt_test {\n chain post {\n  type nat hook postrouting priority 100;\n"
        f"  udp sport 500 snat to :{ike_port}\n  udp sport 4500 snat to :{natt_port}\n }}\n"
        " chain inp {\n  type filter hook input priority 0;\n"
        "  udp dport { 500, 4500 } ct status & snat == 0 drop\n }\n}\n"
    )
    subprocess.run(ns.argv(["nft", "-f", "-"]), input=rules, text=True, check=True)
    # conntrack keeps old mappings; flush them so that the next packet gets the new one
    flush = "from pyroute2 import Conntrack; Conntrack().flush()"
    subprocess.run(ns.argv([sys_python(), "-c", flush]), check=True)


def unnat(lab: Lab, role: str) -> None:
    lab.ns(role).run(["nft", "delete", "table", "ip", "natt_test"], check=False)
    flush = "from pyroute2 import Conntrack; Conntrack().flush()"
    subprocess.run(lab.ns(role).argv([sys_python(), "-c", flush]), check=False)


def sys_python() -> str:
    import sys

    return sys.executable


def capture_keepalives(lab: Lab, role: str, count: int, timeout: float) -> subprocess.Popen[str]:
    """tcpdump in ``role``: UDP 4500 datagrams of exactly one octet 0xFF (RFC 3948 §2.3)."""
    iface = lab.interfaces[f"{role}.wan"]
    flt = "udp dst port 4500 and udp[4:2] = 9 and udp[8] = 0xff"
    argv = ["timeout", str(timeout), "tcpdump", "-i", iface, "-nn", "-l", "-c", str(count), flt]
    return lab.ns(role).popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def tcpdump_ready(p: subprocess.Popen[str]) -> None:
    assert p.stderr is not None
    for _ in range(5):  # "listening on IFACE, ..." once the capture runs
        line = p.stderr.readline()
        if "listening on" in line:
            return
    raise AssertionError(f"tcpdump did not start: {line}")


@pytest.mark.root
def test_we_are_behind_a_nat_and_send_keepalives(labs: dict[str, InteropLab]) -> None:
    il = labs["tunnel"]
    napt(il.lab, "client", 1500, 14500)
    try:
        case = Case("behind-nat", ours="client", ours_map={"nat_keepalive": 0.5})
        with il.run(case) as r:
            assert r.tacacs()["ok"]
            sas = r.sw_sas()
            # strongSwan saw the real NAT (its own NAT-D check), and our port mapping
            assert "nat-remote=yes" in sas and "remote-port=14500" in sas, sas
            snap = r.ours.snapshot()
            assert snap["ike_sas"][0]["nat_t"] and snap["child_sas"][0]["encap"]
            cap = capture_keepalives(il.lab, "gw", 2, 10)
            tcpdump_ready(cap)
            out, _ = cap.communicate()
            assert cap.returncode == 0 and out.count("198.51.100.1.14500 >") == 2, out
            assert r.ike("nat_keepalives_sent") >= 2
            assert r.tacacs()["ok"]
    finally:
        unnat(il.lab, "client")


@pytest.mark.root
def test_peer_behind_nat_rebinds_and_we_follow(labs: dict[str, InteropLab]) -> None:
    il = labs["tunnel"]
    napt(il.lab, "client", 1500, 14500)
    try:
        case = Case("rebinding", ours="gw", sw={"dpd_delay": "1s"})
        with il.run(case) as r:
            assert r.tacacs()["ok"]
            assert r.ours.snapshot()["ike_sas"][0]["remote"] == "198.51.100.1:14500"
            # the NAT forgets the mapping and picks another port
            napt(il.lab, "client", 1600, 24500)
            # strongSwan's next liveness check comes from the new port; we follow it
            wait_for(
                "our IKE SA to follow the new port",
                lambda: r.ours.snapshot()["ike_sas"][0]["remote"] == "198.51.100.1:24500",
                timeout=10,
            )
            assert r.ike("nat_rebinding") >= 1
            assert "peer moved from 198.51.100.1:14500 to 198.51.100.1:24500" in r.ours.log
            res = r.tacacs()
            assert res["ok"], f"{res}\n{r.diagnostics()}"
            # not behind a NAT ourselves: no keepalives from us
            assert r.ike("nat_keepalives_sent") == 0
    finally:
        unnat(il.lab, "client")


@pytest.mark.root
def test_encapsulation_never_against_udp_only_strongswan(labs: dict[str, InteropLab]) -> None:
    """No NAT_DETECTION notifies from us: bookworm's libipsec cannot install a
    raw-ESP SA, so strongSwan refuses the Child SA and our log says so."""
    case = Case("never", ours="client", ours_map={"encapsulation": "never"})
    with labs["tunnel"].run(case) as r:
        assert not r.tacacs(timeout=2.0)["ok"]
        wait_for("the failure in our log", lambda: "IKE_AUTH failed" in r.ours.log, 5)
        assert "IKE_AUTH failed: peer sent NO_PROPOSAL_CHOSEN" in r.ours.log
        # strongSwan saw no NAT-D from us, so it did not fake a NAT either
        assert "faking NAT situation" not in r.sw.log_path.read_text()
        assert "only UDP encapsulation is supported" in r.sw.log_path.read_text()


def _two_peer_gw_config(lab: Lab, psk: Path, sock: Path) -> str:
    a = lab.addresses
    return f"""
[access_list.ours]
rules = ["permit ip host {a.server4} host {a.src_ip4}"]
[access_list.sw]
rules = ["permit ip host {a.server4} host {a.bypass4}"]
[crypto_map.ours]
peer = "{a.client_wan4}"
match_address = "ours"
local_psk = {{ file = "{psk}" }}
role = "responder"
[crypto_map.sw]
peer = "{a.bypass4}"
match_address = "sw"
local_psk = {{ file = "{psk}" }}
role = "responder"
[tun.ipsm0]
addresses = []
routes = ["{a.src_ip4}/32", "{a.bypass4}/32"]
crypto_maps = ["ours", "sw"]
[gateway]
local_addresses = ["{a.gw_wan4}"]
management_interface = "{lab.interfaces["gw.wan"]}"
control_socket = "{sock}"
"""


@pytest.mark.root
def test_raw_esp_and_esp_in_udp_in_one_daemon(labs: dict[str, InteropLab], tmp_path: Path) -> None:
    """Our responder serves our own initiator (no NAT: raw ESP, protocol 50) and
    a strongSwan initiator (ESP in UDP 4500) at the same time."""
    il = labs["tunnel"]
    lab, a, files = il.lab, il.lab.addresses, il.files
    (tmp_path / "ours").mkdir()
    gws = LabGateways(lab, tmp_path / "ours", psk=PSK_OURS)
    sw = StrongSwanPeer(lab.ns("bypass"), tmp_path / "sw")
    try:
        conf = tmp_path / "ours" / "gw.toml"
        conf.write_text(_two_peer_gw_config(lab, gws.psk_file, gws.dir / "gw.sock"))
        gw = gws.start("gw", config=conf)
        gws.start("client", first_packet="queue")
        opts = PeerOptions(local_ts=f"{a.bypass4}/32", remote_ts=f"{a.server4}/32")
        sw.start(local=a.bypass4, remote=a.gw_wan4, psk=Secret(PSK_OURS), options=opts,
                 initiate=True)  # fmt: skip
        for role in ("client", "bypass"):
            res = lab.tacacs_query(role, server=a.server4, secret_file=files.secret, user=USER,
                                   password=PASSWORD)  # fmt: skip
            assert res["ok"], f"{role}: {res}\n{gw.log[-3000:]}"
        peers = {t["peer"] for t in il.server.transactions()[-2:]}
        assert peers == {a.src_ip4, a.bypass4}
        encap = {c["crypto_map"]: c["encap"] for c in gw.snapshot()["child_sas"]}
        assert encap == {"ours": False, "sw": True}
        nat_t = {s["crypto_map"]: s["nat_t"] for s in gw.snapshot()["ike_sas"]}
        assert nat_t == {"ours": False, "sw": True}
        assert "encap=yes" in sw.swanctl("--list-sas", "--raw").stdout
    finally:
        try:
            gws.close()
        finally:
            sw.stop()


@pytest.mark.root
def test_authentic_esp_from_a_new_port_moves_us(labs: dict[str, InteropLab]) -> None:
    """No IKE message after the NAT rebound: the client's next ESP packet (the
    TACACS+ SYN) decrypts, comes from the new port, and our answers follow it."""
    il = labs["tunnel"]
    napt(il.lab, "client", 1500, 14500)
    try:
        with il.run(Case("esp-rebinding", ours="gw")) as r:
            assert r.tacacs()["ok"]
            napt(il.lab, "client", 1600, 24500)
            res = r.tacacs()
            assert res["ok"], f"{res}\n{r.diagnostics()}"
            assert r.ours.snapshot()["ike_sas"][0]["remote"] == "198.51.100.1:24500"
            assert r.ike("nat_rebinding") == 1
    finally:
        unnat(il.lab, "client")
