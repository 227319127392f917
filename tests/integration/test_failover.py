"""What a TACACS+ client with two servers feels when the first one's crypto map
has no live peer (issue #20), in the netns lab (root), through the real kernel.

The client tries its servers in turn as pam_tacplus does with two ``server=``
options (``ipsecmgr.lab.tacacs_servers``, per-server timeout 3 s): the first is
the lab's server behind the crypto map, whose peer (gw) runs no gateway; the
second is the bypass server, reached in clear. IKE to gw gives up quickly here
(200 ms first timeout, one retry: 0.6 s).

* ``on_unreachable = "drop"``: the SYN vanishes, the login waits the whole
  first timeout before the second server answers;
* ``"icmp"`` / ``"rst"``: the gateway writes an ICMP admin-prohibited / a RST
  back into the TUN, connect() fails at once, the login moves on. Goal (the
  issue's): one normal login + 100 ms; the bound asserted here is one normal
  login + 500 ms (2 shared cores), and far below the 3 s timeout.
"""

from __future__ import annotations

import json
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipsecmgr.lab.gateways import GatewayProcess
from ipsecmgr.lab.topology import python_env
from tests.integration.test_gateway import PASSWORD, USER, Env, make_env
from tests.interop.harness import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow]

TIMEOUT = 3.0  # the client's per-server timeout
FAST_GIVE_UP = {"retransmission_timeout": 200, "max_retransmission": 1}
ROUNDS = 3


def two_server_login(env: Env, servers: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "ipsecmgr.lab.tacacs_servers", "--secret-file",
           str(env.secret), "--user", USER, "--password-env", "IPSECMGR_LAB_PASSWORD",
           "--timeout", str(TIMEOUT)]  # fmt: skip
    for s in servers:
        cmd += ["--server", s]
    proc = subprocess.run(
        env.lab.client.argv(cmd), env=python_env({"IPSECMGR_LAB_PASSWORD": PASSWORD}),
        capture_output=True, text=True, timeout=4 * TIMEOUT + 20, check=False,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def start_client(env: Env, how: str) -> GatewayProcess:
    """The client gateway alone: its map's peer (gw) runs nothing."""
    gw = env.gws.start("client", family=env.family, map_options={**FAST_GIVE_UP,
                       "on_unreachable": how})  # fmt: skip
    return gw


def fail_once(env: Env, client: GatewayProcess) -> None:
    """One login that makes IKE to the dead peer give up (whatever it costs)."""
    res = two_server_login(env, [env.server, env.bypass_server])
    assert res["ok"], res
    wait_for("IKE to give up", lambda: client.counter("ike", "tacacs/peer_dead") >= 1, 10, 0.05)


@pytest.fixture(params=[("tunnel", 4)])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    mode, family = request.param
    yield from make_env(tmp_path, mode, family)


def measure(env: Env, how: str) -> tuple[list[float], dict[str, int]]:
    """``ROUNDS`` two-server logins after IKE gave up once: their times, and the
    client gateway's IKE counters."""
    client = start_client(env, how)
    try:
        fail_once(env, client)
        times = []
        for _ in range(ROUNDS):
            res = two_server_login(env, [env.server, env.bypass_server])
            assert res["ok"] and res["server"] == env.bypass_server, res
            times.append(float(res["elapsed"]))
        snap = client.snapshot()
        # Nothing protected went out: no SA could be built (never in clear either:
        # the bypass server's packets are the only bypassed ones).
        assert snap["statistics"]["esp"].get("esp_out_packets", 0) == 0
        return times, snap["statistics"]["ike"]
    finally:
        env.gws.gateways.pop("client").terminate()


def normal_login(env: Env) -> float:
    """The second server alone: what one login costs."""
    return statistics.median(
        float(two_server_login(env, [env.bypass_server])["elapsed"]) for _ in range(ROUNDS)
    )


def test_two_server_login_fails_over_at_once_with_icmp_or_rst_and_waits_with_drop(
    env: Env,
) -> None:
    env.start_server("server")
    env.start_server("bypass")
    normal = normal_login(env)
    results: dict[str, float] = {}
    counters: dict[str, dict[str, int]] = {}
    for how in ("drop", "icmp", "rst"):
        times, counters[how] = measure(env, how)
        results[how] = statistics.median(times)
    print(f"\nfailover login medians (s): normal {normal:.3f} {results}")
    assert results["drop"] >= TIMEOUT  # the SYN vanished: the whole first timeout
    for how in ("icmp", "rst"):
        assert results[how] <= normal + 0.5, (how, results, normal)
    assert counters["icmp"].get("tacacs/unreachable_icmp_sent", 0) >= ROUNDS
    assert counters["rst"].get("tacacs/unreachable_rst_sent", 0) >= ROUNDS
    assert counters["drop"].get("tacacs/unreachable_icmp_sent", 0) == 0


@pytest.mark.parametrize(("mode", "family"), [("tunnel", 6), ("transport", 4), ("transport", 6)])
def test_fail_fast_for_ipv6_and_transport_mode(tmp_path: Path, mode: str, family: int) -> None:
    for env in make_env(tmp_path, mode, family):
        env.start_server("server")
        env.start_server("bypass")
        normal = normal_login(env)
        times, counters = measure(env, "icmp")
        assert statistics.median(times) <= normal + 0.5, (times, normal)
        assert counters.get("tacacs/unreachable_icmp_sent", 0) >= ROUNDS


# --- two peers in the lab ------------------------------------------------------------------

PEER_A = "198.51.100.5"  # on gw's WAN link too, blocked by nftables until "A returns"


def _block_a(env: Env, block: bool) -> None:
    ns = env.lab.gw
    ns.run(["nft", "delete", "table", "inet", "ipsm_test_peer_a"], check=False)
    if block:
        rules = (
            "table inet ipsm_test_peer_a {\n"
            f"  chain in {{ type filter hook input priority 0; ip daddr {PEER_A} drop; }}\n"
            "}\n"
        )
        proc = subprocess.run(ns.argv(["nft", "-f", "-"]), input=rules, capture_output=True,
                              text=True, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr


def _stamp(line: str) -> float:
    """Seconds of a log line's "YYYY-MM-DD HH:MM:SS,mmm" time stamp (within one day)."""
    hms, ms = line.split()[1].split(",")
    h, m, s = (int(x) for x in hms.split(":"))
    return h * 3600 + m * 60 + s + int(ms) / 1000


def test_two_peers_fail_over_and_preempt_make_before_break(tmp_path: Path) -> None:
    """Peer A (198.51.100.5) does not answer, peer B (the lab's gw, 198.51.100.2)
    does: the map comes up on B one handshake after A gave up. A TCP flow then
    runs through B; A comes back (and SIGHUP ends its hold-down, so the probe
    starts now rather than after its backoff); new SAs move to A while the flow
    goes on, and B's IKE SA is deleted after the grace period.

    Both peers are one gw process here (local addresses .2 and .5), so the client
    sends no INITIAL_CONTACT (it would make that process drop B's SA at once),
    names gw's identity (198.51.100.2) for both peers, and offers no NAT-T: that
    process answers from .2 whatever address it was asked on (one IKE socket per
    family and port), which NAT detection would take for a NAT."""
    for env in make_env(tmp_path, "tunnel", 4):
        _two_peers(env)


def _two_peers(env: Env) -> None:
    a = env.lab.addresses
    assert a.src_ip4 is not None
    env.start_server("server")
    env.lab.gw.add_address(env.lab.interfaces["gw.wan"], f"{PEER_A}/24")
    _block_a(env, True)
    conf = env.gws.write_config("gw")
    text = conf.read_text()
    conf.write_text(text.replace(f'local_addresses = ["{a.gw_wan4}"]',
                                 f'local_addresses = ["{a.gw_wan4}", "{PEER_A}"]'))  # fmt: skip
    env.gws.start("gw", config=conf)
    conf = env.gws.write_config("client", map_options={
        **FAST_GIVE_UP, "peers": [PEER_A, a.gw_wan4], "remote_id": a.gw_wan4,
        "initial_contact": False, "encapsulation": "never"})  # fmt: skip
    conf.write_text(conf.read_text().replace(f'peer = "{a.gw_wan4}"\n', ""))
    client = env.gws.start("client", config=conf)

    assert env.login()["status"] == "PASS", client.log[-3000:]
    assert client.counter("ike", "tacacs/failover") == 1
    gave_up = next(ln for ln in client.log_lines if "failing over to peer" in ln)
    up = next(ln for ln in client.log_lines if f"IKE SA up with {a.gw_wan4}" in ln)
    # B is up within one IKE retransmission schedule (here 0.6 s) of A giving up
    assert 0 <= _stamp(up) - _stamp(gave_up) <= 0.6, (gave_up, up)
    rows = client.snapshot()["crypto_maps"][0]["peers"]
    assert [(r["address"], r["active"]) for r in rows] == [(PEER_A, False), (a.gw_wan4, True)]
    assert rows[0]["state"] in ("dead", "standby")  # its 1 s hold-down may be over

    # A flow in progress on B across the switch
    iperf_server = env.lab.server.popen(
        ["iperf3", "-s", "-1", "-B", a.server4, "-p", "5302"], stdout=subprocess.DEVNULL
    )
    try:
        wait_for("iperf3 server", lambda: bool(env.lab.server.run(
            ["ss", "-Hltn", "sport = :5302"], check=False).stdout.strip()), 10)  # fmt: skip
        flow = env.lab.client.popen(
            ["iperf3", "-c", a.server4, "-B", a.src_ip4, "-p", "5302", "-b", "4M",
             "-t", "6", "--connect-timeout", "5000", "--json"],
        )  # fmt: skip
        wait_for("the flow through B", lambda: client.counter("esp", "esp_out_packets") > 200,
                 10, 0.05)  # fmt: skip
        _block_a(env, False)  # A answers again
        client.proc.send_signal(signal.SIGHUP)  # ends A's hold-down: probe now
        wait_for("preemption", lambda: client.counter("ike", "tacacs/preempted") == 1, 10)
        out, err = flow.communicate(timeout=30)
        assert flow.returncode == 0, err
        report = json.loads(out)
        # the flow went on: TCP delivered its 6 s at 4 Mbit/s (within 25 %)
        received = report["end"]["sum_received"]["bytes"]
        assert received >= 0.75 * 4e6 / 8 * 6, report["end"]["sum_received"]
    finally:
        if iperf_server.poll() is None:
            iperf_server.terminate()
        iperf_server.wait(timeout=5)
    # B's IKE SA is deleted after the grace period; new SAs are with A
    wait_for("B retired", lambda: client.counter("ike", "tacacs/backup_sa_retired") == 1,
             15)  # fmt: skip
    try:
        wait_for("one IKE SA, with A", lambda: [s["remote"].split(":")[0] for s in
                 client.snapshot()["ike_sas"]] == [PEER_A], 10)  # fmt: skip
    except AssertionError:
        raise AssertionError(client.snapshot()["ike_sas"]) from None
    assert env.login()["status"] == "PASS"
    rows = client.snapshot()["crypto_maps"][0]["peers"]
    assert [(r["address"], r["state"]) for r in rows] == [
        (PEER_A, "active"), (a.gw_wan4, "standby")]  # fmt: skip


def test_refused_map_holds_down_answers_at_once_and_shows_it(tmp_path: Path) -> None:
    """#15.5 through the daemon: the peer refuses our PSK; logins fail at once
    (ICMP from the TUN instead of the client's 5 s timeout), IKE is not retried
    per packet, and ``show crypto map`` shows the hold-down with its time left."""
    for env in make_env(tmp_path, "tunnel", 4):
        _refused(env, tmp_path)


def _refused(env: Env, tmp_path: Path) -> None:
    env.start_server("server")
    wrong = tmp_path / "wrong-psk"
    wrong.write_bytes(b"not-the-same-psk")
    wrong.chmod(0o600)
    env.gws.start("gw")
    client = env.gws.start("client", psk_file=wrong)
    logins = 6
    for _ in range(logins):
        t0 = time.monotonic()
        res = env.login()
        took = time.monotonic() - t0
        assert not res.get("ok") and "error" in res, res
        assert took < 3.0, (took, res)  # the client's own timeout is 5 s
    ike = client.snapshot()["statistics"]["ike"]
    # A handshake only when the hold-down (1, 2, 4 s ...) is over, not one per SYN
    assert 1 <= ike["tacacs/ike_initiated"] < logins, ike
    assert ike.get("tacacs/unreachable_icmp_sent", 0) >= logins - ike["tacacs/ike_initiated"]
    assert client.snapshot()["statistics"]["esp"].get("esp_out_packets", 0) == 0
    text = client.show("crypto map")
    assert re.search(r"Status\s+: Hold-down", text), text
    assert re.search(r"Hold-down\s+: \d+\.\d s left \(AUTHENTICATION_FAILED\)", text), text
