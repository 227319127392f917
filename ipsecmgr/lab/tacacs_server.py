"""A small RFC 8907 TACACS+ server for the lab and the tests (asyncio).

It answers authentication (PAP, CHAP, ASCII login with GETUSER/GETPASS
prompts), authorization (PASS_ADD with the user's attribute-value pairs, FAIL
for unknown users or denied commands) and accounting (START/STOP/WATCHDOG:
SUCCESS). A packet it cannot make sense of (wrong shared secret, garbage, a
sequence number out of order) ends the connection; it never ends the server.

Each finished transaction is recorded as a :class:`Transaction` (user, kind,
result; never a password) in ``server.transactions`` and, when run as a
program, printed as one JSON line, so a test can assert what the server saw::

    python -m ipsecmgr.lab.tacacs_server --listen 203.0.113.49 --port 49 \\
        --secret-file /path/secret --users-file /path/users.json

The users file is JSON: ``{"alice": {"password": "...", "priv_lvl": 15,
"avps": ["priv-lvl=15"], "deny_commands": ["reload"]}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import signal
import ssl as ssl_
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ipsecmgr.lab import tacacs as t
from ipsecmgr.secret import Secret, SecretError, read_secret_env, read_secret_file


@dataclass(frozen=True)
class User:
    name: str
    password: Secret = field(repr=False)
    priv_lvl: int = 15
    avps: tuple[str, ...] = ("priv-lvl=15",)
    deny_commands: tuple[str, ...] = ()


@dataclass(frozen=True)
class Transaction:
    """What the server decided for one session. No password is ever stored here."""

    kind: str  # "authen" | "author" | "acct" | "error"
    user: str
    result: str  # PASS/FAIL/ERROR/ABORT, PASS_ADD/FAIL, SUCCESS/ERROR, or the error reason
    peer: str
    session_id: int
    method: str = ""  # authen: pap/ascii/chap; acct: START/STOP/WATCHDOG
    args: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"event": "transaction", **asdict(self)}, sort_keys=True)


def load_users(path: Path) -> dict[str, User]:
    """Read the JSON users file (see the module docstring)."""
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of users")
    users: dict[str, User] = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("password"), str):
            raise ValueError(f"{path}: user {name!r} needs a string 'password'")
        users[name] = User(
            name,
            Secret(spec["password"].encode()),
            int(spec.get("priv_lvl", 15)),
            tuple(spec.get("avps", [f"priv-lvl={int(spec.get('priv_lvl', 15))}"])),
            tuple(spec.get("deny_commands", [])),
        )
    return users


@dataclass
class _Session:
    """Per-session state: the ASCII login dialogue and the sequence number expected next."""

    next_seq: int
    version: int
    user: str = ""
    awaiting: str = ""  # "user" | "pass"
    authen_type: int = t.AUTHEN_TYPE_ASCII


MAX_SESSIONS = 64  # concurrent sessions on one single-connect connection


class _Close(Exception):
    """End this connection (the reason is recorded as an "error" transaction)."""


class TacacsServer:
    """The protocol logic plus an asyncio listener. ``secret=None``: unobfuscated."""

    def __init__(
        self,
        secret: bytes | Secret | None,
        users: Mapping[str, User],
        on_transaction: Callable[[Transaction], None] | None = None,
        *,
        idle_timeout: float = 30.0,
    ) -> None:
        self.idle_timeout = idle_timeout
        self._key = secret.reveal() if isinstance(secret, Secret) else secret
        self.users = dict(users)
        self.transactions: list[Transaction] = []
        self._on_transaction = on_transaction
        self._servers: list[asyncio.Server] = []

    def __repr__(self) -> str:
        return f"TacacsServer(users={sorted(self.users)})"

    # ---------------------------------------------------------------- I/O

    async def start(
        self, hosts: Sequence[str], port: int, *, ssl: ssl_.SSLContext | None = None
    ) -> list[tuple[str, int]]:
        """Listen on every host; return the bound (address, port) pairs.
        ``ssl``: serve TACACS+ over TLS (RFC 9887, see :mod:`ipsecmgr.lab.tls_server`)."""
        bound: list[tuple[str, int]] = []
        for host in hosts:
            srv = await asyncio.start_server(self._handle, host, port, reuse_address=True, ssl=ssl)
            self._servers.append(srv)
            bound += [(s.getsockname()[0], s.getsockname()[1]) for s in srv.sockets]
        return bound

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
            await srv.wait_closed()
        self._servers.clear()

    def _record(self, tr: Transaction) -> None:
        # Recorded before the reply is written, so a client that has its answer
        # can rely on the server's log already holding the transaction.
        self.transactions.append(tr)
        if self._on_transaction is not None:
            self._on_transaction(tr)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_info = writer.get_extra_info("peername")
        peer = str(peer_info[0]) if peer_info else "?"
        sessions: dict[int, _Session] = {}
        single_connect = False
        first = True
        try:
            while True:
                try:
                    # A silent client must not hold a connection (and a task) forever.
                    async with asyncio.timeout(self.idle_timeout):
                        raw = await reader.readexactly(t.HEADER_LEN)
                except asyncio.IncompleteReadError as e:
                    if e.partial:
                        raise _Close("truncated header") from None
                    return  # clean close by the client
                except TimeoutError:
                    raise _Close(f"idle for {self.idle_timeout:g} s") from None
                header = t.Header.unpack(raw)
                if header.length > t.MAX_BODY:
                    raise _Close(f"body length {header.length} too large")
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        wire = await reader.readexactly(header.length)
                except TimeoutError:
                    raise _Close("body did not arrive") from None
                if first:
                    # RFC 8907 §4.3: single-connection mode is offered by the
                    # client in its first packet and accepted by echoing the flag.
                    single_connect = bool(header.flags & t.FLAG_SINGLE_CONNECT)
                    first = False
                reply, done = self._packet(header, wire, sessions, peer)
                if reply is not None:
                    flags = t.FLAG_SINGLE_CONNECT if single_connect else 0
                    writer.write(
                        t.encode_packet(
                            version=header.version, type=header.type, seq_no=header.seq_no + 1,
                            session_id=header.session_id, body=reply, key=self._key, flags=flags,
                        )
                    )  # fmt: skip
                    await writer.drain()
                if done:
                    sessions.pop(header.session_id, None)
                    if not single_connect:
                        return
        except (t.TacacsError, _Close) as e:
            self._record(Transaction("error", "", str(e), peer, 0))
        except (asyncio.IncompleteReadError, ConnectionError):
            self._record(Transaction("error", "", "connection lost mid-packet", peer, 0))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    # ---------------------------------------------------------------- logic

    def _packet(
        self, header: t.Header, wire: bytes, sessions: dict[int, _Session], peer: str
    ) -> tuple[bytes | None, bool]:
        """Handle one client packet; return (reply body or None, session finished)."""
        body = t.decode_body(header, wire, self._key)
        if header.seq_no % 2 == 0:
            raise _Close(f"even seq_no {header.seq_no} from a client")
        sess = sessions.get(header.session_id)
        if sess is None:
            if header.seq_no != 1:
                raise _Close(f"session {header.session_id:#x} starts with seq_no {header.seq_no}")
            if len(sessions) >= MAX_SESSIONS:
                raise _Close(f"more than {MAX_SESSIONS} sessions on one connection")
            sess = sessions[header.session_id] = _Session(1, header.version)
        if header.version != sess.version:
            raise _Close(f"version {header.version:#x} changed within the session")
        if header.seq_no != sess.next_seq:
            raise _Close(f"seq_no {header.seq_no}, expected {sess.next_seq}")
        if header.seq_no >= 255:
            # RFC 8907 §4.1: seq_no never wraps; the session must be restarted.
            raise _Close("seq_no would wrap")
        sess.next_seq = header.seq_no + 2
        try:
            return self._dispatch(header, body, sess, peer)
        except t.TacacsError as e:
            # An obfuscated body with the wrong key decodes to noise.
            raise _Close(f"undecodable body (wrong shared secret?): {e}") from None

    def _dispatch(
        self, header: t.Header, body: bytes, sess: _Session, peer: str
    ) -> tuple[bytes | None, bool]:
        sid = header.session_id
        if header.type == t.AUTHEN:
            if header.seq_no == 1:
                return self._authen_start(header, t.AuthenStart.decode(body), sess, peer)
            return self._authen_continue(sid, t.AuthenContinue.decode(body), sess, peer)
        if header.seq_no != 1:
            raise _Close("authorization/accounting sessions have one request")
        if header.type == t.AUTHOR:
            return self._author(sid, t.AuthorRequest.decode(body), peer), True
        return self._acct(sid, t.AcctRequest.decode(body), peer), True

    def _authen_start(
        self, header: t.Header, req: t.AuthenStart, sess: _Session, peer: str
    ) -> tuple[bytes, bool]:
        user = req.user.decode("utf-8", "replace")
        method = t.AUTHEN_TYPE_NAMES.get(req.authen_type, f"type-{req.authen_type}")
        sess.user, sess.authen_type = user, req.authen_type

        def finish(status: int, msg: str = "") -> tuple[bytes, bool]:
            self._record(
                Transaction(
                    "authen", user, t.AUTHEN_STATUS_NAMES[status], peer, header.session_id, method
                )
            )
            return t.AuthenReply(status, 0, msg.encode()).encode(), True

        if req.action != t.AUTHEN_LOGIN:
            return finish(t.AUTHEN_STATUS_ERROR, "only login is supported")
        minor = header.version & 0x0F
        if req.authen_type in (t.AUTHEN_TYPE_PAP, t.AUTHEN_TYPE_CHAP):
            # RFC 8907 §5.4.2: PAP and CHAP use minor version 1.
            if minor != 1:
                return finish(t.AUTHEN_STATUS_ERROR, "PAP/CHAP need minor version 1")
            ok = (
                self._check_pap(user, req.data)
                if req.authen_type == t.AUTHEN_TYPE_PAP
                else self._check_chap(user, req.data)
            )
            return finish(t.AUTHEN_STATUS_PASS if ok else t.AUTHEN_STATUS_FAIL)
        if req.authen_type == t.AUTHEN_TYPE_ASCII:
            # §5.4.2.1: prompt for what is missing. (Minor version 1 is accepted
            # too: tacacs_plus keeps 1 after a PAP call on the same client.)
            if not user:
                sess.awaiting = "user"
                return t.AuthenReply(t.AUTHEN_STATUS_GETUSER, 0, b"Username: ").encode(), False
            sess.awaiting = "pass"
            return self._getpass(), False
        return finish(t.AUTHEN_STATUS_FAIL, "unsupported authentication type")

    @staticmethod
    def _getpass() -> bytes:
        return t.AuthenReply(t.AUTHEN_STATUS_GETPASS, t.REPLY_FLAG_NOECHO, b"Password: ").encode()

    def _authen_continue(
        self, sid: int, req: t.AuthenContinue, sess: _Session, peer: str
    ) -> tuple[bytes | None, bool]:
        if not sess.awaiting:
            raise _Close("CONTINUE without a prompt")
        if req.flags & t.CONTINUE_FLAG_ABORT:
            # §5.3: the client gives up; the session ends without a reply.
            self._record(Transaction("authen", sess.user, "ABORT", peer, sid, "ascii"))
            return None, True
        if sess.awaiting == "user":
            sess.user = req.user_msg.decode("utf-8", "replace")
            sess.awaiting = "pass"
            return self._getpass(), False
        # Unknown users are asked for a password too, and answered like a wrong
        # one, so the prompt sequence does not reveal which names exist.
        ok = self._check_pap(sess.user, req.user_msg)
        status = t.AUTHEN_STATUS_PASS if ok else t.AUTHEN_STATUS_FAIL
        self._record(
            Transaction("authen", sess.user, t.AUTHEN_STATUS_NAMES[status], peer, sid, "ascii")
        )
        return t.AuthenReply(status).encode(), True

    def _check_pap(self, user: str, password: bytes) -> bool:
        u = self.users.get(user)
        # compare_digest even for unknown users: similar timing either way
        expected = u.password.reveal() if u else b"\0unknown-user"
        return hmac.compare_digest(expected, password) and u is not None

    def _check_chap(self, user: str, data: bytes) -> bool:
        # §5.4.2.3: data = PPP id (1) ‖ challenge ‖ MD5(id ‖ password ‖ challenge) (16)
        u = self.users.get(user)
        if u is None or len(data) < 1 + 1 + 16:
            return False
        ppp_id, challenge, response = data[:1], data[1:-16], data[-16:]
        want = hashlib.md5(ppp_id + u.password.reveal() + challenge).digest()
        return hmac.compare_digest(want, response)

    def _author(self, sid: int, req: t.AuthorRequest, peer: str) -> bytes:
        user = req.user.decode("utf-8", "replace")
        args = tuple(a.decode("utf-8", "replace") for a in req.args)
        u = self.users.get(user)
        cmd = next((a.split("=", 1)[1] for a in args if a.startswith("cmd=")), "")
        if u is None:
            resp = t.AuthorResponse(t.AUTHOR_STATUS_FAIL, server_msg=b"unknown user")
        elif cmd and cmd.split()[0] in u.deny_commands:
            resp = t.AuthorResponse(t.AUTHOR_STATUS_FAIL, server_msg=b"command denied")
        else:
            resp = t.AuthorResponse(t.AUTHOR_STATUS_PASS_ADD, tuple(a.encode() for a in u.avps))
        self._record(
            Transaction("author", user, t.AUTHOR_STATUS_NAMES[resp.status], peer, sid, "", args)
        )
        return resp.encode()

    def _acct(self, sid: int, req: t.AcctRequest, peer: str) -> bytes:
        user = req.user.decode("utf-8", "replace")
        args = tuple(a.decode("utf-8", "replace") for a in req.args)
        # §7.2: START, STOP, WATCHDOG, or WATCHDOG|START (an update); nothing else.
        kinds = {
            t.ACCT_FLAG_START: "START",
            t.ACCT_FLAG_STOP: "STOP",
            t.ACCT_FLAG_WATCHDOG: "WATCHDOG",
            t.ACCT_FLAG_WATCHDOG | t.ACCT_FLAG_START: "WATCHDOG-UPDATE",
        }
        kind = kinds.get(req.flags & 0x0E)
        status = t.ACCT_STATUS_SUCCESS if kind is not None else t.ACCT_STATUS_ERROR
        self._record(
            Transaction(
                "acct",
                user,
                t.ACCT_STATUS_NAMES[status],
                peer,
                sid,
                kind or f"flags-{req.flags:#x}",
                args,
            )
        )
        return t.AcctReply(status).encode()


class ThreadedTacacsServer:
    """Runs a :class:`TacacsServer` on its own event loop in a thread (for blocking clients)."""

    def __init__(self, server: TacacsServer, hosts: Sequence[str], port: int = 0) -> None:
        self.server = server
        self._hosts = list(hosts)
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.addresses: list[tuple[str, int]] = []

    def __enter__(self) -> ThreadedTacacsServer:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            self.server.start(self._hosts, self._port), self._loop
        )
        self.addresses = fut.result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def port_for(self, host: str) -> int:
        return next(p for h, p in self.addresses if h == host)


# ---------------------------------------------------------------- program


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ipsecmgr.lab.tacacs_server", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--listen", action="append", required=True, help="address to listen on (repeatable)"
    )
    p.add_argument("--port", type=int, default=49)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--secret-file", type=Path, help="file holding the shared secret")
    g.add_argument("--secret-env", help="environment variable holding the shared secret")
    g.add_argument(
        "--no-secret", action="store_true", help="unobfuscated (TAC_PLUS_UNENCRYPTED_FLAG)"
    )
    p.add_argument("--users-file", type=Path, required=True)
    return p.parse_args(argv)


def _print(obj: Mapping[str, Any]) -> None:
    print(json.dumps(obj, sort_keys=True), flush=True)


async def _serve(args: argparse.Namespace) -> int:
    try:
        if args.no_secret:
            secret: Secret | None = None
        elif args.secret_file:
            secret, warnings = read_secret_file(args.secret_file)
            for w in warnings:
                _print({"event": "warning", "message": w})
        else:
            secret = read_secret_env(args.secret_env)
        users = load_users(args.users_file)
    except (SecretError, OSError, ValueError) as e:
        _print({"event": "fatal", "message": str(e)})
        return 2
    return await serve_until_stopped(secret, users, args.listen, args.port)


async def serve_until_stopped(
    secret: Secret | None,
    users: Mapping[str, User],
    listen: Sequence[str],
    port: int,
    ssl: ssl_.SSLContext | None = None,
) -> int:
    """Run a server until SIGTERM/SIGINT, printing JSON lines: "listening" per
    address (with ``"tls": true`` over TLS), one line per transaction, "stopped"."""
    server = TacacsServer(secret, users, on_transaction=lambda tr: print(tr.to_json(), flush=True))
    bound = await server.start(listen, port, ssl=ssl)
    for host, bport in bound:
        line: dict[str, object] = {"event": "listening", "address": host, "port": bport}
        if ssl is not None:
            line["tls"] = True
        _print(line)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    _print({"event": "stopped"})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
