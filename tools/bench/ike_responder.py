"""IKE responder handshakes per second: ours (``ipsecmgr run``) against strongSwan's charon.

Run (root): /work/main/.venv/bin/python tools/bench/ike_responder.py [--seconds 8] [--runs 2]

One netns lab; the responder runs on the gw (ours, then charon, alternating per
round), and the same initiator runs on the client host: a small Python tool on
our IKE engine (``ike.IkeSA``, the lab's client config, ECP-256, AES-GCM-256,
PSK) that keeps ``--window`` new IKE SAs in flight, each IKE_SA_INIT +
IKE_AUTH (with its first Child SA) and a new IKE SA every time. Printed: the
handshakes per second each responder completed (median of the rounds), the
responder's CPU ms per handshake, and the ratio. The initiator is the same for
both, so whichever responder is faster may be capped by it; its own CPU share
is printed too.

    (internal) ike_responder.py initiator --config client.toml --seconds S --window W
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
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
from ipsecmgr.manager import build_ike_config
from ipsecmgr.secret import Secret

TARGET = 1.5  # ours / strongSwan, at least
PSK = b"bench-ike-psk-0123456789"


def initiator(config: Path, seconds: float, window: int) -> dict[str, Any]:
    """Complete as many handshakes as possible in ``seconds``; ``window`` in flight."""
    cfg = load_config(config)
    cmap = cfg.crypto_maps["tacacs"]
    ike_cfg = build_ike_config(cfg, cmap, parse_acls(cfg)[cmap.match_address])
    # By name: next to this file, tools/bench/ike.py would shadow the package for mypy.
    ike_sa: Any = importlib.import_module("ike.sa")
    # UDP 500, and 4500 once an SA floats (RFC 7296 §2.23; bookworm's charon fakes a NAT).
    socks = {}
    for port in (500, 4500):
        socks[port] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        socks[port].bind((str(ike_cfg.local_addr[0]), port))

    def send(sa: Any, now: float) -> None:
        for data, addr in sa.datagrams_to_send(now):
            socks[4500 if addr[1] == 4500 else 500].sendto(data, addr)

    inflight: dict[bytes, tuple[Any, float]] = {}
    done = failed = 0
    t0 = time.monotonic()
    end = t0 + seconds
    while (now := time.monotonic()) < end:
        while len(inflight) < window:
            sa = ike_sa.IkeSA(ike_cfg, True)
            sa.initiate(now)
            send(sa, now)
            inflight[sa.ch.spi_i] = (sa, now)
        ready = select.select(list(socks.values()), [], [], 0.2)[0]
        if not ready:
            # Nothing for 200 ms: count the stuck ones as failed and start again.
            for key, (_, started) in list(inflight.items()):
                if now - started > 2.0:
                    del inflight[key]
                    failed += 1
            continue
        for sock in ready:
            data, addr = sock.recvfrom(65535)
            spi_i = data[4:12] if data[:4] == b"\x00\x00\x00\x00" else data[:8]
            entry = inflight.get(spi_i)
            if entry is None:
                continue  # e.g. a DELETE for an SA we already forgot
            sa = entry[0]
            sa.receive_datagram(data, (addr[0], addr[1]), now)
            send(sa, now)
            if sa.established:
                done += 1
                del inflight[spi_i]
            elif sa.dead:
                failed += 1
                del inflight[spi_i]
    elapsed = time.monotonic() - t0
    user, system = cpu_times(os.getpid())
    return {"handshakes": done, "failed": failed, "seconds": elapsed, "cpu_s": user + system}


def run_initiator(lab: Lab, conf: Path, seconds: float, window: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "initiator", "--config", str(conf), "--seconds",
           f"{seconds:g}", "--window", str(window)]  # fmt: skip
    proc = subprocess.run(lab.client.argv(cmd), capture_output=True, text=True,
                          timeout=seconds + 30, env=python_env(), check=False)  # fmt: skip
    if proc.returncode != 0 or not proc.stdout.strip():
        raise BenchError(f"initiator failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@contextlib.contextmanager
def our_responder(lab: Lab, work: Path, tag: str) -> Iterator[int]:
    (work / tag).mkdir()
    with LabGateways(lab, work / tag, psk=PSK) as gws:
        gws.start("gw", dh_group=19, verbose=0)
        yield gws["gw"].proc.pid


@contextlib.contextmanager
def strongswan_responder(lab: Lab, work: Path, tag: str) -> Iterator[int]:
    sw = lab_strongswan_args(lab.addresses, "gw")
    peer = StrongSwanPeer(lab.ns("gw"), work / tag)
    try:
        peer.start(local=sw.local, remote=sw.remote, psk=Secret(PSK),
                   options=replace(sw.options, ike="aes256gcm16-prfsha256-ecp256"))  # fmt: skip
        if peer.pid is None:
            raise BenchError("charon did not start")
        yield peer.pid
    finally:
        peer.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    i = sub.add_parser("initiator")
    i.add_argument("--config", type=Path, required=True)
    i.add_argument("--seconds", type=float, default=5.0)
    i.add_argument("--window", type=int, default=8)
    p.add_argument("--seconds", type=float, default=8.0, help="one measurement")
    p.add_argument("--runs", type=int, default=2, help="rounds (median)")
    p.add_argument("--window", type=int, default=8, help="handshakes in flight")
    args = p.parse_args(argv)
    if args.cmd == "initiator":
        print(json.dumps(initiator(args.config, args.seconds, args.window)))
        return 0
    t0 = time.monotonic()
    res: dict[str, list[dict[str, Any]]] = {"ours": [], "strongswan": []}
    responders = {"ours": our_responder, "strongswan": strongswan_responder}
    with tempfile.TemporaryDirectory(prefix="ipsecmgr-ikebench-") as tmp, Lab("tunnel") as lab:
        work = Path(tmp)
        # The initiator's config: the lab's client side, ECP-256, the same PSK.
        (work / "init").mkdir()
        gws = LabGateways(lab, work / "init", psk=PSK)
        conf = gws.write_config("client", dh_group=19)
        for r in range(args.runs):
            order = ["ours", "strongswan"] if r % 2 == 0 else ["strongswan", "ours"]
            for name in order:
                print(f"measuring round {r + 1}/{args.runs}: {name} ...", file=sys.stderr)
                with responders[name](lab, work, f"{name}{r}") as pid:
                    u0, s0 = cpu_times_tree(pid)
                    got = run_initiator(lab, conf, args.seconds, args.window)
                    u1, s1 = cpu_times_tree(pid)
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
        init_cpu = sum(x["cpu_s"] for x in res[name]) / sum(x["seconds"] for x in res[name])
        print(f"{name}: runs {runs} handshakes/s, {fails} failed; initiator CPU "
              f"{init_cpu:.0%} of one core")  # fmt: skip
    met = sw > 0 and ours / sw >= TARGET
    print(
        f"target: responder handshakes/s >= {TARGET:g}x strongSwan: "
        f"{ours / sw if sw else 0:.2f}x  {'met' if met else 'NOT met'}"
    )
    print(f"(total {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
