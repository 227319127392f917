"""The TLS relay on loopback: real TLS 1.3 (Python ssl), the lab's TACACS+ server
behind it, the independent tacacs_plus client in front of it."""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from ipsecmgr.lab import tacacs as t
from ipsecmgr.lab.tacacs_client import TacacsClientError, query
from ipsecmgr.secret import Secret
from tests.tls.rig import DOWNSTREAM, PASSWORD, Pki, Rig, tls_map


def login(rig: Rig, password: str = PASSWORD, secret: bytes = DOWNSTREAM) -> dict[str, object]:
    return query("127.0.0.1", Secret(secret), "alice", password=Secret(password.encode()),
                 port=rig.port, authen_type="pap", timeout=10)  # fmt: skip


def closed_port() -> int:
    """A loopback port nobody listens on (bound then closed: connect is refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def test_aaa_through_tls_upstream_sees_unencrypted_flag_and_resumes(rig: Rig, pki: Pki) -> None:
    srv, port = rig.tls_server(pki)
    proxy = rig.start_proxy(tls_map(pki, [("127.0.0.1", port)]))
    assert login(rig)["status"] == "PASS"
    assert login(rig, "wrong")["status"] == "FAIL"
    r = query("127.0.0.1", Secret(DOWNSTREAM), "alice", action="authorize", port=rig.port,
              arguments=["service=shell", "cmd="])  # fmt: skip
    assert (r["status"], r["args"]) == ("PASS_ADD", ["priv-lvl=15"])
    r = query("127.0.0.1", Secret(DOWNSTREAM), "alice", action="account", port=rig.port)
    assert r["status"] == "SUCCESS"
    # The server ran with no secret: it accepted only packets with the UNENCRYPTED
    # flag (RFC 9887 §4) and saw the user and the outcome.
    assert [(x.kind, x.user, x.result) for x in srv.transactions] == [
        ("authen", "alice", "PASS"), ("authen", "alice", "FAIL"),
        ("author", "alice", "PASS_ADD"), ("acct", "alice", "SUCCESS"),
    ]  # fmt: skip
    view = rig.lt.call(lambda: proxy.view(0.0))
    (s,) = view["servers"]
    assert s["state"] == "up" and s["connections"] == 4
    # One full handshake, then the saved TLS 1.3 ticket resumes the others.
    assert (s["handshakes"], s["resumed"]) == (1, 3)
    assert view["counters"]["requests"] == view["counters"]["responses"] == 4


def test_failover_from_a_dead_first_server_within_one_login(rig: Rig, pki: Pki) -> None:
    srv, port = rig.tls_server(pki)
    dead = closed_port()
    proxy = rig.start_proxy(tls_map(pki, [("127.0.0.1", dead), ("127.0.0.1", port)]))
    assert login(rig)["status"] == "PASS"
    first, second = rig.lt.call(lambda: proxy.view(0.0))["servers"]
    assert first["failures"] == 1 and "refused" in first["last_error"].lower()
    assert second["connections"] == 1
    # Held down: the next login goes straight to the second server.
    assert login(rig)["status"] == "PASS"
    view = rig.lt.call(lambda: proxy.view(0.0))
    first, second = view["servers"]
    assert first["failures"] == 1 and second["connections"] == 2
    assert [x.result for x in srv.transactions] == ["PASS", "PASS"]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("wrong-ca", "certificate verify failed: self-signed certificate in certificate chain"),
        ("wrong-name", "certificate verify failed: IP address mismatch"),
        ("wrong-dns-name", "certificate verify failed: Hostname mismatch"),
        ("expired", "certificate verify failed: certificate has expired"),
        ("tls12-only", "TLS error: TLSV1_ALERT_PROTOCOL_VERSION"),
    ],
)
def test_bad_server_is_refused_with_a_clear_error(
    rig: Rig, pki: Pki, case: str, expected: str
) -> None:
    kw: dict[str, object] = {}
    if case == "wrong-name":
        srv, port = rig.tls_server(pki, cert=pki.wrong_name_crt, key=pki.wrong_name_key)
    elif case == "expired":
        srv, port = rig.tls_server(pki, cert=pki.expired_crt, key=pki.expired_key)
    elif case == "tls12-only":
        srv, port = rig.tls_server(pki)  # unused: the TLS 1.2 server is openssl's
        port = rig.openssl_tls12_server(pki)
    else:
        srv, port = rig.tls_server(pki)
    if case == "wrong-ca":
        kw["ca_file"] = pki.other_ca
    if case == "wrong-dns-name":
        kw["name"] = "not-tacacs.example"
    proxy = rig.start_proxy(tls_map(pki, [("127.0.0.1", port)], **kw))
    with pytest.raises(TacacsClientError):
        login(rig)  # the client's connection is closed: fail closed, no answer
    view = rig.lt.call(lambda: proxy.view(0.0))
    (s,) = view["servers"]
    assert s["last_error"].startswith(expected), s["last_error"]
    assert s["connections"] == 0 and s["failures"] == 1
    assert view["counters"]["refused_all_down"] == 1
    assert srv.transactions == [] or all(x.kind == "error" for x in srv.transactions)


def test_dns_name_identity_is_checked_and_accepted(rig: Rig, pki: Pki) -> None:
    _srv, port = rig.tls_server(pki)
    rig.start_proxy(tls_map(pki, [("127.0.0.1", port)], name="tacacs.example"))
    assert login(rig)["status"] == "PASS"


def test_wrong_downstream_secret_is_refused_before_any_upstream(rig: Rig, pki: Pki) -> None:
    srv, port = rig.tls_server(pki)
    proxy = rig.start_proxy(tls_map(pki, [("127.0.0.1", port)]))
    with pytest.raises(TacacsClientError):
        login(rig, secret=b"not-the-secret")
    view = rig.lt.call(lambda: proxy.view(0.0))
    assert view["counters"]["bad_secret"] == 1
    assert view["servers"][0]["connections"] == 0
    assert srv.transactions == []


def test_client_sending_cleartext_is_refused(rig: Rig, pki: Pki) -> None:
    """RFC 8907 §4.5: with a secret configured, an UNENCRYPTED packet is refused."""
    _srv, port = rig.tls_server(pki)
    proxy = rig.start_proxy(tls_map(pki, [("127.0.0.1", port)]))
    body = t.AuthenStart(t.AUTHEN_LOGIN, 15, t.AUTHEN_TYPE_PAP, t.AUTHEN_SVC_LOGIN,
                         b"alice", b"tty0", b"", PASSWORD.encode()).encode()  # fmt: skip
    pkt = t.encode_packet(version=t.VERSION_ONE, type=t.AUTHEN, seq_no=1, session_id=7,
                          body=body, key=None)  # fmt: skip
    with socket.create_connection(("127.0.0.1", rig.port), timeout=10) as c:
        c.sendall(pkt)
        assert c.recv(100) == b""  # closed, no reply
    assert rig.lt.call(lambda: proxy.view(0.0))["counters"]["bad_secret"] == 1


def test_keylog_written_only_when_configured(rig: Rig, pki: Pki) -> None:
    _srv, port = rig.tls_server(pki)
    keylog = pki.dir / "keys.log"
    keylog.unlink(missing_ok=True)
    rig.start_proxy(tls_map(pki, [("127.0.0.1", port)]))
    assert login(rig)["status"] == "PASS"
    assert not keylog.exists()


def test_keylog_format(rig: Rig, pki: Pki, tmp_path: object) -> None:
    _srv, port = rig.tls_server(pki)
    keylog = pki.dir / "keys2.log"
    keylog.unlink(missing_ok=True)
    rig.start_proxy(tls_map(pki, [("127.0.0.1", port)], keylog_file=keylog))
    assert login(rig)["status"] == "PASS"
    labels = {line.split()[0] for line in keylog.read_text().splitlines() if line.strip()}
    # NSS key log format, TLS 1.3 labels (what Wireshark's tls.keylog_file reads).
    assert {"CLIENT_HANDSHAKE_TRAFFIC_SECRET", "CLIENT_TRAFFIC_SECRET_0"} <= labels


def test_context_refuses_tls12(pki: Pki) -> None:
    from ipsecmgr.tls.tlsconn import client_context

    ctx = client_context(tls_map(pki, [("127.0.0.1", 1)]))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_hold_down_doubles_per_failure_up_to_the_maximum(rig: Rig, pki: Pki) -> None:
    """Known values: hold_down 10 s, max 35 s: 10, 20, 35, 35; a success clears it."""
    from ipsecmgr.tls.tlsconn import client_context
    from ipsecmgr.tls.upstream import UpstreamPool

    now = [1000.0]
    m = tls_map(pki, [("127.0.0.1", 1), ("127.0.0.1", 2)], hold_down=10.0, hold_down_max=35.0)
    pool = UpstreamPool(m, client_context(m), None, clock=lambda: now[0])
    first = pool.servers[0]
    holds = []
    for _ in range(4):
        pool.failed(first, "x")
        holds.append(first.hold.left(now[0]))
    assert holds == [10.0, 20.0, 35.0, 35.0]
    assert [s.priority for s in pool.order()] == [2]  # first skipped while held
    now[0] += 35.0
    assert [s.priority for s in pool.order()] == [1, 2]  # hold-down over: priority order again
    pool.failed(pool.servers[1], "y")
    now[0] += 0.5
    pool.failed(first, "x")
    # Every server held down: all are still tried, in priority order.
    assert [s.priority for s in pool.order()] == [1, 2]


def test_garbage_from_a_client_is_counted_and_the_relay_keeps_serving(rig: Rig, pki: Pki) -> None:
    _srv, port = rig.tls_server(pki)
    proxy = rig.start_proxy(tls_map(pki, [("127.0.0.1", port)]))
    for junk in (b"\x00" * 12, b"\xc1\x01\x01\x00" + b"\x00\x00\x00\x01" + b"\xff\xff\xff\xff",
                 b"\xc1\x07\x01\x00" + bytes(8), b"\xc1\x01"):  # fmt: skip
        with socket.create_connection(("127.0.0.1", rig.port), timeout=10) as c:
            c.sendall(junk)
            c.shutdown(socket.SHUT_WR)
            assert c.recv(100) == b""
    view = rig.lt.call(lambda: proxy.view(0.0))
    assert view["counters"]["bad_packet"] == 4
    assert view["servers"][0]["connections"] == 0  # nothing reached upstream
    assert login(rig)["status"] == "PASS"


def test_trace_shows_the_steps_of_a_protected_flow(rig: Rig, pki: Pki) -> None:
    import asyncio

    from ipsecmgr.tls.proxy import MapProxy

    _srv, port = rig.tls_server(pki)
    dead = closed_port()
    events: list[tuple[str, dict[str, object]]] = []

    async def go() -> tuple[MapProxy, asyncio.Server]:
        proxy = MapProxy(tls_map(pki, [("127.0.0.1", dead), ("127.0.0.1", port)]), None,
                         lambda step, fields: events.append((step, fields)))  # fmt: skip
        return proxy, await asyncio.start_server(proxy.handle, "127.0.0.1", 0)

    rig.proxy, lst = rig.lt.run(go())
    rig._listeners.append(lst)
    rig.port = lst.sockets[0].getsockname()[1]
    assert login(rig)["status"] == "PASS"
    rig.lt.call(lambda: None)
    steps = [s for s, _ in events]
    assert steps == ["capture", "classify", "upstream-chosen", "upstream-failed",
                     "upstream-chosen", "tls-up", "request", "response"]  # fmt: skip
    assert {f["conn"] for _, f in events} == {1}
    assert events[3][1]["error"] == "TCP connect: Connection refused"
    assert events[5][1]["version"] == "TLSv1.3"
    assert all("secret" not in repr(f) and PASSWORD not in repr(f) for _, f in events)


def test_server_obfuscating_inside_tls_is_an_upstream_error(rig: Rig, pki: Pki) -> None:
    """A server still configured with a TACACS+ key inside TLS refuses our
    UNENCRYPTED packets (RFC 8907 §4.5): the relay counts it, fails closed."""
    from ipsecmgr.lab.tacacs_server import TacacsServer
    from ipsecmgr.lab.tls_server import server_context
    from tests.tls.rig import users

    ctx = server_context(pki.ca, pki.server_crt, pki.server_key)
    srv = TacacsServer(b"legacy-key", users())
    bound = rig.lt.run(srv.start(["127.0.0.1"], 0, ssl=ctx))
    rig.servers.append(srv)
    proxy = rig.start_proxy(tls_map(pki, [("127.0.0.1", bound[0][1])]))
    with pytest.raises(TacacsClientError):
        login(rig)
    (s,) = rig.lt.call(lambda: proxy.view(0.0))["servers"]
    assert s["connections"] == 1 and s["failures"] == 1
    assert s["last_error"].startswith("server closed the"), s["last_error"]
    assert [x.kind for x in srv.transactions] == ["error"]


def test_concurrent_clients_each_get_their_answer(rig: Rig, pki: Pki) -> None:
    from concurrent.futures import ThreadPoolExecutor

    srv, port = rig.tls_server(pki)
    proxy = rig.start_proxy(tls_map(pki, [("127.0.0.1", port)]))
    passwords = [PASSWORD if i % 2 == 0 else "wrong" for i in range(16)]
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda pw: login(rig, pw)["status"], passwords))
    assert results == ["PASS" if pw == PASSWORD else "FAIL" for pw in passwords]
    assert sorted(x.result for x in srv.transactions) == ["FAIL"] * 8 + ["PASS"] * 8
    # The relay sees each client's close after the client has its answer: poll.
    deadline = time.monotonic() + 10
    while True:
        view = rig.lt.call(lambda: proxy.view(0.0))
        if view["counters"]["active"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # polling with a deadline, not standing in for a sync point
    assert view["counters"]["accepted"] == 16 and view["counters"]["active"] == 0
    assert view["servers"][0]["active"] == 0


def test_a_server_that_never_answers_is_failed_over_within_the_login(rig: Rig, pki: Pki) -> None:
    import asyncio

    from ipsecmgr.lab.tls_server import server_context

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # takes the request, never answers, until the relay leaves
        writer.close()

    async def start_silent() -> asyncio.Server:
        ctx = server_context(pki.ca, pki.server_crt, pki.server_key)
        return await asyncio.start_server(silent, "127.0.0.1", 0, ssl=ctx)

    hung = rig.lt.run(start_silent())
    rig._listeners.append(hung)
    srv, port = rig.tls_server(pki)
    m = tls_map(pki, [("127.0.0.1", hung.sockets[0].getsockname()[1]), ("127.0.0.1", port)],
                response_timeout=1.0)  # fmt: skip
    proxy = rig.start_proxy(m)
    t0 = time.monotonic()
    assert login(rig)["status"] == "PASS"
    assert time.monotonic() - t0 < 4.0  # 1 s response timeout, then the second server
    first, second = rig.lt.call(lambda: proxy.view(0.0))["servers"]
    assert (first["last_error"], first["connections"]) == ("no response within 1 s", 1)
    assert second["responses"] == 1
    assert [x.result for x in srv.transactions] == ["PASS"]


def test_trace_timeline_text_of_the_tls_steps() -> None:
    from ipsecmgr.trace.render import describe

    base = {"step": "tls", "flow": "tls:b:1", "map": "b", "conn": 1, "server": "192.0.2.9:300"}
    texts = [
        describe({**base, "event": "capture", "client": "192.0.2.1:4000",
                  "destination": "203.0.113.49:49"}),
        describe({**base, "event": "upstream-failed", "error": "TCP connect timeout (3 s)"}),
        describe({**base, "event": "tls-up", "version": "TLSv1.3", "resumed": True}),
        describe({**base, "event": "request", "session": "0x00000007", "seq": 1}),
    ]  # fmt: skip
    assert texts == [
        "captured 192.0.2.1:4000 → 203.0.113.49:49",
        "upstream 192.0.2.9:300 failed: TCP connect timeout (3 s)",
        "TLSv1.3 up with 192.0.2.9:300 (resumed: True)",
        "request → 192.0.2.9:300: session 0x00000007 seq 1",
    ]


def test_a_bad_second_packet_releases_the_upstream_connection(rig: Rig, pki: Pki) -> None:
    """The relay refuses a client mid-connection: its TLS upstream is closed too."""
    _srv, port = rig.tls_server(pki)
    proxy = rig.start_proxy(tls_map(pki, [("127.0.0.1", port)]))
    args = (b"service=shell", b"cmd=")
    body = t.AuthorRequest(t.AUTHEN_METH_TACACSPLUS, 1, t.AUTHEN_TYPE_PAP, t.AUTHEN_SVC_LOGIN,
                           b"alice", b"tty0", b"", args).encode()  # fmt: skip
    good = t.encode_packet(version=t.VERSION_DEFAULT, type=t.AUTHOR, seq_no=1, session_id=9,
                           body=body, key=DOWNSTREAM, flags=t.FLAG_SINGLE_CONNECT)  # fmt: skip
    bad = t.encode_packet(version=t.VERSION_DEFAULT, type=t.AUTHOR, seq_no=1, session_id=10,
                          body=body, key=b"wrong", flags=t.FLAG_SINGLE_CONNECT)  # fmt: skip
    with socket.create_connection(("127.0.0.1", rig.port), timeout=10) as c:
        c.sendall(good)
        reply = c.recv(4096)
        assert t.Header.unpack(reply[: t.HEADER_LEN]).seq_no == 2
        c.sendall(bad)
        assert c.recv(100) == b""
    deadline = time.monotonic() + 10
    while True:
        view = rig.lt.call(lambda: proxy.view(0.0))
        if view["servers"][0]["active"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # polling with a deadline
    assert view["counters"]["bad_secret"] == 1 and view["counters"]["active"] == 0
    assert view["servers"][0]["active"] == 0 and view["servers"][0]["connections"] == 1


def test_listen_address_in_use_is_a_clear_startup_error(pki: Pki) -> None:
    import ipaddress

    from ipsecmgr.config import Config, ConfigError, Gateway
    from ipsecmgr.tls.service import TlsService

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        m = tls_map(pki, [("127.0.0.1", 1)], listen=(ipaddress.ip_address("127.0.0.1"), port))
        gw = Gateway((ipaddress.ip_address("127.0.0.1"),))
        config = Config({}, {}, {}, {}, (), gw, tls_maps={"b": m})
        svc = TlsService(config, table=None, mark=None)
        with pytest.raises(ConfigError) as exc:
            svc.setup()
        svc.teardown()
    assert str(exc.value) == f"tls_map.b: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_reload_adds_changes_removes_maps_and_a_failed_reload_changes_nothing(
    rig: Rig, pki: Pki
) -> None:
    import ipaddress
    from dataclasses import replace

    from ipsecmgr.config import Config, ConfigError, Gateway
    from ipsecmgr.tls.service import TlsService

    _srv, port = rig.tls_server(pki)
    lo = ipaddress.ip_address("127.0.0.1")
    gw = Gateway((lo,))

    def config(*maps: object) -> Config:
        return Config({}, {}, {}, {}, (), gw, tls_maps={m.name: m for m in maps})  # type: ignore[attr-defined]

    from tests.tls.rig import free_port

    a_port = free_port()
    a = replace(tls_map(pki, [("127.0.0.1", port)]), name="a", listen=(lo, a_port))
    svc = TlsService(config(a), table=None, mark=None)
    svc.setup()
    try:
        rig.lt.run(svc.start())
        (a_listen,) = svc.listening()
        rig.port = a_port
        assert login(rig)["status"] == "PASS"
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            bad = replace(a, name="b", listen=(lo, busy.getsockname()[1]))
            with pytest.raises(ConfigError):
                rig.lt.run(svc.reload_begin(config(a, bad)))
            rig.lt.run(svc.reload_abort())
        assert svc.listening() == [a_listen] and list(svc.proxies) == ["a"]
        # Change "a" (new downstream secret), add "c" on a new port: both live at once.
        a2 = replace(a, listen=(lo, a_port), downstream_secret=Secret(b"new-secret"))
        c = replace(a, name="c", listen=(lo, 0))
        rig.lt.run(svc.reload_begin(config(a2, c)))
        rig.lt.run(svc.reload_end())
        assert len(svc.listening()) == 2 and sorted(svc.proxies) == ["a", "c"]
        assert login(rig, secret=b"new-secret")["status"] == "PASS"  # same socket, new relay
        rig.lt.run(svc.reload_begin(config(c)))
        rig.lt.run(svc.reload_end())
        assert list(svc.proxies) == ["c"] and len(svc.listening()) == 1
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", a_port), timeout=5).close()
    finally:
        rig.lt.run(svc.close())
        svc.teardown()
