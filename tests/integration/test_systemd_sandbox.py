"""The unit's sandbox fits the daemon: every system call, socket family and device
the daemon uses in the lab is one contrib/systemd/ipsecmgr.service allows (root).

systemd is not PID 1 here, so the filters cannot be enforced for real. Instead
the daemon runs under ``strace -f`` (its split-mode workers included) through
start, a TACACS+ login, a metrics scrape, SIGHUP and SIGTERM. What it did is
then compared with what the unit allows: the unit's ``SystemCallFilter=`` lines
expanded by ``systemd-analyze syscall-filter``, ``RestrictAddressFamilies=``,
and ``DeviceAllow=`` plus the pseudo devices ``DevicePolicy=closed`` keeps.
A new system call outside the filter (systemd would kill the daemon with
EPERM on it) fails this test instead of a production start.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from ipsecmgr.lab.gateways import LabGateways
from ipsecmgr.lab.topology import Lab, python_env

pytestmark = [pytest.mark.root, pytest.mark.slow]

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "ipsecmgr.service"
# DevicePolicy=closed: "/dev/null, /dev/zero, /dev/full, /dev/random, /dev/urandom"
# stay accessible (systemd.resource-control(5)), plus DeviceAllow=.
PSEUDO_DEVICES = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}


def _unit_values(key: str) -> list[str]:
    return [
        line.partition("=")[2].strip()
        for line in UNIT.read_text().splitlines()
        if line.startswith(key + "=")
    ]


@cache
def _expand(name: str) -> frozenset[str]:
    """A syscall or @group, expanded by systemd-analyze (groups nest)."""
    if not name.startswith("@"):
        return frozenset({name})
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", name],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip().split(" ", 1)[0]
        if word and not word.startswith("#"):
            calls |= _expand(word)
    return frozenset(calls)


def allowed_syscalls() -> set[str]:
    """systemd.exec(5): the first non-~ line starts an allow list; later lines
    add (plain) or remove (~) in order."""
    allowed: set[str] = set()
    for value in _unit_values("SystemCallFilter"):
        deny = value.startswith("~")
        names: set[str] = set()
        for word in value.lstrip("~").split():
            names |= _expand(word)
        allowed = allowed - names if deny else allowed | names
    return allowed


def _daemon_pid(strace_pid: int) -> int:
    kids = Path(f"/proc/{strace_pid}/task/{strace_pid}/children").read_text().split()
    assert kids, "strace has no child"
    return int(kids[0])


@pytest.mark.parametrize("datapath", ["single", "split"])
def test_the_daemon_stays_inside_the_units_sandbox(tmp_path: Path, datapath: str) -> None:
    assert shutil.which("strace"), "strace is missing: `make setup` installs it"
    secret = tmp_path / "tacacs-secret"
    secret.write_bytes(b"tacacs-key")
    secret.chmod(0o600)
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"alice": {"password": "alice-pw"}}))
    trace = tmp_path / "strace.txt"
    with Lab("tunnel") as lab, LabGateways(lab) as gws:
        lab.start_tacacs_server("server", secret_file=secret, users_file=users)
        gws.start("gw")
        conf = gws.write_config("client", first_packet="queue")
        conf.write_text(
            conf.read_text().replace("[gateway]\n", f'[gateway]\ndatapath = "{datapath}"\n')
            + '\n[metrics]\nlisten = "127.0.0.1:9754"\n'
        )
        cmd = ["strace", "-f", "-qq", "-o", str(trace),
               sys.executable, "-m", "ipsecmgr.cli", "run", "--config", str(conf)]  # fmt: skip
        notify = tmp_path / "notify"
        env = python_env({"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "1000000"})
        proc = lab.ns("client").popen(cmd, env=env)
        try:
            assert proc.stdout is not None
            ready = select.select([proc.stdout], [], [], 60)[0] and proc.stdout.readline()
            assert ready == "ready\n", proc.stderr.read() if proc.stderr else ""
            login = lab.tacacs_query(
                "client", server=lab.addresses.server4, secret_file=secret, user="alice",
                password="alice-pw",
            )  # fmt: skip
            assert login["status"] == "PASS", login
            scrape = (
                "import urllib.request; "
                "print(urllib.request.urlopen('http://127.0.0.1:9754/metrics').status)"
            )
            assert lab.client.run([sys.executable, "-c", scrape]).stdout.strip() == "200"
            pid = _daemon_pid(proc.pid)
            os.kill(pid, signal.SIGHUP)
            os.kill(pid, signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert proc.returncode == 0  # strace exits with the daemon's code
    text = trace.read_text()

    used = set(re.findall(r"^\d+ +([a-z_0-9]+)\(", text, re.M))
    assert {"sendto", "openat", "ioctl"} <= used  # parsed something real
    outside = used - allowed_syscalls()
    assert not outside, f"system calls the unit's SystemCallFilter= forbids: {sorted(outside)}"

    families = set(re.findall(r"socket\((AF_[A-Z0-9]+)", text))
    (restrict,) = _unit_values("RestrictAddressFamilies")
    assert families and families <= set(restrict.split()), families

    devices = set(re.findall(r'"(/dev/[^"]+)"', text))
    allowed_devices = PSEUDO_DEVICES | {v.split()[0] for v in _unit_values("DeviceAllow")}
    assert "/dev/net/tun" in devices
    assert devices <= allowed_devices, devices
