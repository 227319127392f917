"""TACACS+ over TLS 1.3 (RFC 9887) through the gateway in the netns lab (root).

The lab's tunnel topology with the client host's gateway protecting the server
by TLS instead of ESP; the ``gw`` namespace only routes. The independent
tacacs_plus client logs in to 203.0.113.49:49 as it always did (no client
change); the gateway takes the connection transparently and the TLS TACACS+
server (the lab's server inside TLS 1.3, ipsecmgr.lab.tls_server) answers on
port 300. Captures on the client's WAN link check what crossed the wire.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ipsecmgr.lab import tacacs as t
from ipsecmgr.lab import tls_pki
from ipsecmgr.lab.capture import Capture
from ipsecmgr.lab.gateways import GatewayProcess, LabGateways
from ipsecmgr.lab.tls_lab import TLS_PORT, start_tls_server, tls_client_config
from ipsecmgr.lab.topology import Lab, python_env
from tests.integration.test_gateway import tcp_port_49

pytestmark = [pytest.mark.root, pytest.mark.slow]

USER, PASSWORD = "alice", "alice-pw-4711"
SERVER_B = "203.0.113.50"  # a second address on the server host


@dataclass
class TlsEnv:
    lab: Lab
    gws: LabGateways
    pki: Path
    secret: Path
    users: Path
    tmp: Path

    def config(self, **kw: Any) -> Path:
        a = self.lab.addresses
        text = tls_client_config(
            a, pki=self.pki, secret_file=self.secret,
            management_interface=self.lab.interfaces["client.wan"],
            control_socket=self.gws.dir / "client.sock", **kw,
        )  # fmt: skip
        path = self.tmp / "client-tls.toml"
        path.write_text(text)
        return path

    def start_gateway(self, **kw: Any) -> GatewayProcess:
        return self.gws.start("client", config=self.config(**kw))

    def login(self, server: str | None = None, password: str = PASSWORD) -> dict[str, Any]:
        return self.lab.tacacs_query(
            "client", server=server or self.lab.addresses.server4, secret_file=self.secret,
            user=USER, password=password, timeout=10,
        )  # fmt: skip

    def tls_show(self) -> dict[str, Any]:
        r = self.gws["client"].command({"command": "tls"})
        assert r["ok"], r
        result: dict[str, Any] = r["result"]
        return result

    def capture(self, name: str) -> Capture:
        return Capture(self.lab.client, self.lab.interfaces["client.wan"], self.tmp / name)


@pytest.fixture
def tls_env(tmp_path: Path) -> Iterator[TlsEnv]:
    secret = tmp_path / "tacacs-secret"
    secret.write_bytes(b"downstream-key")
    secret.chmod(0o600)
    users = tmp_path / "users.json"
    users.write_text(json.dumps({USER: {"password": PASSWORD}}))
    pki = tmp_path / "pki"
    with Lab("tunnel") as lab, LabGateways(lab) as gws:
        a = lab.addresses
        tls_pki.write_pki(pki, server_ips=[a.server4, SERVER_B, a.server6])
        lab.server.add_address(lab.interfaces["server.lan"], f"{SERVER_B}/24")
        yield TlsEnv(lab, gws, pki, secret, users, tmp_path)


def tcp_port(packets: list[Any], port: int) -> list[Any]:
    from scapy.layers.inet import TCP

    return [p for p in packets if p.haslayer(TCP) and port in (p[TCP].sport, p[TCP].dport)]


def test_transparent_login_over_tls_nothing_clear_on_the_wire(tls_env: TlsEnv) -> None:
    env = tls_env
    server = start_tls_server(env.lab, pki=env.pki, users_file=env.users)
    gw = env.start_gateway()
    with env.capture("tls.pcap") as cap:
        ok = env.login()
        bad = env.login(password="wrong")
    assert (ok.get("status"), bad.get("status")) == ("PASS", "FAIL"), (ok, gw.log[-3000:])
    assert [(t["user"], t["result"]) for t in server.transactions()] == [
        (USER, "PASS"), (USER, "FAIL"),
    ]  # fmt: skip
    packets = cap.packets()
    # The client spoke to 203.0.113.49:49; the wire carried only TLS to port 300.
    assert tcp_port_49(packets, env.lab.addresses.server4) == []
    assert len(tcp_port(packets, TLS_PORT)) >= 10
    snap = env.tls_show()
    (m,) = snap["maps"]
    (s,) = m["servers"]
    assert (s["state"], s["connections"], s["handshakes"], s["resumed"]) == ("up", 2, 1, 1)
    assert m["counters"]["requests"] == m["counters"]["responses"] == 2
    assert "transparent 203.0.113.49:49" in snap["listening"]
    text = subprocess.run(
        [sys.executable, "-m", "ipsecmgr.cli", "show", "tacacs", "tls", "--socket",
         str(gw.control)], capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    # Neither the downstream secret nor the password reaches the log or the show output.
    for text_ in (gw.log, text):
        assert "downstream-key" not in text_ and PASSWORD not in text_
    row = next(line for line in text.splitlines() if "203.0.113.49:300" in line)
    assert row.split()[:4] == ["1", "203.0.113.49:300", "203.0.113.49", "up"], text


def test_failover_from_a_dead_first_server_within_one_login(tls_env: TlsEnv) -> None:
    env = tls_env
    a = env.lab.addresses
    start_tls_server(env.lab, pki=env.pki, users_file=env.users, listen=[a.server4])
    # Priority 1: SERVER_B, up but nothing listens on 300 (connection refused).
    env.start_gateway(servers=[(SERVER_B, TLS_PORT), (a.server4, TLS_PORT)])
    assert env.login()["status"] == "PASS"
    first, second = env.tls_show()["maps"][0]["servers"]
    assert (first["failures"], first["last_error"]) == (1, "TCP connect: Connection refused")
    assert first["state"] == "held-down" and second["connections"] == 1


def test_all_servers_down_fails_closed(tls_env: TlsEnv) -> None:
    env = tls_env
    env.start_gateway()
    with env.capture("down.pcap") as cap:
        r = env.login()
    assert r["exit_code"] == 2  # no answer: the connection was closed
    assert tcp_port_49(cap.packets(), env.lab.addresses.server4) == []
    m = env.tls_show()["maps"][0]
    assert m["counters"]["refused_all_down"] == 1
    assert m["servers"][0]["last_error"] == "TCP connect: Connection refused"


@pytest.mark.parametrize("case", ["wrong-ca", "wrong-name", "expired", "tls12-only"])
def test_bad_server_refused_clear_error_nothing_in_clear(tls_env: TlsEnv, case: str) -> None:
    env = tls_env
    a = env.lab.addresses
    kw: dict[str, Any] = {}
    srv: dict[str, Any] = {}
    if case == "wrong-ca":
        other = env.tmp / "other-ca.crt"
        tls_pki.write_cert(other, tls_pki.make_ca("other").cert)
        kw["ca_file"] = other
    elif case == "wrong-name":
        kw["server_name"] = "not-tacacs.example"
    elif case == "expired":
        import datetime as dt

        # Re-issue the server certificate, expired, from a CA the gateway trusts.
        ca = tls_pki.make_ca()
        tls_pki.write_cert(env.pki / "ca.crt", ca.cert)
        now = dt.datetime.now(dt.UTC)
        exp = tls_pki.issue(ca, "x", server=True, ips=[a.server4],
                            not_before=now - dt.timedelta(days=9),
                            not_after=now - dt.timedelta(days=1))  # fmt: skip
        cli = tls_pki.issue(ca, "gw", server=False)
        tls_pki.write_cert(env.pki / "client.crt", cli.cert)
        tls_pki.write_key(env.pki / "client.key", cli.key)
        srv["cert"], srv["key"] = env.tmp / "exp.crt", env.tmp / "exp.key"
        tls_pki.write_cert(srv["cert"], exp.cert)
        tls_pki.write_key(srv["key"], exp.key)
    elif case == "tls12-only":
        srv["tls12_only"] = True
    start_tls_server(env.lab, pki=env.pki, users_file=env.users, **srv)
    env.start_gateway(**kw)
    with env.capture(f"{case}.pcap") as cap:
        r = env.login()
    assert r["exit_code"] == 2
    packets = cap.packets()
    assert tcp_port_49(packets, a.server4) == []
    assert tcp_port(packets, TLS_PORT)  # the attempt was made, over TLS only
    err = env.tls_show()["maps"][0]["servers"][0]["last_error"]
    expected = {
        "wrong-ca": "certificate verify failed: self-signed certificate in certificate chain",
        "wrong-name": "certificate verify failed: Hostname mismatch",
        "expired": "certificate verify failed: certificate has expired",
        "tls12-only": "TLS error: server closed the connection during the handshake",
    }[case]
    assert err.startswith(expected), err


def test_tshark_decrypts_with_the_exported_key_log(tls_env: TlsEnv) -> None:
    env = tls_env
    start_tls_server(env.lab, pki=env.pki, users_file=env.users)
    keylog = env.tmp / "sslkeys.log"
    env.start_gateway(keylog_file=keylog)
    with env.capture("keys.pcap") as cap:
        assert env.login()["status"] == "PASS"
    cap.stop()
    # tshark 4.0 has no TACACS+ sub-dissector for TLS ("tls.port" cannot map to
    # tacplus): it decrypts the records and hands the application data to "data";
    # the lab's codec reads the TACACS+ packets out of those bytes.
    pcap = str(env.tmp / "keys.pcap")
    out = subprocess.run(
        ["tshark", "-r", pcap, "-o", f"tls.keylog_file:{keylog}", "-d",
         f"tcp.port=={TLS_PORT},tls", "-d", f"tls.port=={TLS_PORT},data", "-T", "fields",
         "-e", "tcp.dstport", "-e", "data.data"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    requests = [bytes.fromhex(d) for port, _, d in (ln.partition("\t") for ln in out.splitlines())
                if port == str(TLS_PORT) and d]  # fmt: skip
    assert requests, out
    header = t.Header.unpack(requests[0][: t.HEADER_LEN])
    # RFC 9887 §4: inside TLS the body is not obfuscated (the UNENCRYPTED flag is set).
    assert header.flags & t.FLAG_UNENCRYPTED
    start = t.AuthenStart.decode(requests[0][t.HEADER_LEN : t.HEADER_LEN + header.length])
    assert start.user == USER.encode()
    # Without the key log: no TACACS+ visible at all.
    plain = subprocess.run(
        ["tshark", "-r", pcap, "-d", f"tcp.port=={TLS_PORT},tls", "-d",
         f"tls.port=={TLS_PORT},data", "-T", "fields", "-e", "data.data"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert plain.split() == []
    assert USER.encode().hex() not in Path(pcap).read_bytes().hex()


def test_one_gateway_server_a_by_ipsec_server_b_by_tls(tls_env: TlsEnv) -> None:
    """The migration's middle state: A still behind ESP, B already moved to TLS."""
    from tests.integration.test_gateway import esp_packets

    env = tls_env
    a = env.lab.addresses
    clear_server = env.lab.start_tacacs_server(
        "server", secret_file=env.secret, users_file=env.users, listen=[a.server4]
    )
    tls_server = start_tls_server(env.lab, pki=env.pki, users_file=env.users, listen=[SERVER_B])
    env.gws.start("gw")
    ipsec_part = env.gws.write_config("client").read_text()
    conf = env.config(protect=[SERVER_B], servers=[(SERVER_B, TLS_PORT)], extra=ipsec_part)
    env.gws.start("client", config=conf)
    with env.capture("both.pcap") as cap:
        assert env.login(a.server4)["status"] == "PASS"  # A: ESP
        assert env.login(SERVER_B)["status"] == "PASS"  # B: TLS
    packets = cap.packets()
    assert tcp_port_49(packets, a.server4) == [] and tcp_port_49(packets, SERVER_B) == []
    assert esp_packets(packets) and tcp_port(packets, TLS_PORT)
    assert [x["result"] for x in clear_server.transactions()] == ["PASS"]
    assert [x["result"] for x in tls_server.transactions()] == ["PASS"]
    m = env.tls_show()["maps"][0]
    assert m["counters"]["requests"] == 1  # only B's login went through the relay


def test_lab_up_tls_with_an_existing_pki_then_login_then_down(tmp_path: Path) -> None:
    """``lab up --mode tls --tls-pki DIR``: the printed setup works as printed."""
    pki = tmp_path / "given-pki"
    tls_pki.write_pki(pki, server_ips=["203.0.113.49"])
    state = tmp_path / "state"
    cli = [sys.executable, "-m", "ipsecmgr.cli", "lab"]
    up = subprocess.run([*cli, "up", "--mode", "tls", "--state", str(state), "--tls-pki",
                         str(pki)], capture_output=True, text=True, timeout=120)  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        assert (state / "tacacs-secret").stat().st_mode & 0o777 == 0o600
        assert not (state / "ca.crt").exists()  # the given PKI is used, not copied
        desc = json.loads((state / "lab.json").read_text())
        ns = desc["namespaces"]
        users = state / "users.json"
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns["server"], sys.executable, "-m",
             "ipsecmgr.lab.tls_server", "--listen", "203.0.113.49", "--pki", str(pki),
             "--users-file", str(users)], stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        gw = subprocess.Popen(
            ["ip", "netns", "exec", ns["client"], sys.executable, "-m", "ipsecmgr.cli", "run",
             "--config", str(state / "client.toml")], stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert server.stdout is not None and gw.stdout is not None
            assert json.loads(server.stdout.readline())["event"] == "listening"
            assert gw.stdout.readline().strip() == "ready"
            login = subprocess.run(
                ["ip", "netns", "exec", ns["client"], sys.executable, "-m",
                 "ipsecmgr.lab.tacacs_client", "--server", "203.0.113.49", "--secret-file",
                 str(state / "tacacs-secret"), "--user", "alice", "--password-env", "PW"],
                capture_output=True, text=True, timeout=60,
                env={**os.environ, "PW": "alice-lab-pw"},
            )  # fmt: skip
            assert json.loads(login.stdout.splitlines()[-1])["status"] == "PASS", login
            show = subprocess.run(
                [sys.executable, "-m", "ipsecmgr.cli", "show", "tacacs", "tls", "--socket",
                 str(state / "client.sock")], capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert "203.0.113.49:300" in show.stdout and " up " in show.stdout, show
        finally:
            for p in (gw, server):
                p.terminate()
                p.wait(timeout=20)
    finally:
        down = subprocess.run([*cli, "down", "--state", str(state)], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert down.returncode == 0, down.stdout


def _capture_state(env: TlsEnv) -> tuple[list[str], list[str]]:
    ns = env.lab.client
    rules = [r for r in ns.run(["ip", "rule"]).stdout.splitlines() if "dport 49" in r]
    routes = ns.run(["ip", "route", "show", "table", "18769"], check=False).stdout.splitlines()
    return rules, [r for r in routes if r.strip()]


def test_sigkill_and_sigterm_fail_closed_restart_takes_over_down_leaves_nothing(
    tls_env: TlsEnv,
) -> None:
    env = tls_env
    a = env.lab.addresses
    start_tls_server(env.lab, pki=env.pki, users_file=env.users)
    gw = env.start_gateway()
    rules, routes = _capture_state(env)
    assert len(rules) == 1 and "lookup 18769" in rules[0]
    assert [r.split() for r in routes] == [
        ["local", a.server4, "dev", "lo", "proto", "static", "scope", "host", "src", "127.0.0.1"]
    ]
    env.gws.gateways.pop("client").kill()
    # Killed: the capture stays, nothing listens: the client is refused, nothing in clear.
    with env.capture("killed.pcap") as cap:
        assert env.login()["exit_code"] == 2
    assert tcp_port_49(cap.packets(), a.server4) == []
    gw = env.start_gateway()  # takes over what the killed one left, works again
    assert env.login()["status"] == "PASS"
    assert len(_capture_state(env)[0]) == 1
    # SIGTERM with on_stop = "block" (the default, #14): the capture stays, refusing.
    assert gw.terminate() == 0
    env.gws.gateways.clear()
    assert _capture_state(env) == (rules, routes)
    with env.capture("stopped.pcap") as cap:
        assert env.login()["exit_code"] == 2
    assert tcp_port_49(cap.packets(), a.server4) == []
    # 'ipsecmgr down' removes the rules and the capture table.
    down = env.lab.client.popen([sys.executable, "-m", "ipsecmgr.cli", "down"], env=python_env())
    out, err = down.communicate(timeout=60)
    assert down.returncode == 0 and a.server4 in out, (out, err)
    assert _capture_state(env) == ([], [])


def test_ipv6_server_captured_transparently(tls_env: TlsEnv) -> None:
    env = tls_env
    a = env.lab.addresses
    server = start_tls_server(env.lab, pki=env.pki, users_file=env.users, listen=[a.server6])
    env.start_gateway(protect=[a.server6], servers=[(a.server6, TLS_PORT)])
    with env.capture("v6.pcap") as cap:
        r = env.login(a.server6)
    assert r.get("status") == "PASS", r
    assert [x["result"] for x in server.transactions()] == ["PASS"]
    packets = cap.packets()
    assert tcp_port_49(packets, a.server6) == [] and tcp_port(packets, TLS_PORT)
    assert f"transparent {a.server6}:49" in env.tls_show()["listening"]


def test_lab_demo_mode_tls() -> None:
    demo = subprocess.run([sys.executable, "-m", "ipsecmgr.cli", "lab", "demo", "--mode", "tls"],
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    out = demo.stdout
    assert "demo OK" in out
    for line in ("TACACS+ authenticate  PASS", "TACACS+ authorize     PASS_ADD",
                 "TACACS+ account       SUCCESS", "[tls] captured", "[tls] TLSv1.3 up with",
                 "[tls] response ←", "Listening: transparent"):  # fmt: skip
        assert line in out, out


def _poll(what: str, cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling a condition with a deadline


def test_sighup_moves_a_server_ipsec_to_tls_and_back_nothing_in_clear(
    tls_env: TlsEnv,
) -> None:
    """The migration in one running daemon: logins run back to back the whole
    time; SIGHUP adds a [tls_map] for the server (its capture goes in before the
    crypto maps are touched), then SIGHUP removes it again. Logins pass before,
    between and after (only one in flight at a switch may be reset), and no TCP
    port 49 ever crosses the wire in clear."""
    env = tls_env
    a = env.lab.addresses
    clear_server = env.lab.start_tacacs_server(
        "server", secret_file=env.secret, users_file=env.users, listen=[a.server4]
    )
    tls_server = start_tls_server(env.lab, pki=env.pki, users_file=env.users)
    env.gws.start("gw")
    ipsec_only = env.gws.write_config("client").read_text()
    conf = env.tmp / "client-migrate.toml"
    conf.write_text(ipsec_only)
    client = env.gws.start("client", config=conf)
    results: list[dict[str, Any]] = []
    stop = threading.Event()

    def logins() -> None:
        while not stop.is_set() and len(results) < 500:
            results.append(env.login())

    with env.capture("migrate.pcap") as cap:
        worker = threading.Thread(target=logins, daemon=True)
        worker.start()
        try:
            _poll("IPsec logins", lambda: len(clear_server.transactions()) >= 2)
            with_tls = env.config(extra=ipsec_only).read_text()  # + [tls_map], same server
            conf.write_text(with_tls)
            client.proc.send_signal(signal.SIGHUP)
            _poll("TLS logins", lambda: len(tls_server.transactions()) >= 2)
            n_clear = len(clear_server.transactions())
            conf.write_text(ipsec_only)
            client.proc.send_signal(signal.SIGHUP)
            _poll("IPsec again", lambda: len(clear_server.transactions()) >= n_clear + 2)
        finally:
            stop.set()
            worker.join(timeout=60)
    # A login whose TCP connection is open at the instant of a switch is reset
    # (its packets now reach the other path, which has no such connection): at
    # most one per switch, answered by no server, never sent in clear.
    failed = [r for r in results if r.get("status") != "PASS"]
    assert len(results) >= 6 and len(failed) <= 2, failed
    assert all(r["exit_code"] == 2 for r in failed), failed
    packets = cap.packets()
    assert tcp_port_49(packets, a.server4) == []
    assert tcp_port(packets, TLS_PORT)
    snap = env.tls_show()
    assert snap["maps"] == [] and snap["listening"] == []  # the TLS map is gone again
    assert _capture_state(env) == ([], [])
    assert "tls map tls: added" in client.log and "tls map tls: removed" in client.log


HOLD_OPEN = """
import socket, sys
c = socket.create_connection((sys.argv[1], 49), timeout=5)
print("open", c.getsockname()[0], flush=True)
sys.stdin.readline()
try:
    c.sendall(b"\\xc1\\x01\\x01\\x00" + bytes(8) + b"after-the-switch")
    print("sent", flush=True)
except OSError as e:
    print("error", e.errno, flush=True)
"""


def test_a_captured_connection_open_across_capture_removal_never_leaks(tls_env: TlsEnv) -> None:
    """A client connection taken by the capture and still open when a SIGHUP removes
    the capture: its next packets have a loopback source, which the kernel never
    routes out of the TUN or the WAN. Nothing reaches the wire."""
    env = tls_env
    a = env.lab.addresses
    env.lab.start_tacacs_server(
        "server", secret_file=env.secret, users_file=env.users, listen=[a.server4]
    )
    start_tls_server(env.lab, pki=env.pki, users_file=env.users)
    env.gws.start("gw")
    ipsec_only = env.gws.write_config("client").read_text()
    conf = env.tmp / "client-hold.toml"
    conf.write_text(env.config(extra=ipsec_only).read_text())
    client = env.gws.start("client", config=conf)
    holder = env.lab.client.popen([sys.executable, "-c", HOLD_OPEN, a.server4],
                                  stdin=subprocess.PIPE)  # fmt: skip
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline().split() == ["open", "127.0.0.1"]
    conf.write_text(ipsec_only)
    client.proc.send_signal(signal.SIGHUP)
    _poll("capture removed", lambda: _capture_state(env) == ([], []))
    with env.capture("hold.pcap") as cap:
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().split()[0] in ("sent", "error")
        assert env.login()["status"] == "PASS"  # the next login goes through ESP
    holder.kill()
    holder.wait(timeout=10)
    packets = cap.packets()
    assert tcp_port_49(packets, a.server4) == []
    assert b"after-the-switch" not in (env.tmp / "hold.pcap").read_bytes()
