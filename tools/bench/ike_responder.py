"""IKE responder handshakes per second: ours (``ipsecmgr run``) against strongSwan's charon.

Run (root): /work/main/.venv/bin/python tools/bench/ike_responder.py [--seconds 8] [--runs 2]
                                     [--profile DIR]

One netns lab; the responder runs on the gw (ours, then charon, alternating per
round), and the same initiator runs on the client host: a small Python tool on
our IKE engine (``ike.IkeSA``, the lab's client config, ECP-256, AES-GCM-256,
PSK) that keeps ``--window`` new IKE SAs in flight, each IKE_SA_INIT +
IKE_AUTH (with its first Child SA) and a new IKE SA every time. The protected
selectors are the server LAN (``far_net``): kernel-libipsec needs a local
address inside them to install charon's Child SA (with the server's /32 charon
answered TS_UNACCEPTABLE and installed nothing). Printed: the
handshakes per second each responder completed (median of the rounds), the
responder's CPU ms per handshake, and the ratio. The initiator is the same for
both, so whichever responder is faster may be capped by it; its own CPU share
is printed too.

With ``--profile DIR`` our daemon (``IPSECMGR_PROFILE``, see ipsecmgr/cli.py) and
the initiator run under cProfile; their top functions are printed at the end
(cProfile roughly doubles the CPU per call, so the rates of such a run are low).

    (internal) ike_responder.py initiator --config client.toml --seconds S --window W
                                          [--profile FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import json
import os
import pstats
import re
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _lab import BenchError, cpu_times, cpu_times_tree

from ipsecmgr.config import load_config
from ipsecmgr.daemon import parse_acls
from ipsecmgr.lab.configs import lab_strongswan_args
from ipsecmgr.lab.gateways import LabGateways
from ipsecmgr.lab.strongswan import StrongSwanPeer
from ipsecmgr.lab.topology import Lab, python_env
from ipsecmgr.secret import Secret
from ipsecmgr.translate import build_ike_config

TARGET = 1.5  # ours / strongSwan, at least
PSK = b"bench-ike-psk-0123456789"
STUCK = 2.0  # seconds after which the initiator gives a handshake up (counted as failed)
# charon as a tuned responder, like ours in this benchmark: its log at level 0 (ours runs
# at WARNING: no line per message); the half-open limits of ours (cookies after 64; its
# default block_threshold of 5 half-open SAs per peer address dropped IKE_SA_INITs of
# the 8 in flight); no route per Child SA (ours routes the TUN once, at start-up).
CHARON_OPTS = ("block_threshold = 64", "cookie_threshold = 64", "install_routes = no")


def initiator(config: Path, seconds: float, window: int) -> dict[str, Any]:
    """Complete as many handshakes as possible in ``seconds``; ``window`` in flight."""
    cfg = load_config(config)
    cmap = cfg.crypto_maps["tacacs"]
    ike_cfg = build_ike_config(cfg, cmap, parse_acls(cfg)[cmap.match_address])
    # By name: next to this file, tools/bench/ike.py would shadow the package for mypy.
    ike_sa: Any = importlib.import_module("ike.sa")
    # One set of lookup tables for every IKE SA this load generator starts (as one
    # endpoint would have): decoded identities, selectors, PSK-derived keys (ike.caches)
    caches = importlib.import_module("ike.caches").EngineCaches()
    # UDP 500, and 4500 once an SA floats (RFC 7296 §2.23; bookworm's charon fakes a NAT).
    socks = {}
    for port in (500, 4500):
        socks[port] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        socks[port].bind((str(ike_cfg.local_addr[0]), port))

    def send(sa: Any, now: float) -> None:
        for data, addr in sa.datagrams_to_send(now):
            socks[4500 if addr[1] == 4500 else 500].sendto(data, addr)

    for sock in socks.values():
        sock.setblocking(False)
    # As the daemon does once it is up: the start-up heap out of the collector's
    # reach (the load generator's own cost; the responder sees the same messages).
    gc.collect()
    gc.freeze()
    inflight: dict[bytes, tuple[Any, float]] = {}
    done = failed = no_child = 0
    stuck: dict[str, int] = {}  # state of the handshakes given up: which answer was missing
    t0 = time.monotonic()
    end = t0 + seconds
    sweep = t0 + STUCK / 4
    while (now := time.monotonic()) < end:
        while len(inflight) < window:
            sa = ike_sa.IkeSA(ike_cfg, True, caches=caches)
            sa.initiate(now)
            send(sa, now)
            inflight[sa.spi_i] = (sa, now)
        ready = select.select(list(socks.values()), [], [], 0.2)[0]
        now = time.monotonic()
        for sock in ready:
            for _ in range(64):  # drain: one select per batch, not per datagram
                try:
                    data, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                spi_i = data[4:12] if data[:4] == b"\x00\x00\x00\x00" else data[:8]
                entry = inflight.get(spi_i)
                if entry is None:
                    continue  # e.g. a DELETE for an SA we already forgot
                sa = entry[0]
                sa.receive_datagram(data, (addr[0], addr[1]), now)
                send(sa, now)
                if sa.established:
                    done += 1
                    no_child += not sa.children  # e.g. TS_UNACCEPTABLE: IKE SA only
                    del inflight[spi_i]
                elif sa.dead:
                    failed += 1
                    del inflight[spi_i]
        if now >= sweep:
            # A handshake without an answer for STUCK s (a message lost, or dropped by
            # the responder) has failed: count it and give its slot to a new one, so
            # that the window stays full whatever the responder does.
            sweep = now + STUCK / 4
            for key, (sa, started) in list(inflight.items()):
                if now - started > STUCK:
                    del inflight[key]
                    failed += 1
                    stuck[str(sa.state)] = stuck.get(str(sa.state), 0) + 1
    elapsed = time.monotonic() - t0
    user, system = cpu_times(os.getpid())
    return {"handshakes": done, "failed": failed, "stuck": stuck, "no_child": no_child,
            "seconds": elapsed, "cpu_s": user + system, "sys_s": system}  # fmt: skip


def run_initiator(
    lab: Lab, conf: Path, seconds: float, window: int, profile: Path | None = None
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "initiator", "--config", str(conf), "--seconds",
           f"{seconds:g}", "--window", str(window)]  # fmt: skip
    if profile is not None:
        cmd += ["--profile", str(profile)]
    proc = subprocess.run(lab.client.argv(cmd), capture_output=True, text=True,
                          timeout=seconds + 30, env=python_env(), check=False)  # fmt: skip
    if proc.returncode != 0 or not proc.stdout.strip():
        raise BenchError(f"initiator failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@dataclass
class Responder:
    pid: int
    sas: Callable[[], str]  # the SA table after a run: does it grow?


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def our_responder(lab: Lab, work: Path, tag: str, profile: Path | None) -> Iterator[Responder]:
    (work / tag).mkdir()
    with LabGateways(lab, work / tag, psk=PSK) as gws:
        if profile is not None:
            # ipsecmgr.cli writes the stats to IPSECMGR_PROFILE.<pid> when the daemon exits.
            os.environ["IPSECMGR_PROFILE"] = str(profile / f"ipsecmgr-{tag}.prof")
        try:
            gws.start("gw", dh_group=19, verbose=0, far_net=lab.addresses.lan4)
        finally:
            os.environ.pop("IPSECMGR_PROFILE", None)
        gw = gws["gw"]

        def sas() -> str:
            snap = gw.snapshot()
            return (f"{len(snap['ike_sas'])} IKE SA(s), {len(snap['child_sas'])} Child SA(s), "
                    f"RSS {_rss_mb(gw.proc.pid):.0f} MB")  # fmt: skip

        yield Responder(gw.proc.pid, sas)


@contextlib.contextmanager
def strongswan_responder(
    lab: Lab, work: Path, tag: str, profile: Path | None
) -> Iterator[Responder]:
    sw = lab_strongswan_args(lab.addresses, "gw")
    peer = StrongSwanPeer(lab.ns("gw"), work / tag)
    try:
        peer.start(local=sw.local, remote=sw.remote, psk=Secret(PSK),
                   options=replace(sw.options, ike="aes256gcm16-prfsha256-ecp256",
                                   log_level=0, charon_opts=CHARON_OPTS))  # fmt: skip
        if peer.pid is None:
            raise BenchError("charon did not start")
        pid = peer.pid

        def sas() -> str:
            stats = peer.swanctl("--stats", check=False).stdout
            ike = re.search(r"IKE_SAs: (\d+) total", stats)
            return f"{ike.group(1) if ike else '?'} IKE SA(s), RSS {_rss_mb(pid):.0f} MB"

        yield Responder(pid, sas)
    finally:
        peer.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    i = sub.add_parser("initiator")
    i.add_argument("--config", type=Path, required=True)
    i.add_argument("--seconds", type=float, default=5.0)
    i.add_argument("--window", type=int, default=8)
    i.add_argument("--profile", type=Path, help="cProfile stats to this file")
    p.add_argument("--seconds", type=float, default=8.0, help="one measurement")
    p.add_argument("--runs", type=int, default=2, help="rounds (median)")
    p.add_argument("--window", type=int, default=8, help="handshakes in flight")
    p.add_argument("--profile", type=Path, help="cProfile our daemon and the initiator into DIR")
    args = p.parse_args(argv)
    if args.cmd == "initiator":
        if args.profile is None:
            print(json.dumps(initiator(args.config, args.seconds, args.window)))
            return 0
        import cProfile

        prof = cProfile.Profile()
        try:
            got = prof.runcall(initiator, args.config, args.seconds, args.window)
        finally:
            prof.dump_stats(args.profile)
        print(json.dumps(got))
        return 0
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    res: dict[str, list[dict[str, Any]]] = {"ours": [], "strongswan": []}
    responders = {"ours": our_responder, "strongswan": strongswan_responder}
    with tempfile.TemporaryDirectory(prefix="ipsecmgr-ikebench-") as tmp, Lab("tunnel") as lab:
        work = Path(tmp)
        # The initiator's config: the lab's client side, ECP-256, the same PSK.
        (work / "init").mkdir()
        gws = LabGateways(lab, work / "init", psk=PSK)
        conf = gws.write_config("client", dh_group=19, far_net=lab.addresses.lan4)
        for r in range(args.runs):
            order = ["ours", "strongswan"] if r % 2 == 0 else ["strongswan", "ours"]
            for name in order:
                print(f"measuring round {r + 1}/{args.runs}: {name} ...", file=sys.stderr)
                tag = f"{name}{r}"
                iprof = args.profile / f"initiator-{tag}.prof" if args.profile else None
                with responders[name](lab, work, tag, args.profile) as resp:
                    u0, s0 = cpu_times_tree(resp.pid)
                    got = run_initiator(lab, conf, args.seconds, args.window, iprof)
                    u1, s1 = cpu_times_tree(resp.pid)
                    got["left"] = resp.sas()
                got["responder_cpu_s"] = (u1 - u0) + (s1 - s0)
                res[name].append(got)
        gws.close()

    def rate(name: str) -> float:
        return float(statistics.median(x["handshakes"] / x["seconds"] for x in res[name]))

    def cpu_ms(name: str) -> float:
        n = sum(x["handshakes"] for x in res[name])
        return 1e3 * sum(x["responder_cpu_s"] for x in res[name]) / n if n else float("nan")

    ours, sw = rate("ours"), rate("strongswan")
    print(
        f"IKE responder benchmark: IKE_SA_INIT + IKE_AUTH (+ first Child SA), ECP-256, "
        f"AES-GCM-256, PSK, new IKE SA each time; {args.window} in flight; "
        f"{args.seconds:g} s x {args.runs} rounds (median); the same initiator (our engine)"
    )
    print(f"{'':<34}{'ours':>10}{'strongSwan':>12}{'ratio':>8}")
    print(f"{'handshakes/s':<34}{ours:>10.1f}{sw:>12.1f}{ours / sw if sw else 0:>7.2f}x")
    print(
        f"{'responder CPU ms per handshake':<34}{cpu_ms('ours'):>10.2f}"
        f"{cpu_ms('strongswan'):>12.2f}{cpu_ms('ours') / cpu_ms('strongswan'):>7.2f}x"
    )
    for name in ("ours", "strongswan"):
        runs = ", ".join(f"{x['handshakes'] / x['seconds']:.0f}" for x in res[name])
        fails = sum(x["failed"] for x in res[name])
        no_child = sum(x["no_child"] for x in res[name])
        init_cpu = sum(x["cpu_s"] for x in res[name]) / sum(x["seconds"] for x in res[name])
        init_ms = 1e3 * sum(x["cpu_s"] for x in res[name]) / sum(x["handshakes"] for x in res[name])
        print(
            f"{name}: runs {runs} handshakes/s, {fails} failed, {no_child} without a Child SA; "
            f"initiator CPU {init_cpu:.0%} of one core, {init_ms:.2f} ms per handshake; "
            f"after the last run: {res[name][-1]['left']}"
        )
    met = sw > 0 and ours / sw >= TARGET
    print(
        f"target: responder handshakes/s >= {TARGET:g}x strongSwan: "
        f"{ours / sw if sw else 0:.2f}x  {'met' if met else 'NOT met'}"
    )
    print(f"(total {time.monotonic() - t0:.0f} s)")
    if args.profile is not None:
        print_profiles(args.profile)
    return 0


def print_profiles(where: Path, top: int = 30) -> None:
    """The hottest functions (own time) of our daemon and of the initiator."""
    groups = {
        "our responder daemon (all rounds)": sorted(where.glob("ipsecmgr-ours*.prof.*")),
        "the initiator against ours (all rounds)": sorted(where.glob("initiator-ours*.prof")),
        "the initiator against strongSwan": sorted(where.glob("initiator-strongswan*.prof")),
    }
    for title, paths in groups.items():
        if not paths:
            continue
        out = io.StringIO()
        stats = pstats.Stats(*map(str, paths), stream=out)
        stats.sort_stats("tottime").print_stats(top)
        print(f"\n== cProfile of {title}, top {top} by own time")
        print(out.getvalue().strip())


if __name__ == "__main__":
    sys.exit(main())
