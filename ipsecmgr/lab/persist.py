"""``ipsecmgr lab up`` and ``ipsecmgr lab down``: a lab that outlives the command.

``up`` builds the namespaces and addresses, writes both gateways' configs, a
PSK and a TACACS+ secret into a private state directory, and prints the
commands to start the gateways and a TACACS+ server and to log in. ``down``
reads the state, kills what still runs in the lab's namespaces (by PID),
deletes them and removes the state directory.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from ipsecmgr.lab.configs import lab_gateway_config
from ipsecmgr.lab.demo import write_tacacs_files
from ipsecmgr.lab.topology import Lab, teardown
from ipsecmgr.netns import NetnsPool

DEFAULT_STATE = Path("/run/ipsecmgr-lab")


def lab_up(mode: str = "tunnel", state_dir: Path = DEFAULT_STATE) -> int:
    state_file = state_dir / "lab.json"
    if state_file.exists():
        print(f"a lab is already up (state in {state_file}); run 'ipsecmgr lab down' first")
        return 1
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    lab = Lab(mode, pool=NetnsPool("lab")).build()  # the pool is not closed: the lab stays
    desc = lab.describe()
    state_file.write_text(json.dumps(desc, indent=2))
    psk = state_dir / "psk"
    psk.write_bytes(secrets.token_urlsafe(24).encode())
    psk.chmod(0o600)
    secret, users = write_tacacs_files(
        state_dir, secrets.token_urlsafe(12).encode(), "alice", "alice-lab-pw"
    )
    for side in ("gw", "client"):
        (state_dir / f"{side}.toml").write_text(
            lab_gateway_config(
                lab.addresses,
                side,
                psk_file=psk,
                management_interface=lab.interfaces[f"{side}.wan"],
                control_socket=state_dir / f"{side}.sock",
                bypass_via_tun=side == "client",
            )
        )
    a = lab.addresses
    ns = desc["namespaces"]
    print(f"lab up ({mode} mode), state in {state_dir}")
    for role, name in ns.items():
        print(f"  {role:<7} {name}")
    print("\nstart the gateways and a TACACS+ server (each in its own terminal, or with &):")
    for side in ("gw", "client"):
        print(f"  ip netns exec {ns[side]} ipsecmgr run --config {state_dir}/{side}.toml -v")
    print(
        f"  ip netns exec {ns['server']} python3 -m ipsecmgr.lab.tacacs_server "
        f"--listen {a.server4} --secret-file {secret} --users-file {users}"
    )
    print("then log in through the tunnel and look:")
    print(
        f"  IPSECMGR_LAB_PASSWORD=alice-lab-pw ip netns exec {ns['client']} python3 -m "
        f"ipsecmgr.lab.tacacs_client --server {a.server4} --secret-file {secret} "
        "--user alice --password-env IPSECMGR_LAB_PASSWORD"
    )
    print(f"  ipsecmgr show crypto ipsec security-associations --socket {state_dir}/client.sock")
    print("tear down with: ipsecmgr lab down")
    return 0


def lab_down(state_dir: Path = DEFAULT_STATE) -> int:
    state_file = state_dir / "lab.json"
    if not state_file.exists():
        print(f"no lab is up (no {state_file})")
        return 1
    removed = teardown(json.loads(state_file.read_text()))
    shutil.rmtree(state_dir, ignore_errors=True)
    print(f"lab down: removed {', '.join(removed) if removed else 'nothing (already gone)'}")
    return 0
