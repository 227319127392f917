"""The lab TACACS+ server against the independent tacacs_plus client, and against bad input."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator

import pytest
from tacacs_plus.client import TACACSClient
from tacacs_plus.flags import (
    TAC_PLUS_ACCT_FLAG_START,
    TAC_PLUS_AUTHEN_TYPE_ASCII,
    TAC_PLUS_AUTHEN_TYPE_PAP,
)

from ipsecmgr.lab import tacacs as t
from ipsecmgr.lab.tacacs_client import TacacsClientError, query
from ipsecmgr.lab.tacacs_server import TacacsServer, ThreadedTacacsServer, Transaction, User
from ipsecmgr.secret import Secret

SECRET = b"lab-shared-secret"
PASSWORD = "pässword-1"  # non-ASCII on purpose: tacacs_plus would send it as Latin-1


def _users() -> dict[str, User]:
    return {
        "alice": User("alice", Secret(PASSWORD.encode()), 15, ("priv-lvl=15", "shell:roles=admin")),
        "bob": User("bob", Secret(b"bobpw"), 1, ("priv-lvl=1",), deny_commands=("reload",)),
    }


@pytest.fixture(params=["127.0.0.1", "::1"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[TacacsServer, str, int]]:
    srv = TacacsServer(SECRET, _users())
    host: str = request.param
    with ThreadedTacacsServer(srv, [host]) as running:
        yield srv, host, running.port_for(host)


def _last(srv: TacacsServer) -> Transaction:
    return srv.transactions[-1]


def test_pap_and_ascii_with_tacacs_plus(server: tuple[TacacsServer, str, int]) -> None:
    srv, host, port = server
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    c = TACACSClient(host, port, SECRET.decode(), timeout=5, family=fam)
    assert c.authenticate("bob", "bobpw", authen_type=TAC_PLUS_AUTHEN_TYPE_PAP).valid
    assert (_last(srv).kind, _last(srv).user, _last(srv).method, _last(srv).result) == (
        "authen", "bob", "pap", "PASS",
    )  # fmt: skip
    c = TACACSClient(host, port, SECRET.decode(), timeout=5, family=fam)
    reply = c.authenticate("bob", "wrong", authen_type=TAC_PLUS_AUTHEN_TYPE_ASCII)
    assert reply.invalid
    assert (_last(srv).method, _last(srv).result) == ("ascii", "FAIL")
    c = TACACSClient(host, port, SECRET.decode(), timeout=5, family=fam)
    assert c.authenticate("bob", "bobpw", authen_type=TAC_PLUS_AUTHEN_TYPE_ASCII).valid
    assert (_last(srv).method, _last(srv).result) == ("ascii", "PASS")
    c = TACACSClient(host, port, SECRET.decode(), timeout=5, family=fam)
    assert c.account("bob", TAC_PLUS_ACCT_FLAG_START, arguments=[b"task_id=1"]).valid
    assert (_last(srv).kind, _last(srv).method, _last(srv).args) == (
        "acct",
        "START",
        ("task_id=1",),
    )


@pytest.mark.parametrize("authen_type", ["pap", "ascii", "chap"])
def test_authentication_via_wrapper(
    server: tuple[TacacsServer, str, int], authen_type: str
) -> None:
    srv, host, port = server
    ok = query(host, Secret(SECRET), "alice", password=Secret(PASSWORD.encode()), port=port,
               authen_type=authen_type)  # fmt: skip
    assert (ok["status"], ok["ok"]) == ("PASS", True)
    bad = query(host, Secret(SECRET), "alice", password=Secret(b"nope"), port=port,
                authen_type=authen_type)  # fmt: skip
    assert (bad["status"], bad["ok"]) == ("FAIL", False)
    unknown = query(host, Secret(SECRET), "mallory", password=Secret(b"x"), port=port,
                    authen_type=authen_type)  # fmt: skip
    assert unknown["status"] == "FAIL"
    assert [(x.user, x.method, x.result) for x in srv.transactions] == [
        ("alice", authen_type, "PASS"),
        ("alice", authen_type, "FAIL"),
        ("mallory", authen_type, "FAIL"),
    ]
    assert all(PASSWORD not in repr(x) and "nope" not in repr(x) for x in srv.transactions)


def test_authorization_and_accounting(server: tuple[TacacsServer, str, int]) -> None:
    srv, host, port = server
    sec = Secret(SECRET)
    r = query(host, sec, "alice", action="authorize", port=port,
              arguments=["service=shell", "cmd="])  # fmt: skip
    assert (r["status"], r["args"]) == ("PASS_ADD", ["priv-lvl=15", "shell:roles=admin"])
    r = query(host, sec, "bob", action="authorize", port=port,
              arguments=["service=shell", "cmd=reload", "cmd-arg=now"])  # fmt: skip
    assert r["status"] == "FAIL"
    r = query(host, sec, "mallory", action="authorize", port=port, arguments=["service=shell"])
    assert r["status"] == "FAIL"
    for flag, seen in (("start", "START"), ("watchdog", "WATCHDOG"), ("stop", "STOP")):
        r = query(host, sec, "alice", action="account", port=port, acct_flag=flag,
                  arguments=["task_id=7", "service=shell"])  # fmt: skip
        assert (r["status"], r["ok"]) == ("SUCCESS", True)
        assert (_last(srv).method, _last(srv).args) == (seen, ("task_id=7", "service=shell"))
    assert [(x.kind, x.user, x.result) for x in srv.transactions[:3]] == [
        ("author", "alice", "PASS_ADD"), ("author", "bob", "FAIL"), ("author", "mallory", "FAIL"),
    ]  # fmt: skip


def test_wrong_secret_gets_no_answer_and_server_survives(
    server: tuple[TacacsServer, str, int],
) -> None:
    srv, host, port = server
    with pytest.raises(TacacsClientError, match="closed the connection"):
        query(host, Secret(b"not-the-secret"), "alice", password=Secret(b"x"), port=port)
    assert _last(srv).kind == "error" and "wrong shared secret?" in _last(srv).result
    r = query(host, Secret(SECRET), "bob", password=Secret(b"bobpw"), port=port)
    assert r["ok"]


def _connect(host: str, port: int) -> socket.socket:
    s = socket.create_connection((host, port), timeout=5)
    return s


def _recv_packet(s: socket.socket) -> tuple[t.Header, bytes]:
    head = b""
    while len(head) < 12:
        chunk = s.recv(12 - len(head))
        assert chunk, "server closed"
        head += chunk
    h = t.Header.unpack(head)
    body = b""
    while len(body) < h.length:
        body += s.recv(h.length - len(body))
    return h, t.decode_body(h, body, SECRET)


def test_garbage_closes_only_that_connection(server: tuple[TacacsServer, str, int]) -> None:
    srv, host, port = server
    for junk in (b"GET / HTTP/1.1\r\n\r\n", b"\xc1\x01\x01\x00" + b"\xff" * 8, b"\xc0\x01"):
        with _connect(host, port) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(100) == b""  # closed, no reply
    assert [x.kind for x in srv.transactions] == ["error", "error", "error"]
    assert query(host, Secret(SECRET), "bob", password=Secret(b"bobpw"), port=port)["ok"]


def test_ascii_getuser_single_connect_and_abort(server: tuple[TacacsServer, str, int]) -> None:
    srv, host, port = server

    def send(s: socket.socket, sid: int, seq: int, body: bytes, flags: int = 0) -> None:
        s.sendall(t.encode_packet(version=t.VERSION_DEFAULT, type=t.AUTHEN, seq_no=seq,
                                  session_id=sid, body=body, key=SECRET, flags=flags))  # fmt: skip

    start = t.AuthenStart(t.AUTHEN_LOGIN, 1, t.AUTHEN_TYPE_ASCII, t.AUTHEN_SVC_LOGIN, b"", b"tty1",
                          b"192.0.2.1")  # fmt: skip
    with _connect(host, port) as s:
        send(s, 0x1234, 1, start.encode(), t.FLAG_SINGLE_CONNECT)
        h, body = _recv_packet(s)
        assert (h.seq_no, h.flags, t.AuthenReply.decode(body).status) == (
            2, t.FLAG_SINGLE_CONNECT, t.AUTHEN_STATUS_GETUSER,
        )  # fmt: skip
        send(s, 0x1234, 3, t.AuthenContinue(b"bob").encode())
        h, body = _recv_packet(s)
        r = t.AuthenReply.decode(body)
        assert (h.seq_no, r.status, r.flags) == (4, t.AUTHEN_STATUS_GETPASS, t.REPLY_FLAG_NOECHO)
        send(s, 0x1234, 5, t.AuthenContinue(b"bobpw").encode())
        h, body = _recv_packet(s)
        assert (h.seq_no, t.AuthenReply.decode(body).status) == (6, t.AUTHEN_STATUS_PASS)
        # single-connect: a second session on the same connection; the client aborts it
        send(s, 0x5678, 1, start.encode())
        _recv_packet(s)
        send(s, 0x5678, 3, t.AuthenContinue(b"", flags=t.CONTINUE_FLAG_ABORT).encode())
        # a sequence number out of order ends the connection
        send(s, 0x9999, 3, t.AuthenContinue(b"x").encode())
        assert s.recv(100) == b""
    assert [(x.kind, x.user, x.result) for x in srv.transactions] == [
        ("authen", "bob", "PASS"), ("authen", "", "ABORT"),
        ("error", "", "session 0x9999 starts with seq_no 3"),
    ]  # fmt: skip


def test_pap_with_minor_version_zero_is_an_error(server: tuple[TacacsServer, str, int]) -> None:
    srv, host, port = server
    start = t.AuthenStart(t.AUTHEN_LOGIN, 1, t.AUTHEN_TYPE_PAP, t.AUTHEN_SVC_LOGIN, b"bob", b"",
                          b"", b"bobpw")  # fmt: skip
    with _connect(host, port) as s:
        s.sendall(t.encode_packet(version=t.VERSION_DEFAULT, type=t.AUTHEN, seq_no=1,
                                  session_id=7, body=start.encode(), key=SECRET))  # fmt: skip
        _, body = _recv_packet(s)
    assert t.AuthenReply.decode(body).status == t.AUTHEN_STATUS_ERROR
    assert _last(srv).result == "ERROR"


# ---- tacacs_plus quirks the wrapper works around (see ipsecmgr.lab.tacacs_client)


def test_raw_tacacs_plus_mangles_utf8_passwords_wrapper_does_not(
    server: tuple[TacacsServer, str, int],
) -> None:
    _, host, port = server
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    # tacacs_plus encodes str as Latin-1: 'ä' goes out as 0xe4, not UTF-8 0xc3 0xa4
    raw = TACACSClient(host, port, SECRET.decode(), timeout=5, family=fam)
    assert raw.authenticate("alice", PASSWORD, authen_type=TAC_PLUS_AUTHEN_TYPE_PAP).invalid
    with pytest.raises(UnicodeEncodeError):
        TACACSClient(host, port, SECRET.decode(), timeout=5, family=fam).authenticate(
            "alice", "密码", authen_type=TAC_PLUS_AUTHEN_TYPE_PAP
        )
    ok = query(host, Secret(SECRET), "alice", password=Secret(PASSWORD.encode()), port=port)
    assert ok["ok"]


def test_wrapper_keeps_the_pap_password_out_of_debug_logs(
    server: tuple[TacacsServer, str, int], caplog: pytest.LogCaptureFixture
) -> None:
    _, host, port = server
    with caplog.at_level(logging.DEBUG):
        query(host, Secret(SECRET), "alice", password=Secret(PASSWORD.encode()), port=port)
    assert PASSWORD not in caplog.text and PASSWORD.encode("latin-1").hex() not in caplog.text


def test_wrapper_does_not_hang_when_the_server_closes_mid_body() -> None:
    # A "server" that sends a header announcing 100 bytes, then 3, then closes.
    # tacacs_plus's own send() loops forever on recv() == b"" here.
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]

    def serve() -> None:
        conn, _ = lsock.accept()
        with conn:
            data = b""
            while len(data) < 12 or len(data) < 12 + int.from_bytes(data[8:12], "big"):
                data += conn.recv(4096)  # read the whole request so close() sends FIN, not RST
            hdr = data[:12]
            conn.sendall(hdr[:2] + b"\x02\x00" + hdr[4:8] + (100).to_bytes(4, "big") + b"abc")

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    with pytest.raises(TacacsClientError, match="closed the connection"):
        query("127.0.0.1", Secret(SECRET), "alice", password=Secret(b"x"), port=port, timeout=5)
    th.join(5)
    lsock.close()


def test_idle_connection_is_closed() -> None:
    srv = TacacsServer(SECRET, _users(), idle_timeout=0.2)
    with (
        ThreadedTacacsServer(srv, ["127.0.0.1"]) as running,
        _connect("127.0.0.1", running.port_for("127.0.0.1")) as s,
    ):
        assert s.recv(100) == b""  # closed by the server, not by our 5 s timeout
    assert [(x.kind, x.result) for x in srv.transactions] == [("error", "idle for 0.2 s")]


def test_unobfuscated_mode_needs_the_unencrypted_flag() -> None:
    srv = TacacsServer(None, _users())
    start = t.AuthenStart(t.AUTHEN_LOGIN, 1, t.AUTHEN_TYPE_PAP, t.AUTHEN_SVC_LOGIN, b"bob", b"",
                          b"", b"bobpw")  # fmt: skip
    with ThreadedTacacsServer(srv, ["127.0.0.1"]) as running:
        port = running.port_for("127.0.0.1")
        with _connect("127.0.0.1", port) as s:
            s.sendall(t.encode_packet(version=t.VERSION_ONE, type=t.AUTHEN, seq_no=1,
                                      session_id=9, body=start.encode(), key=None))  # fmt: skip
            head = s.recv(12)
            h = t.Header.unpack(head)
            assert h.flags & t.FLAG_UNENCRYPTED
            assert t.AuthenReply.decode(s.recv(h.length)).status == t.AUTHEN_STATUS_PASS
        with _connect("127.0.0.1", port) as s:  # obfuscated, but no key configured: closed
            s.sendall(t.encode_packet(version=t.VERSION_ONE, type=t.AUTHEN, seq_no=1,
                                      session_id=9, body=start.encode(), key=b"k"))  # fmt: skip
            assert s.recv(100) == b""
    assert [x.result for x in srv.transactions] == [
        "PASS", "body: obfuscated but no shared secret is configured",
    ]  # fmt: skip
