"""A TACACS+ login against several servers in turn, as pam_tacplus does with its
``server=`` options: each server is tried with its own timeout, and the first
one that answers decides. Used to measure what a client feels when the first
server sits behind a crypto map whose peer is dead (docs/recovery.md,
"Failover"); the transaction itself is :func:`ipsecmgr.lab.tacacs_client.query`.

    IPSECMGR_LAB_PASSWORD=... python -m ipsecmgr.lab.tacacs_servers \\
        --server 203.0.113.49 --server 198.51.100.3 --timeout 3 \\
        --secret-file S --user alice --password-env IPSECMGR_LAB_PASSWORD

prints one JSON line: ``{"ok", "status", "server" (the one that answered),
"elapsed" (seconds, the whole login), "attempts": [{"server", "elapsed",
"error"}...]}``; exit 0 on PASS, 1 on a refusal, 2 if no server answered.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ipsecmgr.lab.tacacs_client import TacacsClientError, query
from ipsecmgr.secret import SecretError, read_secret_env, read_secret_file


def login(
    servers: Sequence[str], secret_file: Path, user: str, password_env: str, timeout: float
) -> dict[str, Any]:
    secret = read_secret_file(secret_file)[0]
    password = read_secret_env(password_env)
    attempts: list[dict[str, Any]] = []
    start = time.monotonic()
    for server in servers:
        t0 = time.monotonic()
        try:
            out = query(server, secret, user, password=password, timeout=timeout)
        except TacacsClientError as e:
            attempts.append({"server": server, "elapsed": time.monotonic() - t0, "error": str(e)})
            continue
        attempts.append({"server": server, "elapsed": time.monotonic() - t0, "error": None})
        return out | {"elapsed": time.monotonic() - start, "attempts": attempts}
    return {"ok": False, "status": "NO_SERVER", "elapsed": time.monotonic() - start,
            "attempts": attempts}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ipsecmgr.lab.tacacs_servers")
    p.add_argument("--server", action="append", required=True, help="in order of preference")
    p.add_argument("--secret-file", type=Path, required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password-env", required=True)
    p.add_argument("--timeout", type=float, default=3.0, help="per server, seconds")
    a = p.parse_args(argv)
    try:
        out = login(a.server, a.secret_file, a.user, a.password_env, a.timeout)
    except (SecretError, ValueError) as e:
        print(json.dumps({"ok": False, "error": str(e)}), flush=True)
        return 2
    print(json.dumps(out, sort_keys=True), flush=True)
    return 0 if out["ok"] else (2 if out["status"] == "NO_SERVER" else 1)


if __name__ == "__main__":
    sys.exit(main())
