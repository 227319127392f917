"""The interoperability matrix: our daemon against strongSwan (root).

Each row starts strongSwan and our gateway in a shared lab, lets IKE run,
and carries one TACACS+ transaction through the tunnel; both ends must then
agree on the algorithms and identities, and both must have counted ESP.
Bookworm's strongSwan 5.9.8 fakes a NAT (``nat-fake=yes``), so every row
also exercises our NAT traversal: IKE floats to 4500 with the non-ESP marker
and ESP travels in UDP 4500 (RFC 3948).

Neither libipsec (5.9.8, nor trixie's 6.0.1) installs ESN SAs ("IPsec SA: ESN
not supported"), so ESN rows check that the refusal reaches our log in plain
words instead of carrying traffic (see test_esn_refused_by_libipsec_is_logged).
"""

from __future__ import annotations

import re

import pytest

from ipsecmgr.lab.strongswan import StrongSwanError

from .harness import Case, InteropLab, wait_for

PROPOSALS = [
    "aes256gcm16-prfsha256-modp2048",
    "aes256gcm16-prfsha256-ecp256",
    "aes128gcm16-prfsha384-ecp384",
    "aes256gcm16-prfsha512-x25519",
    "aes256-sha256-modp2048",  # CBC + HMAC
]
ESPS = ["aes256gcm16", "aes128gcm16"]
IDS = ["addr", "fqdn", "email"]

# strongSwan's names for what --list-sas --raw reports
_SW_DH = {"modp2048": "MODP_2048", "ecp256": "ECP_256", "ecp384": "ECP_384",
          "x25519": "CURVE_25519"}  # fmt: skip


def _rows() -> list[Case]:
    rows = []
    for i, ike in enumerate(PROPOSALS):
        for j, ours in enumerate(("client", "gw")):
            esp = ESPS[(i + j) % 2]
            ids = IDS[(i + 2 * j) % 3]
            who = "we-initiate" if ours == "client" else "sw-initiates"
            rows.append(Case(f"{who}-{ike}-{esp}-{ids}", ours=ours, ike=ike, esp=esp, ids=ids))
    for ours in ("client", "gw"):
        who = "we-initiate" if ours == "client" else "sw-initiates"
        rows.append(Case(f"{who}-outer-selectors", ours=ours, shape="outer", ids="fqdn"))
        rows.append(Case(f"{who}-ipv6", ours=ours, family=6, ids="email", esp="aes128gcm16"))
        rows.append(
            Case(
                f"{who}-ipv6-outer-selectors",
                ours=ours,
                family=6,
                shape="outer",
                ike="aes256gcm16-prfsha256-ecp256",
            )
        )
    return rows


def _sw_field(sas: str, name: str) -> list[str]:
    return re.findall(rf"\b{name}=(\S+)", sas)


@pytest.mark.root
@pytest.mark.parametrize("case", _rows(), ids=str)
def test_matrix(labs: dict[str, InteropLab], case: Case) -> None:
    with labs[case.shape].run(case) as r:
        res = r.tacacs()
        assert res["ok"] and res["status"] == "PASS", f"{res}\n{r.diagnostics()}"
        assert r.server.transactions()[-1]["peer"] == r.client_src
        sas = r.sw_sas()
        # strongSwan agrees on the IKE algorithms we were configured with
        ike = case.ike.split("-")
        assert _sw_field(sas, "dh-group")[0] == _SW_DH[ike[-1]]
        assert _sw_field(sas, "encr-alg")[0] == ("AES_GCM_16" if "gcm" in ike[0] else "AES_CBC")
        assert _sw_field(sas, "encr-keysize")[0] == ike[0][3:6]
        if "gcm" not in ike[0]:
            assert _sw_field(sas, "integ-alg")[0] == "HMAC_SHA2_256_128"
        # ... and on the Child SA: ESP in UDP (nat-fake), the configured key size
        assert "encap=yes" in sas and "state=INSTALLED" in sas
        child = sas[sas.index("child-sas") :]
        assert _sw_field(child, "encr-keysize")[0] == case.esp[3:6]
        assert int(_sw_field(child, "packets-in")[0]) > 0
        assert int(_sw_field(child, "packets-out")[0]) > 0
        # identities as configured (FQDN / e-mail), each side proved its own PSK
        if case.ids == "email":
            assert "host01@example.com" in sas and "peer01@example.com" in sas
        if case.ids == "fqdn":
            assert "remote-id=ours.example.com" in sas
        # our side: ESP in UDP 4500 both ways
        snap = r.ours.snapshot()
        assert snap["ike_sas"][0]["nat_t"] is True
        assert snap["child_sas"][0]["encap"] is True
        assert r.counter("esp", "esp_out_packets") > 0
        assert r.counter("esp", "esp_in_packets") > 0


# ESN negotiation: what each side offers, what is chosen (strongSwan's log says)
ESN_ROWS = [
    # we offer ESN first and no-ESN second; strongSwan only no-ESN: no-ESN wins
    Case("we-offer-esn-and-noesn", ours="client", esp="aes256gcm16-esn",
         ours_more_esp=("aes256gcm16",), sw={"esp": "aes256gcm16"}),
    # strongSwan offers both in one proposal; we only accept no-ESN
    Case("sw-offers-esn-and-noesn", ours="gw", esp="aes128gcm16",
         sw={"esp": "aes128gcm16-esn-noesn"}),
]  # fmt: skip


@pytest.mark.root
@pytest.mark.parametrize("case", ESN_ROWS, ids=str)
def test_esn_negotiation(labs: dict[str, InteropLab], case: Case) -> None:
    with labs["tunnel"].run(case) as r:
        res = r.tacacs()
        assert res["ok"], f"{res}\n{r.diagnostics()}"
        log = r.sw.log_path.read_text()
        assert "EXT_SEQ" in log  # ESN was on offer ...
        assert re.search(r"selected proposal: ESP:AES_GCM_16_\d+/NO_EXT_SEQ", log)  # ... not taken
        assert r.ours.snapshot()["child_sas"][0]["esn"] is False


@pytest.mark.root
@pytest.mark.parametrize("ours", ["client", "gw"])
def test_esn_refused_by_libipsec_is_logged(labs: dict[str, InteropLab], ours: str) -> None:
    """Only ESN on offer: strongSwan selects it (so our ESN transform is
    understood), then libipsec cannot install it. As responder strongSwan
    answers NO_PROPOSAL_CHOSEN; as initiator it deletes the Child SA we
    installed. Our log says which."""
    case = Case(f"esn-{ours}", ours=ours, esp="aes256gcm16-esn")
    with labs["tunnel"].run(case, initiate=False) as r:
        if ours == "client":
            assert not r.tacacs(timeout=2.0)["ok"]
            wait_for("the refusal in our log", lambda: "IKE_AUTH failed" in r.ours.log, 5)
            assert "IKE_AUTH failed: peer sent NO_PROPOSAL_CHOSEN (the peer accepted none" in (
                r.ours.log
            )
        else:
            with pytest.raises(StrongSwanError, match="initiate failed"):
                r.sw.initiate(timeout=5)
            wait_for("the deletion in our log", lambda: "deleted-by-peer" in r.ours.log, 5)
            assert "Child SA 1 installed" in r.ours.log
            assert "Child SA 1 deleted (deleted-by-peer)" in r.ours.log
            assert not r.ours.snapshot()["child_sas"]
        log = r.sw.log_path.read_text()
        assert "selected proposal: ESP:AES_GCM_16_256/EXT_SEQ" in log
        assert "IPsec SA: ESN not supported" in log
