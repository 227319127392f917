"""Least privilege of the running daemon (issue #14, docs/security.md): what
/proc says about it, that nobody without CAP_SYS_PTRACE can read its memory,
and that everything it does after start still works with the reduced set
(SIGHUP reload, show, clear, rekeys, the trace key export, stop)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipsecmgr.privileges import keep_mask
from tests.integration.test_gateway import Env, make_env

pytestmark = [pytest.mark.root, pytest.mark.slow]

CAP_SYS_PTRACE = 19


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from make_env(tmp_path, "tunnel", 4)


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def assert_least_privilege(pid: int) -> None:
    st = proc_status(pid)
    want = f"{keep_mask():016x}"
    assert (st["CapEff"], st["CapPrm"], st["CapBnd"]) == (want, want, want), st
    assert st["CapInh"] == f"{0:016x}" and st["CapAmb"] == f"{0:016x}", st
    assert st["NoNewPrivs"] == "1", st
    (core,) = [x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if "core" in x]
    assert core.split()[4:6] == ["0", "0"], core  # Max core file size: soft, hard


# Runs as root without CAP_SYS_PTRACE, like a debugger run by an operator who may
# not read keys: it may open /proc/PID/mem of and ptrace-attach (as gcore and
# gdb -p do) a dumpable process with the same uid and no more capabilities (its
# own child), not one that is not dumpable (ptrace_may_access, kernel/ptrace.c).
PROBE = textwrap.dedent(
    """
    import ctypes, os, subprocess, sys
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(24, ctypes.c_ulong(19), 0, 0, 0) == 0  # PR_CAPBSET_DROP SYS_PTRACE
    class H(ctypes.Structure):
        _fields_ = (("v", ctypes.c_uint32), ("pid", ctypes.c_int))
    class D(ctypes.Structure):
        _fields_ = (("e", ctypes.c_uint32), ("p", ctypes.c_uint32), ("i", ctypes.c_uint32))
    h, d = H(0x20080522, 0), (D * 2)()
    assert libc.capget(ctypes.byref(h), d) == 0
    for x in d:
        x.e &= ~(1 << 19); x.p &= ~(1 << 19); x.i = 0
    assert libc.capset(ctypes.byref(h), d) == 0
    child = subprocess.Popen(["sleep", "30"])
    out = []
    for pid in (child.pid, int(sys.argv[1])):
        try:
            os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY))
            out.append("mem")
        except PermissionError:
            out.append("no-mem")
        if libc.ptrace(16, pid, 0, 0) == 0:  # PTRACE_ATTACH
            os.waitpid(pid, 0) if pid == child.pid else None
            libc.ptrace(17, pid, 0, 0)  # PTRACE_DETACH
            out.append("attach")
        else:
            out.append("no-attach")
    child.kill()
    child.wait()
    print(" ".join(out))
    """
)


def probe_debugger(pid: int) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE, str(pid)], capture_output=True,
                         text=True, timeout=30, check=True)  # fmt: skip
    return out.stdout.strip()


def test_proc_status_capabilities_no_new_privs_core_limit_and_not_dumpable(env: Env) -> None:
    env.start_server()
    client = env.gws.start("client")
    env.gws.start("gw")
    assert env.login()["status"] == "PASS"
    for side in ("client", "gw"):
        assert_least_privilege(env.gws[side].proc.pid)
    # A root debugger without CAP_SYS_PTRACE can read its own child, not the daemon.
    assert probe_debugger(client.proc.pid) == "mem attach no-mem no-attach"
    assert "least privilege: RLIMIT_CORE 0, not dumpable, bounding set" in client.log
    assert "could not" not in client.log


def test_split_workers_inherit_the_reduced_set(env: Env) -> None:
    from tests.integration.test_workers import children, start_split

    env.start_server()
    client = start_split(env, "client")
    start_split(env, "gw")
    assert env.login()["status"] == "PASS"
    workers = children(client.proc.pid)
    assert len(workers) == 2
    for pid in (client.proc.pid, *workers):
        assert_least_privilege(pid)


def test_reload_show_clear_rekeys_keys_export_and_stop_work_with_the_reduced_set(
    env: Env,
) -> None:
    env.start_server()
    opts = {
        "first_packet": "queue",
        "ike_options": {"lifetime": 4},
        "ipsec_options": {"lifetime_seconds": 3},
    }
    client = env.gws.start("client", **opts)  # type: ignore[arg-type]
    env.gws.start("gw", **opts)  # type: ignore[arg-type]
    assert env.login()["status"] == "PASS"
    assert_least_privilege(client.proc.pid)
    # show
    assert "Status" in client.show("crypto map")
    # trace key export (ipsecmgr trace --wireshark-keys)
    keys = client.command({"command": "trace-keys"})
    assert keys["ok"] and keys["result"]["esp"], keys
    # rekeys (Child SA lifetime 3 s, IKE SA 4 s; either side may start them)
    deadline = time.monotonic() + 20
    while (
        client.counter("ike", "tacacs/child_rekeyed") < 1
        or client.counter("ike", "tacacs/ike_rekeyed") < 1
    ):
        assert time.monotonic() < deadline, client.log[-2000:]
        time.sleep(0.1)
    assert env.login()["status"] == "PASS"
    # SIGHUP reload of a changed map (the config and PSK files are read again)
    original = client.config.read_text()
    client.config.write_text(original.replace('first_packet = "queue"', 'first_packet = "drop"'))
    n = client.log.count("reloaded:")
    client.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while client.log.count("reloaded:") == n:
        assert time.monotonic() < deadline, client.log[-2000:]
        time.sleep(0.05)
    assert "rebuilt ['tacacs']" in client.log
    assert env.login()["status"] == "PASS"
    # clear
    assert client.command({"command": "clear", "peer": None})["result"]["cleared"] == 1
    assert env.login()["status"] == "PASS"
    # stop: the TUN goes, the block stays (needs CAP_NET_ADMIN only)
    assert env.gws.gateways.pop("client").terminate() == 0
    assert "Traceback" not in client.log and "Operation not permitted" not in client.log
    assert os.path.exists("/proc/self")  # (the test process itself kept everything)
