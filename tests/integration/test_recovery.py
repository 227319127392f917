"""Recovery in the netns lab (root): dead-peer detection, rekeys under load,
Active/Standby takeover with and without INITIAL_CONTACT, liveness under load.

The reference's "Recovery" section is the contract: heartbeats between the
IPsec endpoints; when the Active goes down, the peer's dead-peer detection
clears the tunnels; when the Standby becomes Active, the next TACACS+
transaction builds a new tunnel. Timers are short (about a second) so that
every test ends within a few seconds; tolerances are generous (2 cores,
shared machine), the exact times are the fake-clock tests'
(tests/ipsecmgr/test_manager_timers.py).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from ipsecmgr.lab.gateways import GatewayProcess, LabGateways
from ipsecmgr.periodic import DPD_SAMPLES
from tests.integration.test_gateway import Env, make_env
from tests.interop.harness import Case, InteropLab, wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow]

FAST_DPD = {"interval": 1.0, "timeout": 0.5, "retries": 2}


def dpd_bound(dpd: dict[str, float]) -> float:
    """When a peer that stopped answering is declared dead, at the latest: one
    idle interval (inbound ESP is looked at every interval/DPD_SAMPLES), then the
    request and its retries, ``timeout`` apart, and one more ``timeout``
    (docs/recovery.md)."""
    return dpd["interval"] * (1 + 1 / DPD_SAMPLES) + dpd["timeout"] * (dpd["retries"] + 1)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from make_env(tmp_path, "tunnel", 4)


def start(env: Env, side: str, **map_options: Any) -> GatewayProcess:
    return env.gws.start(side, first_packet="queue", map_options={"dpd": FAST_DPD, **map_options})


def map_status(gw: GatewayProcess) -> str:
    return str(gw.snapshot()["crypto_maps"][0]["status"])


def test_sigkilled_peer_is_declared_dead_and_the_next_transaction_rebuilds(env: Env) -> None:
    env.start_server()
    client = start(env, "client")
    start(env, "gw")
    assert env.login()["status"] == "PASS"
    env.gws.gateways.pop("gw").kill()
    killed = time.monotonic()
    wait_for("the client to declare gw dead", lambda: map_status(client) == "dead", 15, 0.05)
    detected = time.monotonic() - killed
    assert detected <= dpd_bound(FAST_DPD) + 0.5, detected
    snap = client.snapshot()
    assert snap["ike_sas"] == [] and snap["child_sas"] == []
    assert client.counter("ike", "tacacs/peer_dead") == 1
    assert "peer 198.51.100.2 is dead" in client.log
    assert re.search(r"Status\s+: Dead", client.show("crypto map"))
    # The routes stay: the next TACACS+ packet still reaches the TUN and re-initiates.
    routes = env.lab.client.run(["ip", "route", "show", "table", "all"]).stdout
    assert env.server in routes
    start(env, "gw")
    # The dead peer is held down for 1 s (#20): a login meanwhile is refused at once
    # (ICMP admin-prohibited from the TUN), never left to time out; then IKE again.
    deadline = time.monotonic() + 5
    while (res := env.login()).get("status") != "PASS":
        assert "No route to host" in str(res.get("error")), (res, client.log[-3000:])
        assert time.monotonic() < deadline, client.log[-3000:]
    assert client.counter("ike", "tacacs/ike_initiated") == 2
    assert map_status(client) == "up"


def test_child_and_ike_rekeys_under_tacacs_load_lose_no_transaction(env: Env) -> None:
    env.start_server()
    opts: dict[str, Any] = {
        "first_packet": "queue",
        "ike_options": {"lifetime": 5},
        "ipsec_options": {"lifetime_seconds": 3},
    }
    client = env.gws.start("client", **opts)
    gw = env.gws.start("gw", **opts)
    done, failed = 0, []
    deadline = time.monotonic() + 30
    while not (
        client.counter("ike", "tacacs/child_rekeyed") >= 3
        and client.counter("ike", "tacacs/ike_rekeyed") >= 1
    ):
        assert time.monotonic() < deadline, client.log[-3000:]
        res = env.login()
        done += 1
        if res.get("status") != "PASS":
            failed.append(res)
    assert failed == [], failed
    assert done >= 5
    # Make-before-break: nothing arrived for an SA the receiver did not know.
    for side in (client, gw):
        esp = side.snapshot()["statistics"]["esp"]
        assert esp.get("esp_unknown_spi", 0) == 0, (side.side, esp)
        assert len(side.snapshot()["ike_sas"]) == 1
    # Either side may start a Child rekey first (both lifetimes are 3 s, the soft
    # deadline carries random jitter): count what both started.
    started = sum(g.counter("ike", "tacacs/child_rekey_started") for g in (client, gw))
    assert started >= 3, started


def _takeover(env: Env, **map_options: Any) -> tuple[GatewayProcess, float]:
    """SIGKILL the Active client gateway, start the Standby (same addresses and
    config); returns it and how long its first transaction took after "ready"."""
    env.gws.gateways.pop("client").kill()
    standby = start(env, "client", **map_options)
    ready = time.monotonic()
    res = env.login()
    took = time.monotonic() - ready
    assert res["status"] == "PASS", standby.log[-3000:]
    return standby, took


def test_takeover_with_initial_contact_replaces_the_stale_sas_at_once(env: Env) -> None:
    env.start_server()
    start(env, "client")
    gw = start(env, "gw", dpd={"interval": 30.0, "timeout": 10.0, "retries": 3})
    assert env.login()["status"] == "PASS"
    (old,) = gw.snapshot()["ike_sas"]
    _standby, took = _takeover(env)
    # gw's own DPD would take 30 s or more: only INITIAL_CONTACT explains this
    (new,) = gw.snapshot()["ike_sas"]
    assert new["spi_i"] != old["spi_i"]
    assert gw.counter("ike", "replaced_by_initial_contact") == 1
    assert gw.counter("ike", "tacacs/peer_dead") == 0
    assert len(gw.snapshot()["child_sas"]) == 1
    assert took < 5.0, took


def test_takeover_without_initial_contact_is_cleared_by_dead_peer_detection(env: Env) -> None:
    env.start_server()
    start(env, "client", initial_contact=False)
    slow = {"interval": 3.0, "timeout": 0.5, "retries": 2}
    gw = start(env, "gw", dpd=slow)
    assert env.login()["status"] == "PASS"
    (old,) = gw.snapshot()["ike_sas"]
    killed = time.monotonic()
    _standby, _ = _takeover(env, initial_contact=False)
    # The new tunnel works at once; the stale IKE SA goes when gw's DPD gives up.
    wait_for(
        "gw's DPD to clear the stale SA",
        lambda: [s["spi_i"] for s in gw.snapshot()["ike_sas"]] not in ([old["spi_i"]], []),
        dpd_bound(slow) + 10,
        0.05,
    )
    wait_for("the stale SA to go", lambda: len(gw.snapshot()["ike_sas"]) == 1, 15, 0.05)
    assert time.monotonic() - killed <= dpd_bound(slow) + 0.5
    (new,) = gw.snapshot()["ike_sas"]
    assert new["spi_i"] != old["spi_i"]
    assert gw.counter("ike", "tacacs/peer_dead") == 1
    assert gw.counter("ike", "replaced_by_initial_contact") == 0
    assert map_status(gw) == "up"
    assert env.login()["status"] == "PASS"


def test_takeover_with_initial_contact_against_strongswan(tmp_path: Path) -> None:
    lab = InteropLab("tunnel", tmp_path)
    try:
        case = Case("takeover", ours="client", ours_map={"first_packet": "queue"})
        with lab.run(case) as r:
            assert r.tacacs()["ok"], r.diagnostics()
            wait_for("strongSwan's IKE SA", lambda: r.sw_sas().count("state=ESTABLISHED") == 1, 5)
            r.ours.kill()
            standby_gws = LabGateways(r.lab, r.ours.config.parent)
            try:
                standby = standby_gws.start("client", config=r.ours.config)
                assert r.tacacs()["ok"], standby.log[-3000:]
                # strongSwan dropped the Active's SAs on INITIAL_CONTACT: one IKE SA left
                wait_for(
                    "strongSwan to keep only the new IKE SA",
                    lambda: r.sw_sas().count("state=ESTABLISHED") == 1,
                    3,
                )
                spi = standby.snapshot()["ike_sas"][0]["spi_i"]
                assert spi in r.sw_sas().replace("_", "")
                assert "received INITIAL_CONTACT" in r.sw.log_path.read_text()
            finally:
                standby_gws.close()
    finally:
        lab.close()


_LOG = re.compile(
    r"^(\S+ \S+) ipsecmgr\.ike INFO \S+: (sending|received) INFORMATIONAL "
    r"(request|response) (\d+) \[\s*\]"
)


def liveness_round_trips(log: list[str]) -> list[float]:
    """Seconds between each liveness request we sent and its answer (our log)."""
    sent: dict[str, datetime] = {}
    out = []
    for line in log:
        m = _LOG.match(line)
        if m is None:
            continue
        when = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f")
        if m[2] == "sending" and m[3] == "request":
            sent[m[4]] = when
        elif m[2] == "received" and m[3] == "response" and m[4] in sent:
            out.append((when - sent.pop(m[4])).total_seconds())
    return out


def test_liveness_answered_within_100_ms_while_the_data_path_is_saturated(env: Env) -> None:
    """A UDP flood client → server saturates both daemons (the client encrypts,
    gw decrypts) and brings nothing back, so the client keeps asking; every
    question and answer crosses both busy loops."""
    env.start_server()
    quick = {"interval": 0.3, "timeout": 1.0, "retries": 3}
    client = start(env, "client", dpd=quick)
    gw = start(env, "gw", dpd={"interval": 30.0, "timeout": 10.0, "retries": 3})
    assert env.login()["status"] == "PASS"
    a = env.lab.addresses
    assert a.src_ip4 is not None
    server = env.lab.server.popen(["iperf3", "-s", "-1", "-B", a.server4, "-p", "5301"],
                                  stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for("iperf3 server", lambda: bool(env.lab.server.run(
            ["ss", "-Hltn", "sport = :5301"], check=False).stdout.strip()), 10)  # fmt: skip
        before = len(client.log_lines)
        out_before = client.counter("esp", "esp_out_packets")
        flood = env.lab.client.run(
            ["iperf3", "-c", a.server4, "-B", a.src_ip4, "-p", "5301", "-u", "-b", "0",
             "-l", "1200", "-t", "4", "--connect-timeout", "5000"],
            check=False, timeout=30,
        )  # fmt: skip
        assert flood.returncode == 0, flood.stderr
    finally:
        if server.poll() is None:
            server.terminate()
        server.wait(timeout=5)
    sent = client.counter("esp", "esp_out_packets") - out_before
    rtts = liveness_round_trips(client.log_lines[before:])
    assert sent > 20000, sent  # the data path was busy
    assert len(rtts) >= 5, client.log[-2000:]
    assert max(rtts) < 0.100, sorted(rtts)
    assert client.counter("ike", "tacacs/peer_dead") == 0
    assert gw.counter("ike", "tacacs/peer_dead") == 0
