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
from typing import TYPE_CHECKING, Any

from ipsecmgr.lab import tls_pki
from ipsecmgr.lab.topology import Lab, LabAddresses, LabProcess, python_env

if TYPE_CHECKING:
    from ipsecmgr.lab.gateways import LabGateways

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


# ---------------------------------------------------------------- lab up / demo --mode tls

DEMO_USER, DEMO_PASSWORD = "alice", "alice-demo-pw"


def tls_lab_up(state_dir: Path, pki_dir: Path | None = None) -> int:
    """``ipsecmgr lab up --mode tls``: the topology, the PKI, the client gateway's
    config, the downstream secret; starts no TACACS+ server (like ``lab up``)."""
    import json
    import os
    import secrets

    from ipsecmgr.lab.demo import write_tacacs_files
    from ipsecmgr.netns import NetnsPool

    state_file = state_dir / "lab.json"
    if state_file.exists():
        print(f"a lab is already up (state in {state_file}); run 'ipsecmgr lab down' first")
        return 1
    if pki_dir is not None and tls_pki.missing_files(pki_dir):
        print(f"--tls-pki {pki_dir}: missing {', '.join(tls_pki.missing_files(pki_dir))}")
        return 1
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    lab = Lab("tunnel", pool=NetnsPool("lab")).build()  # the pool stays: so does the lab
    desc = lab.describe()
    desc["protection"] = "tls"
    state_file.write_text(json.dumps(desc, indent=2))
    a = lab.addresses
    pki = ensure_pki(state_dir, pki_dir, a)
    # the downstream (client-side) secret
    secret, users = write_tacacs_files(
        state_dir, secrets.token_urlsafe(12).encode(), "alice", "alice-lab-pw"
    )
    (state_dir / "client.toml").write_text(
        tls_client_config(
            a,
            pki=pki,
            secret_file=secret,
            management_interface=lab.interfaces["client.wan"],
            control_socket=state_dir / "client.sock",
        )
    )
    _print_tls_lab_up(state_dir, a, desc["namespaces"], pki, secret, users)
    return 0


def _print_tls_lab_up(
    state_dir: Path, a: LabAddresses, ns: dict[str, str], pki: Path, secret: Path, users: Path
) -> None:
    """What ``lab up --mode tls`` built, and the commands to use it."""
    print(
        f"lab up (tls mode: the client's gateway protects {a.server4} by TLS 1.3 to port "
        f"{TLS_PORT}; gw only routes), state in {state_dir}, PKI in {pki}"
    )
    for role, name in ns.items():
        print(f"  {role:<7} {name}")
    print(
        "\nstart the client's gateway and a TLS TACACS+ server (or any RFC 9887 server "
        "given the PKI):"
    )
    print(f"  ip netns exec {ns['client']} ipsecmgr run --config {state_dir}/client.toml -v")
    print(
        f"  ip netns exec {ns['server']} python3 -m ipsecmgr.lab.tls_server --listen "
        f"{a.server4} --port {TLS_PORT} --pki {pki} --users-file {users}"
    )
    print("then log in to the server's address as always (no client change) and look:")
    print(
        f"  IPSECMGR_LAB_PASSWORD=alice-lab-pw ip netns exec {ns['client']} python3 -m "
        f"ipsecmgr.lab.tacacs_client --server {a.server4} --secret-file {secret} "
        "--user alice --password-env IPSECMGR_LAB_PASSWORD"
    )
    print(f"  ipsecmgr show tacacs tls --socket {state_dir}/client.sock")
    print("tear down with: ipsecmgr lab down")


def run_tls_demo(pki_dir: Path | None = None) -> int:
    """``ipsecmgr lab demo --mode tls``: build, start the TLS server and the client's
    gateway, log in (authentication, authorization, accounting), show, tear down."""
    import tempfile

    from ipsecmgr.lab.demo import write_tacacs_files
    from ipsecmgr.lab.gateways import LabGateways

    with tempfile.TemporaryDirectory(prefix="ipsecmgr-tls-demo-") as tmp:
        work = Path(tmp)
        secret, users = write_tacacs_files(work, b"demo-downstream-key", DEMO_USER, DEMO_PASSWORD)
        try:
            with Lab("tunnel") as lab, LabGateways(lab) as gws:
                return _tls_demo(lab, gws, work, pki_dir, secret, users)
        except KeyboardInterrupt:
            _say("\ninterrupted: everything torn down")
            return 130


def _say(text: str = "") -> None:
    print(text, flush=True)


def _tls_demo(
    lab: Lab, gws: LabGateways, work: Path, pki_dir: Path | None, secret: Path, users: Path
) -> int:
    """The demo in a built lab: server, client gateway, logins, trace, show."""
    import threading

    from ipsecmgr.tls.show import format_tls
    from ipsecmgr.trace import Event
    from ipsecmgr.trace.io import TraceClient
    from ipsecmgr.trace.render import group_flows, render_timelines, with_inferred

    a = lab.addresses
    pki = ensure_pki(work, pki_dir, a)
    _say(
        f"== lab (tls mode): client {a.client_wan4} runs the gateway, which "
        f"protects {a.server4}:49 by TLS 1.3 to {a.server4}:{TLS_PORT}"
    )
    server = start_tls_server(lab, pki=pki, users_file=users)
    conf = work / "client.toml"
    conf.write_text(
        tls_client_config(
            a,
            pki=pki,
            secret_file=secret,
            management_interface=lab.interfaces["client.wan"],
            control_socket=gws.dir / "client.sock",
        )
    )
    client = gws.start("client", config=conf)
    tracer = TraceClient(client.control)
    traced: list[Event] = []
    reader = threading.Thread(target=lambda: traced.extend(tracer), daemon=True)
    reader.start()
    results = _tls_logins(lab, secret)
    seen = [(x.get("user"), x.get("kind"), x.get("result")) for x in server.transactions()]
    _say(f"the TLS TACACS+ server saw: {seen}")
    tracer.close()
    reader.join(timeout=5)
    _say("\n== ipsecmgr trace: the first connection's TLS steps")
    flows = group_flows(with_inferred(traced))
    first = next((f for f in flows if f.startswith("tls:")), None)
    _say(render_timelines(flows[first]) if first else "(no events traced)")
    snap = client.command({"command": "tls"})["result"]
    _say("\n== client# show tacacs tls")
    _say(format_tls(snap))
    ok = all(r.get("ok") for r in results)
    codes = gws.stop()
    _say(f"\n== gateway stopped (exit codes {codes}); lab torn down")
    _say("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1


def _tls_logins(lab: Lab, secret: Path) -> list[dict[str, Any]]:
    """Authentication, authorization and accounting to the server's address, timed."""
    import time

    a = lab.addresses
    results = []
    for action, extra in (
        ("authenticate", {"password": DEMO_PASSWORD}),
        ("authorize", {"args": ["service=shell", "cmd="]}),
        ("account", {"args": ["task_id=1", "service=shell"]}),
    ):
        t0 = time.monotonic()
        r = lab.tacacs_query(
            "client",
            server=a.server4,
            secret_file=secret,
            user=DEMO_USER,
            action=action,
            **extra,
        )
        results.append(r)
        took = time.monotonic() - t0
        verdict = "ok" if r.get("ok") else "FAILED"
        _say(f"TACACS+ {action:<13} {r.get('status', '?'):<9} {verdict}  {took:.3f} s")
    return results
