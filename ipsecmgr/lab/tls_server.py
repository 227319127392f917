"""The lab's TACACS+ server over TLS 1.3 (RFC 9887), for the tests and ``lab demo --mode tls``.

This is the last-resort choice issue #18 allows: no TLS-capable TACACS+ server
(tac_plus-ng) is packaged for Debian and no source can be fetched in this
environment, so the lab's own RFC 8907 server (:mod:`ipsecmgr.lab.tacacs_server`)
is served through Python's TLS with the RFC 9887 profile: TLS 1.3 only, a
server certificate, client certificates required and verified against the CA,
TACACS+ obfuscation off inside TLS (the UNENCRYPTED flag is required). Any
RFC 9887 server given the lab's PKI (``ca.crt``, ``server.crt``, ``server.key``)
can stand in for it::

    python -m ipsecmgr.lab.tls_server --listen 203.0.113.49 --port 300 \\
        --pki /var/lib/ipsecmgr-lab --users-file users.json

``--tls12-only`` makes a deliberately wrong server (TLS 1.2 at most) for the
refusal tests. Output: the JSON lines of ``tacacs_server``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from ipsecmgr.lab.tacacs_server import load_users, serve_until_stopped


def server_context(ca: Path, cert: Path, key: Path, *, tls12_only: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if tls12_only:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED  # RFC 9887 §3.1: mutual authentication
    return ctx


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ipsecmgr.lab.tls_server")
    p.add_argument("--listen", action="append", required=True)
    p.add_argument("--port", type=int, default=300)
    p.add_argument("--pki", type=Path, required=True, help="dir with ca.crt server.crt server.key")
    p.add_argument("--cert", type=Path, help="server certificate (default: PKI/server.crt)")
    p.add_argument("--key", type=Path, help="server key (default: PKI/server.key)")
    p.add_argument("--users-file", type=Path, required=True)
    p.add_argument("--tls12-only", action="store_true")
    return p.parse_args(argv)


def _print(obj: dict[str, object]) -> None:
    print(json.dumps(obj, sort_keys=True), flush=True)


async def _serve(args: argparse.Namespace) -> int:
    try:
        ctx = server_context(
            args.pki / "ca.crt",
            args.cert or args.pki / "server.crt",
            args.key or args.pki / "server.key",
            tls12_only=args.tls12_only,
        )
        users = load_users(args.users_file)
    except (OSError, ValueError, ssl.SSLError) as e:
        _print({"event": "fatal", "message": str(e)})
        return 2
    # RFC 9887 §4: no TACACS+ obfuscation inside TLS (secret None: UNENCRYPTED flag).
    return await serve_until_stopped(None, users, args.listen, args.port, ssl=ctx)


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
