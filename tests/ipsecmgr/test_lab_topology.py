"""The lab topology: clear-text reachability and TACACS+ over the bypass path (root)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ipsecmgr.lab.topology import Lab, LabAddresses, teardown

SECRET = b"lab-secret-0123"


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _files(tmp_path: Path) -> tuple[Path, Path]:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    secret.chmod(0o600)
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"alice": {"password": "alice-pw", "avps": ["priv-lvl=15"]}}))
    return secret, users


def test_address_plan_is_documentation_only() -> None:
    import ipaddress

    from ipsecmgr.netns import check_doc_address

    for mode in ("tunnel", "transport"):
        for key, value in vars(LabAddresses.for_mode(mode)).items():
            if isinstance(value, str) and key != "mode":
                check_doc_address(str(ipaddress.ip_network(value, strict=False)))
    assert LabAddresses.for_mode("transport").server4 == LabAddresses.for_mode("transport").gw_wan4


@pytest.mark.root
def test_tunnel_lab_clear_reachability_and_bypass_tacacs(tmp_path: Path) -> None:
    secret, users = _files(tmp_path)
    lab = Lab("tunnel").build()
    names = set(lab.describe()["namespaces"].values())
    try:
        assert names <= _netns_names() and len(names) == 5
        a = lab.addresses
        c = lab.client
        # in clear: WAN, the bypass server, and the TACACS+ server behind gw from src_ip
        for dst in (a.gw_wan4, a.gw_wan6, a.bypass4, a.bypass6):
            c.run(["ping", "-c1", "-W2", dst])
        assert a.src_ip4 and a.src_ip6
        c.run(["ping", "-c1", "-W2", "-I", a.src_ip4, a.server4])
        c.run(["ping", "-c1", "-W2", "-I", a.src_ip6, a.server6])
        route = c.run(["ip", "route", "get", a.server4]).stdout
        assert f"src {a.src_ip4}" in route and f"via {a.gw_wan4}" in route

        bypass = lab.start_tacacs_server("bypass", secret_file=secret, users_file=users)
        for server in (a.bypass4, a.bypass6):
            ok = lab.tacacs_query("client", server=server, secret_file=secret, user="alice",
                                  password="alice-pw")  # fmt: skip
            assert (ok["status"], ok["exit_code"]) == ("PASS", 0)
        bad = lab.tacacs_query("client", server=a.bypass4, secret_file=secret, user="alice",
                               password="wrong")  # fmt: skip
        assert (bad["status"], bad["exit_code"]) == ("FAIL", 1)
        author = lab.tacacs_query("client", server=a.bypass4, secret_file=secret, user="alice",
                                  action="authorize", args=["service=shell", "cmd="])  # fmt: skip
        assert author["args"] == ["priv-lvl=15"]
        seen = [(t["kind"], t["user"], t["result"], t["peer"]) for t in bypass.transactions()]
        assert seen == [
            ("authen", "alice", "PASS", a.client_wan4),
            ("authen", "alice", "PASS", a.client_wan6),
            ("authen", "alice", "FAIL", a.client_wan4),
            ("author", "alice", "PASS_ADD", a.client_wan4),
        ]
        # the TACACS+ server behind gw, in clear from src_ip (what IPsec will protect)
        srv = lab.start_tacacs_server("server", secret_file=secret, users_file=users)
        ok = lab.tacacs_query("client", server=a.server4, secret_file=secret, user="alice",
                              password="alice-pw")  # fmt: skip
        assert ok["ok"] and srv.transactions()[0]["peer"] == a.src_ip4
        assert "alice-pw" not in json.dumps(bypass.events() + srv.events())
    finally:
        lab.close()
    assert not names & _netns_names()


@pytest.mark.root
def test_transport_lab_server_is_the_responder(tmp_path: Path) -> None:
    secret, users = _files(tmp_path)
    with Lab("transport") as lab:
        assert lab.server is lab.gw
        a = lab.addresses
        srv = lab.start_tacacs_server("server", secret_file=secret, users_file=users)
        ok = lab.tacacs_query("client", server=a.server6, secret_file=secret, user="alice",
                              password="alice-pw", action="account", acct_flag="stop")  # fmt: skip
        assert ok["status"] == "SUCCESS"
        assert srv.transactions()[0]["method"] == "STOP"
        names = set(lab.describe()["namespaces"].values())
    assert len(names) == 4 and not names & _netns_names()


@pytest.mark.root
def test_loss_injection_and_teardown_from_description() -> None:
    lab = Lab("tunnel").build()
    try:
        a = lab.addresses
        lab.set_loss("client", 100)
        assert (
            lab.client.run(["ping", "-c2", "-i0.2", "-W1", a.gw_wan4], check=False).returncode != 0
        )
        assert lab.client.run(["ping", "-c1", "-W1", a.gw_wan6], check=False).returncode != 0
        lab.set_loss("client", 30)
        ruleset = lab.client.run(["nft", "list", "table", "inet", "ipsm_lab_loss"]).stdout
        assert ruleset.count("numgen random mod 100 < 30 drop") == 2  # output and forward
        lab.set_loss("client", 0)
        lab.client.run(["ping", "-c1", "-W2", a.gw_wan4])
        # forwarded traffic too: gw drops all it sends towards the WAN
        lab.set_loss("gw", 100)
        assert lab.client.run(["ping", "-c1", "-W1", "-I", str(a.src_ip4), a.server4],
                              check=False).returncode != 0  # fmt: skip
        desc = json.loads(json.dumps(lab.describe()))  # as the CLI would store it
        sleeper = lab.server.popen(["sleep", "300"])
        removed = teardown(desc)
        assert sorted(removed) == sorted(set(desc["namespaces"].values()))
        assert not set(removed) & _netns_names()
        assert sleeper.wait(timeout=10) is not None
        assert teardown(desc) == []  # idempotent
    finally:
        lab.close()
