"""The daemon under a (stand-in) systemd and with its Prometheus endpoint, in the
netns lab (root).

systemd is not PID 1 here, so the test plays its part: it binds the
NOTIFY_SOCKET datagram socket, sets WATCHDOG_USEC, and reads what the daemon
sends while it starts, carries traffic, reloads on SIGHUP and stops.
The metrics endpoint is scraped over HTTP from inside the gateway's namespace
(it listens on that namespace's loopback) and parsed with prometheus-client's
own text parser; the figures are compared with the daemon's ``show`` snapshot.
"""

from __future__ import annotations

import itertools
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipsecmgr.lab.gateways import GatewayProcess, LabGateways
from ipsecmgr.lab.topology import Lab, python_env
from ipsecmgr.sdnotify import monotonic_usec

pytestmark = [pytest.mark.root, pytest.mark.slow]

USER, PASSWORD = "alice", "alice-pw-4711"
METRICS = "127.0.0.1:9754"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Env:
    def __init__(self, lab: Lab, gws: LabGateways, tmp: Path) -> None:
        self.lab, self.gws = lab, gws
        self.secret = tmp / "tacacs-secret"
        self.secret.write_bytes(b"tacacs-key")
        self.secret.chmod(0o600)
        self.users = tmp / "users.json"
        self.users.write_text(json.dumps({USER: {"password": PASSWORD}}))
        lab.start_tacacs_server("server", secret_file=self.secret, users_file=self.users)

    def login(self) -> dict[str, object]:
        return self.lab.tacacs_query(
            "client", server=self.lab.addresses.server4, secret_file=self.secret, user=USER,
            password=PASSWORD,
        )  # fmt: skip

    def start(self, side: str, extra: str = "", **options: object) -> GatewayProcess:
        conf = self.gws.write_config(side, **options)
        conf.write_text(conf.read_text() + extra)
        return self.gws.start(side, config=conf)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with Lab("tunnel") as lab, LabGateways(lab) as gws:
        yield Env(lab, gws, tmp_path)


# ---------------------------------------------------------------- sd_notify


class NotifyListener:
    """systemd's side of sd_notify(3): a datagram socket; messages with arrival times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, dict[str, str]]] = []

    def drain(self) -> None:
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(4096).decode()
                msg = dict(line.split("=", 1) for line in data.split("\n"))
                self.messages.append((time.monotonic(), msg))
        except BlockingIOError:
            pass

    def wait_for(self, key: str, after: int = 0, timeout: float = 15.0) -> dict[str, str]:
        """The first message from index ``after`` on that carries ``key``."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            for _, m in self.messages[after:]:
                if key in m:
                    return m
            assert time.monotonic() < deadline, f"no {key} in {self.messages[after:]}"
            self.sock.settimeout(0.2)
            self.sock.setblocking(True)
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            msg = dict(line.split("=", 1) for line in data.split("\n"))
            self.messages.append((time.monotonic(), msg))


def test_notify_ready_status_watchdog_reload_stopping(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.start("gw")
    listener = NotifyListener(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WatchdogSec=1: a ping every 0.5 s
    client = env.start("client")  # returns once the daemon printed "ready"
    # READY=1 once TUN, routes and sockets are up: no tunnel yet (on demand)
    ready = listener.wait_for("READY")
    assert ready["STATUS"] == "crypto maps up 0/1; IKE SAs 0; Child SAs 0"
    assert listener.messages[0][1] is ready  # nothing before READY
    assert env.login()["status"] == "PASS"
    # (a ping between IKE_SA_INIT and IKE_AUTH may report the half-built state first)
    want = "crypto maps up 1/1; IKE SAs 1; Child SAs 1"
    n = 1
    while (up := listener.wait_for("STATUS", after=n))["STATUS"] != want:
        n = next(i for i, (_, m) in enumerate(listener.messages) if m is up) + 1
    assert up["WATCHDOG"] == "1"  # STATUS= rides on a watchdog ping

    # Watchdog: ~2 pings per second from the event loop, over 3 s
    start = len(listener.messages)
    t0 = time.monotonic()
    while time.monotonic() < t0 + 3.0:
        listener.wait_for("WATCHDOG", after=len(listener.messages))
    pings = [t for t, m in listener.messages[start:] if m.get("WATCHDOG") == "1"]
    # (arrival times here: a descheduled test reads two at once, so the median)
    gaps = sorted(b - a for a, b in itertools.pairwise(pings))
    assert 4 <= len(pings) <= 8, pings
    assert 0.3 < gaps[len(gaps) // 2] < 0.8, gaps

    # SIGHUP: RELOADING=1 with our CLOCK_MONOTONIC in µs, then READY=1 again
    n = len(listener.messages)
    before = monotonic_usec()
    client.proc.send_signal(signal.SIGHUP)
    reloading = listener.wait_for("RELOADING", after=n)
    after = monotonic_usec()
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    i = next(i for i, (_, m) in enumerate(listener.messages) if m is reloading)
    again = listener.wait_for("READY", after=i + 1)
    assert again["STATUS"].startswith("crypto maps up 1/1")  # the SAs stayed

    # SIGTERM: STOPPING=1 (before the DELETEs and the clean-up), then exit 0
    n = len(listener.messages)
    assert client.terminate() == 0
    listener.wait_for("STOPPING", after=n, timeout=1)
    listener.drain()
    stop_at = next(t for t, m in listener.messages[n:] if "STOPPING" in m)
    assert not [m for t, m in listener.messages[n:] if t > stop_at and "WATCHDOG" in m]
    listener.sock.close()


# ---------------------------------------------------------------- metrics


def scrape(env: Env, side: str, path: str = "/metrics") -> tuple[int, str]:
    code = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        f"    r = urllib.request.urlopen('http://{METRICS}{path}', timeout=10)\n"
        "    sys.stdout.write(str(r.status) + '\\n' + r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    sys.stdout.write(str(e.code) + '\\n')\n"
    )
    out = env.lab.ns(side).run([sys.executable, "-c", code], timeout=30).stdout
    status, _, body = out.partition("\n")
    return int(status), body


def samples(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def v(s: Samples, name: str, **labels: str) -> float:
    return s.get((name, tuple(sorted(labels.items()))), 0.0)


def show_statistics(gw: GatewayProcess) -> dict[str, dict[str, int]]:
    """What ``ipsecmgr show crypto statistics --json`` prints, parsed."""
    cmd = [sys.executable, "-m", "ipsecmgr.cli", "show", "--socket", str(gw.control),
           "crypto", "statistics", "--json"]  # fmt: skip
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, timeout=30, env=python_env()
    )
    stats: dict[str, dict[str, int]] = json.loads(out.stdout)
    return stats


def _show_figures(stats: dict[str, dict[str, int]]) -> dict[str, float]:
    esp, ike = stats["esp"], stats["ike"]
    return {
        "out": esp.get("esp_out_packets", 0),
        "in": esp.get("esp_in_packets", 0),
        "started": ike.get("tacacs/ike_initiated", 0),
        "succeeded": ike.get("tacacs/ike_established", 0),
        "first_packet": ike.get("tacacs/first_packet_drops", 0),
        "no_sa": esp.get("esp_unknown_spi", 0),
        "icv": esp.get("in_icv_failed", 0),
    }


def _metric_figures(s: Samples) -> dict[str, float]:
    return {
        "out": v(s, "ipsecmgr_esp_packets_total", map="tacacs", direction="out"),
        "in": v(s, "ipsecmgr_esp_packets_total", map="tacacs", direction="in"),
        "started": v(s, "ipsecmgr_ike_handshakes_started_total", map="tacacs"),
        "succeeded": v(s, "ipsecmgr_ike_handshakes_succeeded_total", map="tacacs"),
        "first_packet": v(
            s, "ipsecmgr_crypto_map_drops_total", map="tacacs", reason="first_packet"
        ),
        "no_sa": v(s, "ipsecmgr_esp_drops_total", direction="in", reason="no_sa"),
        "icv": v(s, "ipsecmgr_esp_drops_total", direction="in", reason="icv"),
    }


def agree(env: Env, gw: GatewayProcess, side: str, timeout: float = 15.0) -> Samples:
    """``show crypto statistics --json``, a scrape, ``show`` again, until all three say
    the same (trailing ACKs settle); the scrape's figures."""
    deadline = time.monotonic() + timeout
    while True:
        before = _show_figures(show_statistics(gw))
        status, text = scrape(env, side)
        assert status == 200
        s = samples(text)
        after = _show_figures(show_statistics(gw))
        if before == after == _metric_figures(s):
            return s
        assert time.monotonic() < deadline, (before, _metric_figures(s), after)


@pytest.mark.parametrize("datapath", ["single", "split"])
def test_metrics_scraped_during_traffic_agree_with_show(env: Env, datapath: str) -> None:
    extra = f'\n[metrics]\nlisten = "{METRICS}"\n'
    dp = f'[gateway]\ndatapath = "{datapath}"\n'
    gws: dict[str, GatewayProcess] = {}
    for side, fp in (("gw", "drop"), ("client", "queue")):
        conf = env.gws.write_config(side, first_packet=fp)
        conf.write_text(conf.read_text().replace("[gateway]\n", dp) + extra)
        gws[side] = env.gws.start(side, config=conf)
    client = gws["client"]

    # Off unless configured... and only /metrics is served
    assert scrape(env, "client", "/")[0] == 404
    idle = samples(scrape(env, "client")[1])
    assert v(idle, "ipsecmgr_crypto_map_state", map="tacacs", state="down") == 1
    assert v(idle, "ipsecmgr_esp_packets_total", map="tacacs", direction="out") == 0

    # Traffic in a thread while we scrape: every scrape parses, counters never go back
    results: list[object] = []

    def traffic() -> None:
        for _ in range(6):
            results.append(env.login()["status"])

    t = threading.Thread(target=traffic)
    t.start()
    seen: list[float] = []
    try:
        while t.is_alive() and len(seen) < 20:
            status, text = scrape(env, "client")
            assert status == 200
            seen.append(v(samples(text), "ipsecmgr_esp_packets_total", map="tacacs",
                          direction="out"))  # fmt: skip
    finally:
        t.join(timeout=120)
    assert results == ["PASS"] * 6
    assert seen, "no scrape while the traffic ran"
    after = samples(scrape(env, "client")[1])
    seen.append(v(after, "ipsecmgr_esp_packets_total", map="tacacs", direction="out"))
    assert seen == sorted(seen) and seen[-1] > 0, seen

    s = agree(env, client, "client")
    figures = _metric_figures(s)
    assert figures["out"] > 6 * 4 and figures["in"] > 6 * 4  # 6 TACACS+ sessions went through
    assert figures["started"] == figures["succeeded"] == 1
    assert v(s, "ipsecmgr_crypto_map_state", map="tacacs", state="up") == 1
    assert v(s, "ipsecmgr_ike_sas", map="tacacs", state="ESTABLISHED") == 1
    # Histograms: one handshake (initiator), one first-packet wait (queue mode)
    hs = v(s, "ipsecmgr_ike_handshake_seconds_count", map="tacacs")
    hs_sum = v(s, "ipsecmgr_ike_handshake_seconds_sum", map="tacacs")
    assert hs == 1 and 0 < hs_sum < 10
    assert v(s, "ipsecmgr_first_packet_wait_seconds_count", map="tacacs") == 1
    assert 0 < v(s, "ipsecmgr_first_packet_wait_seconds_sum", map="tacacs") <= hs_sum + 1
    # per SA: the live Child SA's counters are the map's (no SA retired yet)
    spi = client.snapshot()["child_sas"][0]["spi_in"]
    assert v(s, "ipsecmgr_child_sa_packets_total", map="tacacs", spi_in=spi,
             direction="out") == figures["out"]  # fmt: skip

    # The responder side: established by the peer, no handshake of its own started
    g = agree(env, gws["gw"], "gw")
    assert _metric_figures(g)["started"] == 0 and _metric_figures(g)["succeeded"] == 1
    assert _metric_figures(g)["in"] == figures["out"]
    # Drops: ESP with an unknown SPI and with a known SPI but a bad ICV, from the WAN
    gw_spi = gws["gw"].snapshot()["child_sas"][0]["spi_in"]
    bad = [
        bytes.fromhex("0000beef") + bytes(40),
        bytes.fromhex(gw_spi) + (1 << 30).to_bytes(4, "big") + bytes(40),
    ]
    send = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_RAW,50)\n"
        "for h in sys.argv[2:]: s.sendto(bytes.fromhex(h),(sys.argv[1],0))\n"
    )
    env.lab.ns("bypass").run(
        [sys.executable, "-c", send, env.lab.addresses.gw_wan4, *(b.hex() for b in bad)]
    )
    deadline = time.monotonic() + 15
    while True:
        d = _metric_figures(agree(env, gws["gw"], "gw"))
        if d["no_sa"] >= 1 and d["icv"] >= 1:
            break
        assert time.monotonic() < deadline, d

    # clear crypto sa: the SA is gone, the map's totals keep its packets (retired)
    assert client.command({"command": "clear"})["ok"]
    deadline = time.monotonic() + 10
    while client.snapshot()["child_sas"]:
        assert time.monotonic() < deadline
    cleared = agree(env, client, "client")
    assert _metric_figures(cleared)["out"] == figures["out"]
    assert not [n for n, lb in cleared if n.startswith("ipsecmgr_child_sa_packets")]
    assert env.login()["status"] == "PASS"
    again = agree(env, client, "client")
    assert _metric_figures(again)["out"] > figures["out"]
    assert _metric_figures(again)["started"] == 2


def test_a_handshake_without_answer_is_a_timeout_failure(env: Env) -> None:
    """No responder: our IKE_SA_INIT goes unanswered (200 ms, one retransmission),
    the map goes dead, and /metrics counts one failed handshake, reason timeout."""
    extra = f'\n[metrics]\nlisten = "{METRICS}"\n'
    opts = {"retransmission_timeout": 200, "max_retransmission": 1}
    client = env.start("client", extra=extra, map_options=opts)
    assert env.login().get("status") != "PASS"
    deadline = time.monotonic() + 15
    while True:
        s = samples(scrape(env, "client")[1])
        if v(s, "ipsecmgr_ike_handshakes_failed_total", map="tacacs", reason="timeout") >= 1:
            break
        assert time.monotonic() < deadline, client.log[-2000:]
    assert v(s, "ipsecmgr_ike_handshakes_started_total", map="tacacs") >= 1
    assert v(s, "ipsecmgr_ike_handshakes_succeeded_total", map="tacacs") == 0
    assert v(s, "ipsecmgr_dpd_events_total", map="tacacs", event="peer_dead") >= 1
    assert v(s, "ipsecmgr_ike_handshake_seconds_count", map="tacacs") == 0
    stats = client.snapshot()["statistics"]["ike"]
    assert stats["tacacs/handshake_timeouts"] == v(
        s, "ipsecmgr_ike_handshakes_failed_total", map="tacacs", reason="timeout"
    )


# ---------------------------------------------------------------- upgrade guard


def _clear_tacacs(packets: list[object], addr: str) -> list[object]:
    from scapy.layers.inet import IP, TCP

    return [
        p
        for p in packets
        if p.haslayer(TCP)  # type: ignore[attr-defined]
        and addr in (p[IP].src, p[IP].dst)  # type: ignore[index]
        and 49 in (p[TCP].sport, p[TCP].dport)  # type: ignore[index]
    ]


def test_an_upgrade_restart_has_no_clear_text_window(env: Env, tmp_path: Path) -> None:
    """docs/operations.md, upgrade: SIGTERM (on_stop = "block", the default) leaves the
    daemon's own prohibit routes (#14), so TACACS+ to the server is refused while no
    daemon runs, and the upgraded daemon takes the block over. The control (a stop with
    on_stop = "clear" lets the SYN out in clear) is tests/integration/test_failclosed.py."""
    from ipsecmgr.lab.capture import Capture

    server = env.lab.addresses.server4
    env.start("gw")
    env.start("client")
    wan = env.lab.interfaces["client.wan"]
    with Capture(env.lab.client, wan, tmp_path / "upgrade.pcap") as cap:
        assert env.login()["status"] == "PASS"
        assert env.gws["client"].terminate() == 0
        env.gws.gateways.pop("client")
        down = env.login()
        assert down.get("status") != "PASS", down
        env.start("client")  # the upgraded daemon
        assert env.login()["status"] == "PASS"
    packets = cap.packets()
    assert _clear_tacacs(packets, server) == []
    assert packets, "the capture saw the logins' ESP"


RAW_HTTP = """
import socket, sys
out = []
for req in sys.argv[1:]:
    with socket.create_connection(("127.0.0.1", 9754), timeout=10) as s:
        s.sendall(req.encode().decode("unicode_escape").encode("latin-1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    out.append(data.split(b"\\r\\n", 1)[0].decode())
print("\\n".join(out))
"""


def test_metrics_endpoint_bad_requests_and_a_taken_port(env: Env) -> None:
    extra = f'\n[metrics]\nlisten = "{METRICS}"\n'
    env.start("client", extra=extra)
    requests = [
        "POST /metrics HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n",
        "\\x00\\xff garbage\\r\\n\\r\\n",
        "GET /nothing HTTP/1.0\\r\\n\\r\\n",
        "GET /metrics?x=1 HTTP/1.0\\r\\n\\r\\n",
    ]
    lines = env.lab.client.run([sys.executable, "-c", RAW_HTTP, *requests]).stdout.split("\n")
    assert lines[:4] == [
        "HTTP/1.1 405 Method Not Allowed",
        "HTTP/1.1 405 Method Not Allowed",
        "HTTP/1.1 404 Not Found",
        "HTTP/1.1 200 OK",
    ]
    assert env.gws["client"].snapshot()["crypto_maps"]  # the daemon is still there
    # The [metrics] port is taken: the daemon refuses to start, says why, and
    # leaves nothing behind.
    assert env.gws["client"].terminate() == 0
    env.gws.gateways.pop("client")
    blocker = env.lab.client.popen([sys.executable, "-c", BLOCKER])
    try:
        assert blocker.stdout is not None and blocker.stdout.readline().strip() == "bound"
        conf = env.gws.write_config("client")
        conf.write_text(conf.read_text() + extra)
        proc = env.lab.client.popen(
            [sys.executable, "-m", "ipsecmgr.cli", "run", "--config", str(conf)], env=python_env()
        )
        _, err = proc.communicate(timeout=30)
    finally:
        blocker.terminate()
        blocker.wait(timeout=10)
    assert proc.returncode == 1, err
    assert "metrics.listen: cannot listen on 127.0.0.1:9754: Address already in use" in err
    assert "Traceback" not in err
    assert "ipsm0" not in env.lab.client.run(["ip", "-o", "link", "show"]).stdout


BLOCKER = """
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the scrapes' TIME_WAIT
s.bind(("127.0.0.1", 9754))
s.listen()
print("bound", flush=True)
time.sleep(60)
"""
