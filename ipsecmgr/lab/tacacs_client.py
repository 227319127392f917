"""A TACACS+ client for the lab, wrapping the independent ``tacacs_plus`` package.

``tacacs_plus`` (PyPI ``tacacs-plus`` 2.6) is the oracle our server is tested
against, and the client the demo runs inside the ``client`` namespace::

    IPSECMGR_TACACS_PASSWORD=... python -m ipsecmgr.lab.tacacs_client \\
        --server 203.0.113.49 --secret-file /path/secret --user alice \\
        --password-env IPSECMGR_TACACS_PASSWORD --action authenticate --authen-type pap

prints one JSON line (``{"action": ..., "status": "PASS", "ok": true, ...}``)
and exits 0 if the server said PASS/PASS_ADD/SUCCESS, 1 if it refused, 2 if
there was no usable answer (timeout, connection refused or reset).

Workarounds for tacacs_plus 2.6 on Python 3.11 (all in this module):

- It builds ``str(body)`` for a debug log line eagerly, and the PAP START's
  ``str`` contains the password. Its logger is pinned to WARNING here.
- ``six.b()`` encodes ``str`` as Latin-1, so a UTF-8 password or secret raises
  ``UnicodeEncodeError``. We pass Latin-1 *decoded* bytes, which ``six.b``
  turns back into exactly the bytes we mean.
- Its ``send`` reads the reply with bare ``recv`` calls: a short header read
  raises ``struct.error``, and a connection closed mid-body loops forever
  (``recv`` returns ``b""``). :class:`_Client` reads exactly, with a deadline.
- A PAP call sets ``version_min = 1`` on the client object for good: we use a
  new client object per request.
- IPv6 needs ``family=AF_INET6``: chosen from the server address.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import select
import socket
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tacacs_plus import client as tp_client
from tacacs_plus import flags as tp_flags
from tacacs_plus.packet import TACACSHeader, TACACSPacket

from ipsecmgr.secret import Secret, SecretError, read_secret_env, read_secret_file

# tacacs_plus logs bodies (with the PAP password) at DEBUG: never let that through.
logging.getLogger("tacacs_plus").setLevel(logging.WARNING)

AUTHEN_TYPES = {
    "ascii": tp_flags.TAC_PLUS_AUTHEN_TYPE_ASCII,
    "pap": tp_flags.TAC_PLUS_AUTHEN_TYPE_PAP,
    "chap": tp_flags.TAC_PLUS_AUTHEN_TYPE_CHAP,
}
ACCT_FLAGS = {
    "start": tp_flags.TAC_PLUS_ACCT_FLAG_START,
    "stop": tp_flags.TAC_PLUS_ACCT_FLAG_STOP,
    "watchdog": tp_flags.TAC_PLUS_ACCT_FLAG_WATCHDOG,
}


class TacacsClientError(RuntimeError):
    """No usable answer from the server (timeout, refused, reset, or not TACACS+)."""


def _latin1(data: bytes) -> str:
    # six.b(s) == s.encode("latin-1"): this round-trips any bytes.
    return data.decode("latin-1")


class _Client(tp_client.TACACSClient):  # type: ignore[misc]
    """tacacs_plus's client with a ``send`` that reads exactly and never hangs."""

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            readable, _, _ = select.select([self.sock], [], [], self.timeout)
            if not readable:
                raise TacacsClientError("timeout waiting for the server")
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise TacacsClientError("server closed the connection")
            buf += chunk
        return buf

    def send(self, body: Any, req_type: int, seq_no: int = 1) -> Any:
        header = TACACSHeader(
            self.version, req_type, self.session_id, len(body.packed), seq_no=seq_no
        )
        self.sock.sendall(bytes(TACACSPacket(header, body.packed, self.secret)))
        resp_header = TACACSHeader.unpacked(self._recv_exact(12))
        if (
            resp_header.version_max != header.version_max
            or resp_header.type != header.type
            or resp_header.session_id != header.session_id
        ):
            raise TacacsClientError("reply header does not match the request")
        return TACACSPacket(resp_header, self._recv_exact(resp_header.length), self.secret)


def query(
    server: str,
    secret: Secret,
    user: str,
    *,
    action: str = "authenticate",
    password: Secret | None = None,
    port: int = 49,
    authen_type: str = "pap",
    arguments: Sequence[str] = (),
    acct_flag: str = "start",
    timeout: float = 5.0,
) -> dict[str, Any]:
    """Run one TACACS+ transaction; return ``{"action", "status", "ok", ...}``.

    Raises :class:`TacacsClientError` when the server gave no usable answer.
    """
    family = socket.AF_INET6 if ipaddress.ip_address(server).version == 6 else socket.AF_INET
    c = _Client(server, port, _latin1(secret.reveal()), timeout=timeout, family=family)
    args = [a.encode() for a in arguments]
    result: dict[str, Any] = {"action": action, "server": server, "port": port, "user": user}
    if action not in ("authenticate", "authorize", "account"):
        raise ValueError(f"unknown action {action!r}")
    if action == "authenticate" and password is None:
        raise ValueError("authenticate needs a password")
    try:
        if action == "authenticate":
            assert password is not None
            extra: dict[str, Any] = {}
            if authen_type == "chap":
                extra = {"chap_ppp_id": "a", "chap_challenge": "lab-challenge"}
            reply = c.authenticate(
                _latin1(user.encode()),
                _latin1(password.reveal()),
                authen_type=AUTHEN_TYPES[authen_type],
                **extra,
            )
            result.update(status=reply.human_status, ok=bool(reply.valid), authen_type=authen_type)
        elif action == "authorize":
            reply = c.authorize(_latin1(user.encode()), arguments=args)
            status = {0x01: "PASS_ADD", 0x02: "PASS_REPL", 0x10: "FAIL", 0x11: "ERROR"}.get(
                reply.status, f"UNKNOWN-{reply.status}"
            )
            result.update(
                status=status,
                ok=status in ("PASS_ADD", "PASS_REPL"),
                args=[a.decode("utf-8", "replace") for a in reply.arguments or []],
            )
        else:
            reply = c.account(_latin1(user.encode()), ACCT_FLAGS[acct_flag], arguments=args)
            result.update(status=reply.human_status, ok=bool(reply.valid), acct_flag=acct_flag)
    except (OSError, TacacsClientError, struct.error) as e:
        # struct.error: tacacs_plus's reply parsers on a body that does not add up
        raise TacacsClientError(f"{type(e).__name__}: {e}") from None
    return result


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ipsecmgr.lab.tacacs_client")
    p.add_argument("--server", required=True)
    p.add_argument("--port", type=int, default=49)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--secret-file", type=Path)
    g.add_argument("--secret-env")
    p.add_argument("--user", required=True)
    p.add_argument("--password-env", help="environment variable holding the password")
    p.add_argument(
        "--action", choices=["authenticate", "authorize", "account"], default="authenticate"
    )
    p.add_argument("--authen-type", choices=sorted(AUTHEN_TYPES), default="pap")
    p.add_argument(
        "--arg", action="append", default=[], help="attribute-value pair, e.g. service=shell"
    )
    p.add_argument("--acct-flag", choices=sorted(ACCT_FLAGS), default="start")
    p.add_argument("--timeout", type=float, default=5.0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = _parse_args(argv)
    out: dict[str, Any]
    try:
        secret = (
            read_secret_file(a.secret_file)[0] if a.secret_file else read_secret_env(a.secret_env)
        )
        password = None
        if a.password_env:
            password = read_secret_env(a.password_env, os.environ)
        out = query(
            a.server, secret, a.user, action=a.action, password=password, port=a.port,
            authen_type=a.authen_type, arguments=a.arg, acct_flag=a.acct_flag, timeout=a.timeout,
        )  # fmt: skip
        code = 0 if out["ok"] else 1
    except (SecretError, ValueError) as e:
        out, code = {"action": a.action, "error": str(e), "ok": False}, 2
    except TacacsClientError as e:
        out, code = {"action": a.action, "server": a.server, "error": str(e), "ok": False}, 2
    print(json.dumps(out, sort_keys=True), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
