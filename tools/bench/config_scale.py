"""Configuration at scale (issue #19 item 7): parse, check-config, start and a
SIGHUP with one crypto map changed, at N crypto maps; strongSwan loading the
same N connections into charon, in the same run.

Run (root): .venv/bin/python tools/bench/config_scale.py [--maps 1000 10000] [--no-strongswan]
Or, without root: ... config_scale.py --in-process [--daemon-gc] [--maps 1000 10000]: only the
SIGHUP after the parse (``Gateway.reload`` in this process, best of 5, and the
``Manager.reconfigure`` inside it), and this process's RSS after it.

The configuration is a responder for N NAS, as tools/bench/ike_scale.py builds
it: one ACL, peer (IPv6, 2001:db8:1::/64) and identity per crypto map, plus one
TUN route per map (the NAS's inner address, 2001:db8:2::/64), one PSK file for
all. Measured per N, wall time:

- parse: ``ipsecmgr.config.load_config`` in this process (TOML + validation +
  the ACL checks of ``check-config``);
- check-config: ``ipsecmgr check-config FILE``, a process of its own;
- start: ``ipsecmgr run`` in a fresh network namespace, from the exec to its
  ``ready`` line (N fail-closed routes, N TUN routes, sockets, the Manager);
- SIGHUP, one map changed: another DPD interval for one map, SIGHUP, until the
  daemon says ``READY=1`` again on its ``$NOTIFY_SOCKET`` (sd_notify, after
  ``RELOADING=1``); and the same with nothing changed. Its ``-v`` log line says
  what was kept and rebuilt.

The reference (``--no-strongswan`` skips it): charon (bookworm's 5.9.8, the
lab's :class:`ipsecmgr.lab.strongswan.StrongSwanPeer`, log level -1) in a
namespace of its own, ``swanctl --load-all`` of N connections of the same
shape (one peer, identity and host-to-host child each, one PSK), then again
with one connection's ``dpd_delay`` changed (swanctl sends every connection
again; charon replaces the changed one). Every namespace and process is
removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ipsecmgr import config as cfg
from ipsecmgr.daemon import validate_acl
from ipsecmgr.lab.strongswan import PeerOptions, StrongSwanPeer
from ipsecmgr.lab.topology import python_env
from ipsecmgr.netns import Netns, NetnsPool
from ipsecmgr.secret import Secret

GW = "2001:db8::1"
SERVER = "2001:db8:ffff::49"
PSK = b"config-scale-bench-psk-0123456789"
TIMEOUT = 600.0  # seconds: a bound on any one step, far above what it takes


def peer(i: int) -> str:
    return f"2001:db8:1::{i >> 16:x}:{i & 0xFFFF:x}" if i >= 0x10000 else f"2001:db8:1::{i:x}"


def inner(i: int) -> str:
    return f"2001:db8:2::{i >> 16:x}:{i & 0xFFFF:x}" if i >= 0x10000 else f"2001:db8:2::{i:x}"


def config_text(n: int, work: Path, dpd_of_m0: int = 30) -> str:
    """N responder crypto maps; ``dpd_of_m0``: map m0's DPD interval (the reload's change)."""
    out = [
        "[ike_transform_set.ike]\ndh_group = 31\n",
        '[ipsec_transform_set.esp]\nmode = "tunnel"\n',
        f'[gateway]\nlocal_addresses = ["{GW}"]\ncontrol_socket = "{work}/control.sock"\n',
    ]
    for i in range(n):
        out.append(
            f'[access_list.a{i}]\nrules = ["permit ipv6 host {SERVER} host {inner(i + 1)}"]\n'
            f'[crypto_map.m{i}]\nmatch_address = "a{i}"\npeer = "{peer(i + 1)}"\n'
            f'role = "responder"\nlocal_psk = {{ file = "psk" }}\n'
            f'ike_transform_sets = ["ike"]\nipsec_transform_sets = ["esp"]\n'
            f'remote_id = {{ type = "fqdn", value = "nas{i}.example" }}\n'
            + (f"dpd = {{ interval = {dpd_of_m0} }}\n" if i == 0 else "")
        )
    maps = ", ".join(f'"m{i}"' for i in range(n))
    routes = ", ".join(f'"{inner(i + 1)}/128"' for i in range(n))
    out.append(f"[tun.t]\ncrypto_maps = [{maps}]\nroutes = [{routes}]\n")
    return "\n".join(out)


def swanctl_text(n: int, dpd_of_c0: int = 30) -> str:
    """The same N peers as charon connections (responders, host-to-host children)."""
    conns = []
    for i in range(n):
        conns.append(
            f"  c{i} {{\n    version = 2\n    local_addrs = {GW}\n"
            f"    remote_addrs = {peer(i + 1)}\n"
            f"    proposals = aes256gcm16-prfsha256-x25519\n"
            f"    dpd_delay = {dpd_of_c0 if i == 0 else 30}\n"
            f"    local {{ auth = psk\n      id = {GW} }}\n"
            f"    remote {{ auth = psk\n      id = nas{i}.example }}\n"
            f"    children {{ child {{ local_ts = {SERVER}/128\n"
            f"      remote_ts = {inner(i + 1)}/128\n      esp_proposals = aes256gcm16 }} }}\n  }}\n"
        )
    return (
        "connections {\n" + "".join(conns) + "}\n"
        f"secrets {{\n  ike-psk {{ secret = 0x{PSK.hex()} }}\n}}\n"
    )


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def wait_line(proc: subprocess.Popen[str], want: str, timeout: float) -> None:
    """Read the process's stdout until a line equal to ``want`` (bounded in time)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if line.strip() == want:
                return
            if not line and proc.poll() is not None:
                break
    raise RuntimeError(f"no {want!r} from the daemon (exit {proc.poll()})")


def wait_notify(sock: socket.socket, after: str, want: str, timeout: float) -> None:
    """sd_notify datagrams: ``after`` (e.g. RELOADING=1), then one holding ``want``."""
    deadline = time.monotonic() + timeout
    seen = False
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(4096).decode()
        seen = seen or after in data.splitlines()
        if seen and want in data.splitlines():
            return
    raise RuntimeError(f"no {want} after {after} from the daemon")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def gateway_ns(pool: NetnsPool, role: str) -> Netns:
    ns = pool.add(role)
    ns.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
    ns.ip("addr", "add", f"{GW}/64", "dev", "v0", "nodad")
    for ifname in ("v0", "v1"):
        ns.ip("link", "set", ifname, "up")
    return ns


def ours(n: int, work: Path, pool: NetnsPool) -> dict[str, Any]:
    path = work / "gateway.toml"
    psk = work / "psk"
    psk.write_bytes(PSK)
    psk.chmod(0o600)
    path.write_text(config_text(n, work))
    res: dict[str, Any] = {}
    res["parse_s"], config = timed(lambda: cfg.load_config(path, validate_acl=validate_acl))
    assert not [w for w in config.warnings], config.warnings[:3]
    check = [sys.executable, "-m", "ipsecmgr.cli", "check-config", str(path)]
    env = python_env()
    res["check_s"], out = timed(
        lambda: subprocess.run(check, capture_output=True, text=True, env=env, timeout=TIMEOUT)
    )
    assert out.returncode == 0, out.stderr[-500:]
    ns = gateway_ns(pool, "cfg")
    notify_path = work / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        env = python_env({"NOTIFY_SOCKET": str(notify_path)})
        run = [sys.executable, "-m", "ipsecmgr.cli", "run", "--config", str(path), "-v"]
        log = open(work / "daemon.log", "w")  # noqa: SIM115 (the daemon's stderr)
        t0 = time.perf_counter()
        proc = ns.popen(run, env=env, stderr=log.fileno())
        log.close()
        wait_line(proc, "ready", TIMEOUT)
        res["start_s"] = time.perf_counter() - t0
        res["rss_mb"] = rss_mb(proc.pid)
        wait_notify(notify, "READY=1", "READY=1", TIMEOUT)  # the start's own READY=1
        for label, dpd in (("sighup_one_s", 31), ("sighup_none_s", 31)):
            path.write_text(config_text(n, work, dpd_of_m0=dpd))
            t0 = time.perf_counter()
            os.kill(proc.pid, signal.SIGHUP)
            wait_notify(notify, "RELOADING=1", "READY=1", TIMEOUT)
            res[label] = time.perf_counter() - t0
        proc.terminate()
        proc.wait(timeout=60)
    text = (work / "daemon.log").read_text()
    res["reloads"] = re.findall(r"reloaded: (.*)", text)
    return res


def reload_in_process(
    n: int, work: Path, repeat: int = 5, daemon_gc: bool = False
) -> dict[str, float]:
    """SIGHUP after the parse, in this process (no kernel, no root): a
    :class:`Gateway` built without ``start``, then ``Gateway.reload`` with map
    m0's DPD interval changed, ``repeat`` times; the best of each, in seconds, of
    the whole reload and of the ``Manager.reconfigure`` inside it. ``daemon_gc``:
    the heap frozen and the collector's thresholds set as the daemon does once
    ready (``ipsecmgr.serve.run``), else Python's defaults."""
    from ipsecmgr.daemon import Gateway
    from ipsecmgr.serve import GC_THRESHOLDS

    path = work / "gateway.toml"
    psk = work / "psk"
    psk.write_bytes(PSK)
    psk.chmod(0o600)
    path.write_text(config_text(n, work))
    gw = Gateway(cfg.load_config(path, validate_acl=validate_acl))
    inner: list[float] = []
    reconfigure = gw.manager.reconfigure

    def timed_reconfigure(*args: Any) -> None:
        t0 = time.perf_counter()
        reconfigure(*args)
        inner.append(time.perf_counter() - t0)

    setattr(gw.manager, "reconfigure", timed_reconfigure)  # noqa: B010 (a method replaced)
    if daemon_gc:
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
    defaults = gc.get_threshold()
    whole: list[float] = []
    for k in range(repeat):
        path.write_text(config_text(n, work, dpd_of_m0=31 + k))
        new = cfg.load_config(path, validate_acl=validate_acl)
        t0 = time.perf_counter()
        gw.reload(new)
        whole.append(time.perf_counter() - t0)
    assert len(inner) == repeat
    del new
    gc.collect()  # the RSS with the running configuration only (the last one read is it)
    if daemon_gc:
        gc.unfreeze()
        gc.set_threshold(*defaults)
    return {"reload_s": min(whole), "reconfigure_s": min(inner), "rss_mb": rss_mb(os.getpid())}


def strongswan(n: int, work: Path, pool: NetnsPool) -> dict[str, Any]:
    ns = gateway_ns(pool, "sw")
    sw = StrongSwanPeer(ns, work / "sw")
    res: dict[str, Any] = {}
    try:
        opts = PeerOptions(log_level=-1, ike="aes256gcm16-prfsha256-x25519")
        res["start_s"], _ = timed(
            lambda: sw.start(local=GW, remote=peer(1), psk=Secret(PSK), options=opts)
        )
        conf = work / "sw" / "many.conf"
        for label, dpd in (("load_s", 30), ("reload_one_s", 31)):
            conf.write_text(swanctl_text(n, dpd))
            res[label], _ = timed(lambda: sw.swanctl("--load-all", "--file", str(conf),
                                                     timeout=int(TIMEOUT)))  # fmt: skip
        listed = sw.swanctl("--list-conns", timeout=int(TIMEOUT)).stdout
        res["conns"] = len(re.findall(r"^c\d+: ", listed, re.M))
        assert sw.pid is not None
        res["rss_mb"] = rss_mb(sw.pid)
    finally:
        sw.stop()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maps", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--no-strongswan", action="store_true")
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="only the SIGHUP after the parse, in this process (no root, no kernel)",
    )
    ap.add_argument(
        "--daemon-gc",
        action="store_true",
        help="with --in-process: the heap frozen and the GC thresholds of the running daemon",
    )
    a = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}", flush=True)
    if a.in_process:
        print(f"{'maps':>7} {'reload ms':>10} {'reconfigure ms':>15} {'RSS MB':>7}")
        for n in a.maps:
            with tempfile.TemporaryDirectory(prefix="cfgscale-") as tmp:
                os.chmod(tmp, 0o700)
                r = reload_in_process(n, Path(tmp), daemon_gc=a.daemon_gc)
            print(
                f"{n:>7} {r['reload_s'] * 1e3:>10.1f} {r['reconfigure_s'] * 1e3:>15.2f}"
                f" {r['rss_mb']:>7.0f}"
            )
        print(
            "best of 5: Gateway.reload after the parse, one map changed; of it,"
            " Manager.reconfigure; RSS of this process after the reloads (one size after"
            " the other: it only grows)"
        )
        return 0
    hdr = (f"{'maps':>7} {'parse':>7} {'check':>7} {'start':>7} {'HUP 1':>7} {'HUP 0':>7}"
           f" {'RSS MB':>7} | {'charon':>7} {'load':>7} {'reload1':>7} {'RSS MB':>7}")  # fmt: skip
    print(hdr)
    for n in a.maps:
        with tempfile.TemporaryDirectory(prefix="cfgscale-") as tmp, NetnsPool("cfs") as pool:
            work = Path(tmp)
            os.chmod(work, 0o700)
            o = ours(n, work, pool)
            s = strongswan(n, work, pool) if not a.no_strongswan else {}
        line = (f"{n:>7} {o['parse_s']:>7.2f} {o['check_s']:>7.2f} {o['start_s']:>7.2f} "
                f"{o['sighup_one_s']:>7.2f} {o['sighup_none_s']:>7.2f} "
                f"{o['rss_mb']:>7.0f}")  # fmt: skip
        if s:
            line += (f" | {s['start_s']:>7.2f} {s['load_s']:>7.2f} {s['reload_one_s']:>7.2f} "
                     f"{s['rss_mb']:>7.0f}")  # fmt: skip
            assert s["conns"] == n, s["conns"]
        print(line, flush=True)
        for line in o["reloads"]:
            print(f"        daemon log: reloaded: {line}", flush=True)
    print(
        "seconds, wall; HUP 1 / HUP 0: SIGHUP with one map / no map changed, to READY=1;"
        " charon: start to vici up; load / reload1: swanctl --load-all of N / one changed"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
