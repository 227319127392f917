"""The cost of the Prometheus endpoint on the tunnel: ours with and without it.

Run (root): .venv/bin/python tools/bench/metrics.py [--seconds 5] [--runs 2]
            [--interval 1.0] [--rtt-count 200] [--json]

The same lab and measurement as tools/bench/tunnel.py (its ``our_tunnel`` and
``one_round``: iperf3 TCP through the tunnel, each daemon's CPU µs per ESP
packet, UDP round trips), on two variants of our gateway pair that alternate
round by round so that a busy spell of this shared machine hits both:

- ``off``: no ``[metrics]`` section (the default);
- ``on``: ``[metrics] listen = "127.0.0.1:9754"`` on both daemons, and a
  scraper in each gateway's namespace fetching ``/metrics`` every
  ``--interval`` seconds (default 1 s; Prometheus' default is 15 s) for the
  whole round. The scrape is served by the daemon's event loop, so its cost
  lands in the daemon's CPU time, which is what is measured.

The reference is ``off`` from the same run; the ratio on/off is printed. The
goal (issue #17) is "within noise": compare the ratio with the spread of the
``off`` runs, also printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import tunnel  # tools/bench/tunnel.py
from _lab import cpu_times_tree, udp_echo_server

from ipsecmgr.lab.topology import Lab

LISTEN = "127.0.0.1:9754"

SCRAPER = f"""
import signal, sys, time, urllib.request
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
interval, until = float(sys.argv[1]), time.monotonic() + float(sys.argv[2])
ok = failed = 0
try:
    while time.monotonic() < until:
        t = time.monotonic()
        try:
            body = urllib.request.urlopen("http://{LISTEN}/metrics", timeout=5).read()
            ok += body.startswith(b"# HELP")
        except OSError:
            failed += 1
        time.sleep(max(0.0, interval - (time.monotonic() - t)))
finally:
    print(ok, failed, flush=True)
"""


BURST = 50


def cpu_per_scrape(lab: Lab, side: str, pid: int) -> float:
    """The daemon's CPU ms per scrape: ``BURST`` scrapes back to back with the tunnel
    idle, the daemon's utime + stime before and after (its idle cost is ~0: it
    sleeps until a timer or a packet)."""
    code = (
        "import urllib.request\n"
        f"for _ in range({BURST}):\n"
        f"    urllib.request.urlopen('http://{LISTEN}/metrics', timeout=5).read()\n"
    )
    u0, s0 = cpu_times_tree(pid)
    lab.ns(side).run([sys.executable, "-c", code], timeout=60)
    u1, s1 = cpu_times_tree(pid)
    return (u1 - u0 + s1 - s0) * 1e3 / BURST


@contextlib.contextmanager
def scrapers(lab: Lab, interval: float, seconds: float) -> Iterator[list[Any]]:
    procs = [
        lab.ns(side).popen([sys.executable, "-c", SCRAPER, str(interval), str(seconds)])
        for side in tunnel.SIDES
    ]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
            p.wait(timeout=10)


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    samples = {"off": tunnel.Samples(), "on": tunnel.Samples()}
    scrapes = scrape_failures = 0
    scrape_cpu: dict[str, list[float]] = {}
    per_round: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="ipsecmgr-bench-") as tmp, Lab("tunnel") as lab:
        work = Path(tmp)
        with udp_echo_server(lab):
            for r in range(args.runs):
                order = ["off", "on"] if r % 2 == 0 else ["on", "off"]
                for variant in order:
                    if not args.json:
                        print(f"round {r + 1}/{args.runs}: metrics {variant} ...", file=sys.stderr)
                    args.extra_config = (
                        f'\n[metrics]\nlisten = "{LISTEN}"\n' if variant == "on" else ""
                    )
                    before = len(samples[variant].tcp_mbps)
                    with tunnel.our_tunnel(lab, args, work, f"{variant}{r}") as setup:
                        if variant == "on":
                            for side, pid in setup.pids.items():
                                scrape_cpu.setdefault(side, []).append(
                                    cpu_per_scrape(lab, side, pid)
                                )
                            # the whole round: TCP run plus round trips
                            with scrapers(lab, args.interval, args.seconds + 30) as procs:
                                tunnel.one_round(lab, args, setup, args.rtt_count, samples["on"])
                                for p in procs:
                                    p.terminate()
                                for p in procs:
                                    out, _ = p.communicate(timeout=10)
                                    ok, failed = (int(x) for x in out.split())
                                    scrapes += ok
                                    scrape_failures += failed
                        else:
                            tunnel.one_round(lab, args, setup, args.rtt_count, samples["off"])
                    per_round[variant] += samples[variant].tcp_mbps[before:]
    res: dict[str, Any] = {
        "config": {"seconds": args.seconds, "runs": args.runs, "interval_s": args.interval,
                   "rtt_count": args.rtt_count},
        "off": tunnel.summary(samples["off"]),
        "on": tunnel.summary(samples["on"]),
        "scrapes": scrapes,
        "daemon_cpu_ms_per_scrape": {k: statistics.median(v) for k, v in scrape_cpu.items()},
        "scrape_failures": scrape_failures,
        "elapsed_s": time.monotonic() - t0,
        "loadavg": list(__import__("os").getloadavg()),
    }  # fmt: skip
    return res


def render(res: dict[str, Any]) -> str:
    off, on = res["off"], res["on"]

    def us(r: dict[str, Any], side: str) -> float:
        return float(r["cpu"][side]["us_per_packet"])

    rows = [("TCP throughput, Mbit/s", off["tcp_mbps"], on["tcp_mbps"])]
    rows += [(f"CPU us per ESP packet, {s}", us(off, s), us(on, s)) for s in tunnel.SIDES]
    rows += [("UDP RTT median, us", off["rtt"]["median_us"], on["rtt"]["median_us"])]
    c = res["config"]
    lines = [
        f"metrics cost: ours with [metrics] scraped every {c['interval_s']} s (on) vs without "
        f"(off); TCP {c['seconds']} s x {c['runs']} rounds, alternating; "
        f"{c['rtt_count']} UDP round trips per round",
        "",
        f"{'metric':<40} {'off':>9} {'on':>9} {'on/off':>7}",
    ]
    for name, a, b in rows:
        lines.append(f"{name:<40} {a:>9.2f} {b:>9.2f} {b / a:>6.2f}x")
    spread = off["tcp_runs_mbps"]
    lines += [
        "",
        f"off TCP runs: {', '.join(f'{x:.0f}' for x in spread)} Mbit/s; "
        f"on TCP runs: {', '.join(f'{x:.0f}' for x in on['tcp_runs_mbps'])} Mbit/s",
        f"scrapes during the 'on' rounds: {res['scrapes']} answered, "
        f"{res['scrape_failures']} failed",
        "daemon CPU per scrape (tunnel idle, median of rounds, "
        f"{BURST} scrapes each): "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in res["daemon_cpu_ms_per_scrape"].items()),
        f"(total {res['elapsed_s']:.0f} s; load average "
        f"{' '.join(f'{x:.2f}' for x in res['loadavg'])})",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="length of one iperf3 run")
    p.add_argument("--runs", type=int, default=2, help="rounds (each: off and on)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    p.add_argument("--rtt-count", type=int, default=200, help="UDP round trips per round")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if not (0 < a.seconds <= 60 and 1 <= a.runs <= 10 and 0.1 <= a.interval <= 60):
        p.error("--seconds in (0, 60], --runs in 1..10, --interval in 0.1..60")
    base = tunnel.parse_args(["--seconds", str(a.seconds), "--rtt-count", str(a.rtt_count)])
    for k, v in vars(base).items():
        if not hasattr(a, k):
            setattr(a, k, v)
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    print(json.dumps(res, indent=2) if args.json else render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
