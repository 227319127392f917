"""The lab in TLS mode (``lab up --mode tls``): the tunnel topology, with the
client host's gateway protecting the TACACS+ server by TLS 1.3 to port 300
(RFC 9887) instead of ESP; the ``gw`` namespace only routes.

Files in the state directory (or ``--tls-pki DIR`` for the PKI): ``ca.crt``,
``server.crt``, ``server.key``, ``client.crt``, ``client.key``, and
``tacacs-secret``, the downstream secret the legacy client uses.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ipsecmgr.lab import tls_pki
from ipsecmgr.lab.topology import Lab, LabAddresses, LabProcess, python_env

TLS_PORT = 300


def tls_client_config(
    a: LabAddresses,
    *,
    pki: Path,
    secret_file: Path,
    management_interface: str,
    control_socket: Path,
    servers: Sequence[tuple[str, int]] | None = None,
    server_name: str | None = None,
    protect: Sequence[str] | None = None,
    keylog_file: Path | None = None,
    listen: str | None = None,
    ca_file: Path | None = None,
    extra: str = "",
    name: str = "tls",
    hold_down: float = 30.0,
) -> str:
    """TOML for the client host's gateway with one ``[tls_map]`` (``extra`` appended).

    ``protect``: the captured server addresses (default: the lab's server);
    ``servers``: the upstream (address, port) list in priority order (default:
    the lab's server on port 300).
    """
    protect = list(protect or [a.server4])
    servers = list(servers or [(a.server4, TLS_PORT)])
    rules = ", ".join(f'"permit tcp any host {p} eq 49"' for p in protect)
    srv = ", ".join(
        "{ " + f'address = "{h}", port = {p}' + (f', name = "{server_name}"' if server_name else "")
        + " }"
        for h, p in servers
    )  # fmt: skip
    lines = [
        f"[access_list.{name}]",
        f"rules = [{rules}]",
        "",
        f"[tls_map.{name}]",
        f'match_address = "{name}"',
        f"servers = [{srv}]",
        f'ca_file = "{ca_file or pki / "ca.crt"}"',
        f'client_cert = "{pki / "client.crt"}"',
        f'client_key = "{pki / "client.key"}"',
        f'downstream_secret = {{ file = "{secret_file}" }}',
        "connect_timeout = 2.0",
        "handshake_timeout = 3.0",
        f"hold_down = {hold_down}",
    ]
    if keylog_file is not None:
        lines.append(f'keylog_file = "{keylog_file}"')
    if listen is not None:
        lines.append(f'listen = "{listen}"')
    if not extra or "[gateway]" not in extra:
        lines += [
            "",
            "[gateway]",
            f'local_addresses = ["{a.client_wan4}"]',
            f'management_interface = "{management_interface}"',
            f'control_socket = "{control_socket}"',
        ]
    return "\n".join(lines) + "\n" + ("\n" + extra if extra else "")


def ensure_pki(state_dir: Path, pki_dir: Path | None, a: LabAddresses) -> Path:
    """The PKI directory: ``pki_dir`` if given (all five files must exist), else the
    state directory, where a fresh PKI is written unless one is already there."""
    if pki_dir is not None:
        missing = tls_pki.missing_files(pki_dir)
        if missing:
            raise FileNotFoundError(f"--tls-pki {pki_dir}: missing {', '.join(missing)}")
        return pki_dir
    if tls_pki.missing_files(state_dir):
        tls_pki.write_pki(state_dir, server_ips=[a.server4, a.server6])
    return state_dir


def start_tls_server(
    lab: Lab,
    *,
    pki: Path,
    users_file: Path,
    listen: Sequence[str] | None = None,
    port: int = TLS_PORT,
    cert: Path | None = None,
    key: Path | None = None,
    tls12_only: bool = False,
    timeout: float = 10.0,
) -> LabProcess:
    """``ipsecmgr.lab.tls_server`` in the server namespace; returns once it listens."""
    listen = list(listen or [lab.addresses.server4])
    cmd = [sys.executable, "-m", "ipsecmgr.lab.tls_server", "--port", str(port),
           "--pki", str(pki), "--users-file", str(users_file)]  # fmt: skip
    for addr in listen:
        cmd += ["--listen", addr]
    if cert is not None:
        cmd += ["--cert", str(cert)]
    if key is not None:
        cmd += ["--key", str(key)]
    if tls12_only:
        cmd.append("--tls12-only")
    proc = LabProcess(lab.server.popen(cmd, env=python_env()), "tls-server@server")
    for addr in listen:
        proc.wait_for(_is_listening(addr), timeout)
    return proc


def _is_listening(addr: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == "listening" and e.get("address") == addr
