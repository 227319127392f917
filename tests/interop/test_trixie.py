"""The raw-ESP subset against strongSwan 6 (Debian trixie's, in a chroot; root).

Run by ``make interop``, which creates the chroot when it is missing
(tools/interop/make-trixie-chroot) and sets IPSECMGR_TRIXIE_ROOT; skipped
otherwise, so ``make test`` is unchanged. strongSwan 6.0.1's libipsec has
``raw_esp``; with ``mobike = no`` it stays on UDP 500 and sends ESP as IP
protocol 50. No NAT is detected, so our daemon does not float either
(``encapsulation = "auto"``), and with ``"never"`` it does not even offer NAT-T.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .harness import Case, InteropLab, wait_for
from .test_strongswan_lifecycle import SW_CHILD_REKEY, _transactions_until

pytestmark = [pytest.mark.trixie, pytest.mark.root]

ROOT = os.environ.get("IPSECMGR_TRIXIE_ROOT", "")


def _raw(**sw: Any) -> dict[str, Any]:
    return {"root": Path(ROOT), "raw_esp": True, "conn_opts": ["mobike = no"], **sw}


CASES = [
    Case("we-initiate", ours="client", sw=_raw()),
    Case("sw-initiates", ours="gw", ike="aes256gcm16-prfsha256-x25519", esp="aes128gcm16",
         ids="email", sw=_raw()),
    Case("we-initiate-never", ours="client", ike="aes256-sha256-modp2048", ids="fqdn",
         ours_map={"encapsulation": "never"}, sw=_raw()),
    Case("sw-initiates-ipv6", ours="gw", family=6, ike="aes128gcm16-prfsha384-ecp384", sw=_raw()),
    Case("we-initiate-outer", ours="client", shape="outer", sw=_raw()),
]  # fmt: skip


@pytest.fixture(autouse=True)
def _need_chroot() -> None:
    if not ROOT:
        pytest.skip("IPSECMGR_TRIXIE_ROOT is not set (make interop sets it)")
    if not (Path(ROOT) / "usr/lib/ipsec/charon").exists():
        pytest.fail(f"no charon in {ROOT}: run tools/interop/make-trixie-chroot")


def _esp_on_wire(il: InteropLab, role: str) -> subprocess.Popen[str]:
    iface = il.lab.interfaces[f"{role}.wan"]
    argv = [
        "timeout",
        "10",
        "tcpdump",
        "-i",
        iface,
        "-nn",
        "-l",
        "-c",
        "2",
        "ip proto 50 or ip6 proto 50",
    ]
    return il.lab.ns(role).popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_raw_esp(labs: dict[str, InteropLab], case: Case) -> None:
    with labs[case.shape].run(case) as r:
        res = r.tacacs()
        assert res["ok"], f"{res}\n{r.diagnostics()}"
        sas = r.sw_sas()
        assert "encap=yes" not in sas and "state=INSTALLED" in sas and "nat-" not in sas, sas
        assert "local-port=500" in sas  # IKE stayed on 500: nobody floated
        snap = r.ours.snapshot()
        assert snap["ike_sas"][0]["nat_t"] is False
        assert snap["child_sas"][0]["encap"] is False
        assert r.counter("esp", "esp_in_packets") > 0 and r.counter("esp", "esp_out_packets") > 0
        if case.family == 4:
            # protocol 50 on the wire, both ways
            cap = _esp_on_wire(labs[case.shape], case.ours)
            assert cap.stderr is not None
            while "listening on" not in cap.stderr.readline():
                pass
            assert r.tacacs()["ok"]
            out, _ = cap.communicate()
            assert out.count("ESP(spi=") == 2, out


@pytest.mark.parametrize(
    "case",
    [
        Case("child-rekey-by-us", ours="client", esp="aes256gcm16-modp2048",
             ours_child_lifetime=3, sw=_raw()),
        Case("child-rekey-by-sw", ours="gw", sw=_raw(**SW_CHILD_REKEY)),
        Case("ike-rekey-by-sw", ours="client", sw=_raw(ike_rekey="3s")),
    ],
    ids=str,
)  # fmt: skip
def test_raw_esp_rekey(labs: dict[str, InteropLab], case: Case) -> None:
    what = "ike" if case.name.startswith("ike") else "child"
    with labs["tunnel"].run(case) as r:
        _transactions_until(r, f"{what}_rekeyed", 2, timeout=20)
        assert r.ours.snapshot()["child_sas"][0]["encap"] is False


@pytest.mark.parametrize("ours", ["client", "gw"])
def test_raw_esp_delete_and_liveness(labs: dict[str, InteropLab], ours: str) -> None:
    case = Case(f"dpd-{ours}", ours=ours, ours_map={"dpd": {"interval": 0.5}},
                sw=_raw(dpd_delay="1s"))  # fmt: skip
    with labs["tunnel"].run(case) as r:
        assert r.tacacs()["ok"]
        wait_for("our liveness checks answered", lambda: r.counter("ike", "liveness_ok") >= 2, 10)
        r.sw.swanctl("--terminate", "--ike", "peer")
        wait_for("our IKE SA deleted", lambda: not r.ours.snapshot()["ike_sas"], timeout=5)


def test_encapsulation_always_makes_strongswan_6_encapsulate(labs: dict[str, InteropLab]) -> None:
    """No NAT, raw ESP possible, but we fake one: both sides use UDP 4500."""
    case = Case("always", ours="client", ours_map={"encapsulation": "always"}, sw=_raw())
    with labs["tunnel"].run(case) as r:
        assert r.tacacs()["ok"]
        sas = r.sw_sas()
        assert "encap=yes" in sas and "nat-remote=yes" in sas, sas
        assert r.ours.snapshot()["child_sas"][0]["encap"] is True
