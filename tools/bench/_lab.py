"""Measurement helpers for the lab benchmarks (tools/bench/tunnel.py).

iperf3 runs, UDP round trips (tools/bench/udp_echo.py) and per-process CPU
time, all inside the namespaces of an :class:`ipsecmgr.lab.topology.Lab`.
Every process started here is started through the lab's pool (so the lab's
``close()`` would stop it too) and is stopped by PID as soon as it is done.
Every wait is bounded and polls a condition; none sleeps in its place.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ipsecmgr.lab.topology import Lab, LabProcess, python_env
from ipsecmgr.netns import Netns

UDP_ECHO = Path(__file__).resolve().parent / "udp_echo.py"
IPERF_PORT = 5201
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """Setup failed (a tunnel did not come up, a tool did not start): the run is void."""


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads), in seconds, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # proc(5): the command name (field 2) may hold spaces; count fields after ")".
    # Field 3 (state) is index 0 there, so utime (14) and stime (15) are 11 and 12.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_times_tree(pid: int) -> tuple[float, float]:
    """:func:`cpu_times` of a process plus its live children (the split data path's
    workers, the forwarder's two directions)."""
    user, system = cpu_times(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else ():
        with contextlib.suppress(FileNotFoundError, ValueError):
            u, s = cpu_times(int(child))
            user, system = user + u, system + s
    return user, system


def stop_pid(proc: subprocess.Popen[str], grace: float = 3.0) -> None:
    """SIGTERM this process (by PID), SIGKILL it if it is still there after ``grace``."""
    if proc.poll() is None:
        proc.terminate()  # Popen signals its own PID, and ignores one already gone
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def wait_until(what: str, condition: Any, timeout: float, interval: float = 0.05) -> None:
    """Poll ``condition()`` until it is true; BenchError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)  # polling a condition with a deadline, not a stand-in for one


def _tcp_listening(ns: Netns, port: int) -> bool:
    out = ns.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
    return bool(out.strip())


@contextlib.contextmanager
def iperf3_server(ns: Netns, bind: str, port: int = IPERF_PORT) -> Iterator[None]:
    """One-off iperf3 server (``-1``) in the foreground of ``ns``; stopped by PID.

    Never ``iperf3 -s -D``: a daemonised server escapes every timeout.
    """
    proc = ns.popen(["iperf3", "-s", "-1", "-B", bind, "-p", str(port)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_until("iperf3 server", lambda: proc.poll() is not None or _tcp_listening(ns, port),
                   timeout=10)  # fmt: skip
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise BenchError(f"iperf3 server exited (code {proc.returncode}): {err.strip()}")
        yield
    finally:
        stop_pid(proc)


def iperf3_tcp(lab: Lab, seconds: float, *, port: int = IPERF_PORT) -> float:
    """One iperf3 TCP run client → server (bound to src_ip); received Mbit/s."""
    a = lab.addresses
    assert a.src_ip4 is not None
    with iperf3_server(lab.server, a.server4, port):
        cmd = ["iperf3", "-c", a.server4, "-B", a.src_ip4, "-p", str(port), "-t", f"{seconds:g}",
               "-J", "--connect-timeout", "5000"]  # fmt: skip
        proc = lab.client.run(cmd, check=False, timeout=seconds + 30)
    try:
        data = json.loads(proc.stdout)
    except ValueError as exc:
        raise BenchError(f"iperf3 client: no JSON (exit {proc.returncode}): {proc.stderr}") from exc
    if "error" in data:
        raise BenchError(f"iperf3 client: {data['error']}")
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e6


@contextlib.contextmanager
def udp_echo_server(lab: Lab) -> Iterator[LabProcess]:
    """tools/bench/udp_echo.py serving on the TACACS+ server's address; stopped by PID."""
    bind = lab.addresses.server4
    cmd = [sys.executable, str(UDP_ECHO), "server", "--bind", bind, "--max-seconds", "900"]
    proc = LabProcess(lab.server.popen(cmd, env=python_env()), "udp-echo")
    try:
        proc.wait_for(lambda e: e.get("event") == "listening", timeout=10)
        yield proc
    except TimeoutError as exc:
        raise BenchError(str(exc)) from exc
    finally:
        stop_pid(proc.proc)


def udp_rtt(lab: Lab, count: int, max_seconds: float) -> dict[str, Any]:
    """``count`` UDP round trips client (src_ip) → server; the echo client's JSON result
    (with ``samples_us``, every round trip)."""
    a = lab.addresses
    assert a.src_ip4 is not None
    cmd = [sys.executable, str(UDP_ECHO), "client", "--server", a.server4, "--bind", a.src_ip4,
           "--count", str(count), "--max-seconds", f"{max_seconds:g}", "--samples"]  # fmt: skip
    proc = subprocess.run(lab.client.argv(cmd), capture_output=True, text=True, check=False,
                          timeout=max_seconds + 30, env=python_env())  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise BenchError(f"udp_echo client printed nothing (exit {proc.returncode}): {proc.stderr}")
    result: dict[str, Any] = json.loads(lines[-1])
    if not result.get("received"):
        raise BenchError(f"no UDP echo came back: {result}")
    return result


def ping_until_up(lab: Lab, timeout: float = 20.0) -> None:
    """Ping the server from src_ip until one answer comes back (the tunnel carries traffic).

    The first packet may start IKE and be dropped (StarOS behaviour), so retry.
    """
    a = lab.addresses
    assert a.src_ip4 is not None
    cmd = ["ping", "-n", "-q", "-c", "1", "-W", "1", "-I", a.src_ip4, a.server4]
    wait_until(
        f"a ping {a.src_ip4} -> {a.server4} to come back",
        lambda: lab.client.run(cmd, check=False, timeout=5).returncode == 0,
        timeout,
        interval=0.0,
    )


def tun_stats(ns: Netns, ifname: str) -> dict[str, dict[str, int]]:
    """The kernel's counters of a link (``ip -s``): ``{"rx": {...}, "tx": {...}}``."""
    out = ns.run(["ip", "-j", "-s", "link", "show", "dev", ifname]).stdout
    stats: dict[str, dict[str, int]] = json.loads(out)[0]["stats64"]
    return stats


def link_mtu(ns: Netns, ifname: str) -> int:
    out = ns.run(["ip", "-j", "link", "show", "dev", ifname]).stdout
    return int(json.loads(out)[0]["mtu"])


FORWARDER = Path(__file__).resolve().parent / "forwarder.py"


@contextlib.contextmanager
def bare_forwarders(lab: Lab, tun: str, mtu: int) -> Iterator[dict[str, int]]:
    """tools/bench/forwarder.py on both sides, with the addresses and routes our
    gateway's lab config gives its TUN; yields their PIDs by side, stops them by PID."""
    a = lab.addresses
    assert a.src_ip4 is not None
    args = {
        "client": ["--peer", a.gw_wan4, "--route", f"{a.server4}/32", "--src", a.src_ip4,
                   "--address", f"{a.src_ip4}/32"],
        "gw": ["--peer", a.client_wan4, "--route", f"{a.src_ip4}/32"],
    }  # fmt: skip
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for side, extra in args.items():
            cmd = [sys.executable, str(FORWARDER), "--tun", tun, "--mtu", str(mtu), *extra]
            proc = procs[side] = lab.ns(side).popen(cmd, env=python_env(),
                                                    stderr=subprocess.DEVNULL)  # fmt: skip
            assert proc.stdout is not None
            line = ""
            if select.select([proc.stdout], [], [], 10)[0]:
                line = proc.stdout.readline().strip()
            if line != "ready":
                raise BenchError(f"forwarder on {side} did not start (exit {proc.poll()})")
        yield {side: p.pid for side, p in procs.items()}
    finally:
        for p in procs.values():
            stop_pid(p)
