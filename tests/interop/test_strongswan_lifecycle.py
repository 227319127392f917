"""Rekeying, DELETE and liveness checks between our daemon and strongSwan (root).

Rekeys use lifetimes of a few seconds on the side that should start them
(ours: ``lifetime_seconds`` / ``lifetime``; strongSwan: ``rekey_time``) and
keep the other side's long, so who rekeys is known. TACACS+ transactions run
back to back across the rekeys, and every one of them must pass.
"""

from __future__ import annotations

import time

import pytest

from .harness import Case, InteropLab, Running, wait_for

# libipsec turns its own rekey time into a hard expiry unless life_time is set
SW_CHILD_REKEY = {"esp_rekey": "3s", "child_opts": ["life_time = 30s", "rand_time = 0s"]}
# With rekey_time 3s strongSwan's hard IKE lifetime (rekey + over_time, 10 % by
# default) can expire while its own rekey runs; it then deletes the new IKE SA
# too ("migrating IKE_DELETE task"). Give the old SA room to finish its rekey.
SW_IKE_REKEY = {"ike_rekey": "3s", "conn_opts": ["over_time = 30s", "rand_time = 0s"]}
REKEY_CASES = [
    # (name, who rekeys, what, our side, PFS?)
    Case("child-by-us-pfs", ours="client", esp="aes256gcm16-modp2048", ours_child_lifetime=3),
    Case("child-by-us-nopfs", ours="gw", esp="aes128gcm16", ours_child_lifetime=3),
    Case("child-by-sw-pfs", ours="gw", esp="aes256gcm16-ecp256",
         ike="aes256gcm16-prfsha256-ecp256", sw=SW_CHILD_REKEY),
    Case("child-by-sw-nopfs", ours="client", sw=SW_CHILD_REKEY),
    Case("ike-by-us", ours="client", ike="aes256gcm16-prfsha256-x25519", ours_ike_lifetime=3),
    Case("ike-by-us-responder", ours="gw", ours_ike_lifetime=3),
    Case("ike-by-sw", ours="gw", ike="aes256-sha256-modp2048", sw=SW_IKE_REKEY),
    Case("ike-by-sw-responder", ours="client", sw=SW_IKE_REKEY),
]  # fmt: skip


def _transactions_until(r: Running, done: str, want: int, timeout: float) -> int:
    """TACACS+ transactions back to back until our counter ``done`` reaches
    ``want``, then one more; every transaction must pass. Returns how many ran."""
    n = 0
    deadline = time.monotonic() + timeout
    while True:
        reached = r.ike(done) >= want
        res = r.tacacs()
        n += 1
        assert res["ok"], f"transaction {n} failed: {res}\n{r.diagnostics()}"
        if reached:
            return n
        assert time.monotonic() < deadline, f"no {done} x{want} in {timeout} s\n{r.diagnostics()}"


@pytest.mark.root
@pytest.mark.parametrize("case", REKEY_CASES, ids=str)
def test_rekey_with_traffic(labs: dict[str, InteropLab], case: Case) -> None:
    what = "ike" if case.name.startswith("ike") else "child"
    by_us = "-by-us" in case.name
    with labs["tunnel"].run(case) as r:
        n = _transactions_until(r, f"{what}_rekeyed", 2, timeout=20)
        assert n >= 3
        started = r.ike(f"{what}_rekey_started")
        assert (started >= 2) if by_us else (started == 0)
        assert r.server.transactions()[-1]["peer"] == r.client_src
        snap = r.ours.snapshot()
        assert len(snap["ike_sas"]) == 1  # the old IKE SA is gone after a rekey
        sas = r.sw_sas()
        assert sas.count("state=ESTABLISHED") == 1, sas
        if what == "child":
            # make-before-break: the old inbound SA was deleted, not left behind
            wait_for(
                "old Child SAs deleted",
                lambda: len([c for c in r.ours.snapshot()["child_sas"]]) == 1,
                timeout=5,
            )
            if "modp2048" in case.esp or "ecp256" in case.esp:
                assert "dh-group=" in sas[sas.index("child-sas") :]  # PFS on the new SA


@pytest.mark.root
@pytest.mark.parametrize("ours", ["client", "gw"])
def test_delete_from_us(labs: dict[str, InteropLab], ours: str) -> None:
    with labs["tunnel"].run(Case(f"delete-us-{ours}", ours=ours)) as r:
        assert r.tacacs()["ok"]
        assert r.ours.command({"command": "clear"})["result"] == {"cleared": 1}
        wait_for("strongSwan to drop the IKE SA", lambda: "state=" not in r.sw_sas(), timeout=5)
        assert "received DELETE for IKE_SA" in r.sw.log_path.read_text()


@pytest.mark.root
@pytest.mark.parametrize("ours", ["client", "gw"])
def test_delete_from_strongswan(labs: dict[str, InteropLab], ours: str) -> None:
    with labs["tunnel"].run(Case(f"delete-sw-{ours}", ours=ours)) as r:
        assert r.tacacs()["ok"]
        # a Child SA alone: the IKE SA stays
        r.sw.swanctl("--terminate", "--child", "child")
        wait_for("our Child SA deleted", lambda: not r.ours.snapshot()["child_sas"], timeout=5)
        assert len(r.ours.snapshot()["ike_sas"]) == 1
        # then the IKE SA
        r.sw.swanctl("--terminate", "--ike", "peer")
        wait_for("our IKE SA deleted", lambda: not r.ours.snapshot()["ike_sas"], timeout=5)
        # the log is read by a thread: the line may trail the snapshot
        wait_for("the deletion in our log",
                 lambda: "IKE SA deleted (deleted-by-peer)" in r.ours.log, timeout=5)  # fmt: skip
        if ours == "client":
            # the next matching packet sets everything up again
            assert r.tacacs()["ok"]
            assert r.ike("ike_initiated") == 2


@pytest.mark.root
@pytest.mark.parametrize("ours", ["client", "gw"])
def test_our_liveness_checks_answered(labs: dict[str, InteropLab], ours: str) -> None:
    case = Case(f"dpd-us-{ours}", ours=ours, ours_map={"dpd": {"interval": 0.5}})
    with labs["tunnel"].run(case) as r:
        assert r.tacacs()["ok"]
        wait_for("3 answered liveness checks", lambda: r.counter("ike", "liveness_ok") >= 3, 10)
        assert r.ike("peer_dead") == 0
        assert r.tacacs()["ok"]


@pytest.mark.root
@pytest.mark.parametrize("ours", ["client", "gw"])
def test_strongswan_liveness_checks_answered(labs: dict[str, InteropLab], ours: str) -> None:
    case = Case(f"dpd-sw-{ours}", ours=ours, sw={"dpd_delay": "1s"})
    with labs["tunnel"].run(case) as r:
        assert r.tacacs()["ok"]

        def answered() -> int:
            return r.sw.log_path.read_text().count("parsed INFORMATIONAL response")

        wait_for("2 DPD answers in charon.log", lambda: answered() >= 2, timeout=10)
        assert "sending DPD request" in r.sw.log_path.read_text()
        assert "state=ESTABLISHED" in r.sw_sas()
        assert r.tacacs()["ok"]
