"""Our gateway pair against a strongSwan pair, on the same lab, in the same run.

Run (root): /work/main/.venv/bin/python tools/bench/tunnel.py [--seconds 10] [--runs 3]
            [--rtt-count 1000] [--quick] [--json] [--profile DIR] [--datapath split|single|both]
            [--encap udp|raw] [--offload on|off]

One :class:`ipsecmgr.lab.topology.Lab` (tunnel mode) is built, and on it three
paths are measured from the client namespace to the server namespace:

- clear text: no gateway, the lab's routes forward in clear (context only);
- ours: ``ipsecmgr run`` on the client host (initiator) and on the gw
  (responder), via :class:`ipsecmgr.lab.gateways.LabGateways`;
- strongSwan: charon with ``kernel-libipsec`` (userspace ESP, TUN ``ipsec0``)
  on the same two namespaces, via :class:`ipsecmgr.lab.strongswan.StrongSwanPeer`.

Both tunnels carry ESP AES-GCM-256 (aes256gcm16) over a TUN of MTU 1400; each
round checks both (the SA's algorithm and the TUN's MTU) before measuring.
bookworm's strongSwan 5.9.8 sends ESP inside UDP 4500 (it fakes a NAT); ours
does the same by default (``--encap udp``: ``encapsulation = "always"``), or
raw IP protocol 50 with ``--encap raw``. ``--offload on|off`` sets our
``[gateway] offload`` (TUN TSO super-packets, UDP GSO/GRO; default on).

The run is ``--runs`` rounds. In each round ours and strongSwan (alternating
which goes first) are set up, measured and torn down in turn, so that a busy
spell of this shared machine does not fall on one of them only; clear text is
measured once, in the first round. A round on a tunnel is: one iperf3 TCP run of
``--seconds`` s from the client (bound to src_ip 192.0.2.1, so the packets go
through the tunnel) to the TACACS+ server's address 203.0.113.49, with each
gateway process's CPU time (utime + stime, all threads) and ESP packet counters
(in + out) read before and after it; then its share of ``--rtt-count`` UDP round
trips (tools/bench/udp_echo.py). Reported: the median TCP throughput, the median
and p90 of all round trips pooled, and per gateway the CPU µs per ESP packet
summed over the rounds.

The targets of the issues (TCP >= 3x strongSwan, RTT <= 0.6x strongSwan) are
printed as met / not met; they are information, and the exit code is 0 either
way. Exit 2 means setup failed (nothing was measured), 130 an interrupt.
Everything (namespaces, daemons, iperf3, echo server) is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pstats
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _lab import (
    BenchError,
    bare_forwarders,
    cpu_times_tree,
    iperf3_tcp,
    link_mtu,
    ping_until_up,
    tun_stats,
    udp_echo_server,
    udp_rtt,
)
from udp_echo import percentile

from ipsecmgr.lab.configs import lab_strongswan_args
from ipsecmgr.lab.gateways import GatewayError, LabGateways
from ipsecmgr.lab.strongswan import StrongSwanError, StrongSwanPeer
from ipsecmgr.lab.topology import Lab
from ipsecmgr.netns import NetnsError
from ipsecmgr.secret import Secret

SIDES = ("client", "gw")  # initiator host, responder gateway
TUN_MTU = 1400
OUR_TUN = "ipsm0"
SW_TUN = "ipsec0"
TCP_TARGET = 3.0  # ours / strongSwan, at least
RTT_TARGET = 0.6  # ours / strongSwan, at most
FLOOR_TARGET = 0.9  # ours / the bare forwarder (the Python floor), at least


@dataclass
class Setup:
    """A path that is up and carries traffic: what measuring one round on it needs."""

    pids: dict[str, int]  # gateway process by side; empty for clear text
    esp_packets: Callable[[str], tuple[int, int]] | None  # (in, out) of a side's ESP SAs
    info: dict[str, Any]  # esp, tun_mtu, encap, profiles: checked facts, reported as is


@dataclass
class Samples:
    """Everything measured on one path, summed or pooled over its rounds."""

    tcp_mbps: list[float] = field(default_factory=list)
    rtt_us: list[float] = field(default_factory=list)
    rtt_lost: int = 0
    rtt_size: int = 0
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # side -> sums
    info: dict[str, Any] = field(default_factory=dict)


def one_round(lab: Lab, args: argparse.Namespace, setup: Setup, rtt_count: int,
              out: Samples) -> None:  # fmt: skip
    """One TCP run (with each gateway's CPU time and ESP packets over it), then round trips."""
    before = {s: (cpu_times_tree(p), setup.esp_packets(s)) for s, p in setup.pids.items()
              if setup.esp_packets}  # fmt: skip
    out.tcp_mbps.append(iperf3_tcp(lab, args.seconds))
    for side, pid in setup.pids.items():
        assert setup.esp_packets is not None
        (user0, sys0), (in0, out0) = before[side]
        (user1, sys1), (in1, out1) = cpu_times_tree(pid), setup.esp_packets(side)
        sums = out.cpu.setdefault(side, dict.fromkeys(("user_s", "system_s", "in", "out"), 0.0))
        for key, delta in (("user_s", user1 - user0), ("system_s", sys1 - sys0),
                           ("in", in1 - in0), ("out", out1 - out0)):  # fmt: skip
            sums[key] += delta
    rtt = udp_rtt(lab, rtt_count, max_seconds=args.rtt_max_seconds)
    out.rtt_us += rtt["samples_us"]
    out.rtt_lost += rtt["lost"]
    out.rtt_size = rtt["size"]
    for key, value in setup.info.items():
        if key == "profiles":
            for side, path in value.items():
                paths = path if isinstance(path, list) else [path]
                out.info.setdefault("profiles", {}).setdefault(side, []).extend(paths)
        else:
            out.info[key] = value() if callable(value) else value


def summary(s: Samples) -> dict[str, Any]:
    rtts = sorted(s.rtt_us)
    result: dict[str, Any] = {
        "tcp_mbps": statistics.median(s.tcp_mbps),
        "tcp_runs_mbps": s.tcp_mbps,
        "rtt": {"count": len(rtts) + s.rtt_lost, "received": len(rtts), "lost": s.rtt_lost,
                "size": s.rtt_size},
        **s.info,
    }  # fmt: skip
    if rtts:
        result["rtt"].update(median_us=statistics.median(rtts), p90_us=percentile(rtts, 90),
                             min_us=rtts[0], max_us=rtts[-1])  # fmt: skip
    if s.cpu:
        result["cpu"] = {}
        for side, c in s.cpu.items():
            cpu_s, packets = c["user_s"] + c["system_s"], int(c["in"] + c["out"])
            result["cpu"][side] = {
                "cpu_s": cpu_s,
                "user_s": c["user_s"],
                "system_s": c["system_s"],
                "esp_packets": packets,
                "esp_packets_in": int(c["in"]),
                "esp_packets_out": int(c["out"]),
                "us_per_packet": cpu_s * 1e6 / packets if packets else None,
            }
    return result


@contextlib.contextmanager
def clear_path(lab: Lab, args: argparse.Namespace, work: Path, tag: str) -> Iterator[Setup]:
    """No gateway: the lab's own routes forward in clear."""
    yield Setup({}, None, {"encap": "clear text"})


@contextlib.contextmanager
def our_tunnel(lab: Lab, args: argparse.Namespace, work: Path, tag: str,
               datapath: str | None = None) -> Iterator[Setup]:  # fmt: skip
    """``ipsecmgr run`` on both sides, the tunnel up (checked: AES-GCM-256, TUN MTU 1400)."""
    datapath = datapath or ("single" if args.datapath == "both" else args.datapath)
    (work / tag).mkdir()
    prof = args.profile / f"ipsecmgr-{tag}.prof" if args.profile else None
    if prof:
        # ipsecmgr.cli writes cProfile stats to IPSECMGR_PROFILE.<pid> when the daemon exits.
        os.environ["IPSECMGR_PROFILE"] = str(prof)
    with LabGateways(lab, work / tag) as gws:
        try:
            for side in ("gw", "client"):  # the responder first
                encap = {"encapsulation": "always"} if args.encap == "udp" else {}
                conf = gws.write_config(side, map_options=encap)
                offload = "true" if args.offload == "on" else "false"
                text = conf.read_text().replace(
                    "[gateway]\n", f'[gateway]\ndatapath = "{datapath}"\noffload = {offload}\n'
                )
                conf.write_text(text.replace(f"[tun.{OUR_TUN}]\n",
                                             f"[tun.{OUR_TUN}]\nmtu = {args.mtu}\n")
                                + getattr(args, "extra_config", ""))  # fmt: skip
                gws.start(side, config=conf, verbose=0)
        finally:
            os.environ.pop("IPSECMGR_PROFILE", None)
        ping_until_up(lab)
        child = gws["client"].snapshot()["child_sas"]
        encryption = sorted({c["encryption"] for c in child})
        if encryption != ["AES-GCM-16-256"]:
            raise BenchError(f"our Child SA is not AES-GCM-256: {encryption}")
        mtu = {side: link_mtu(lab.ns(side), OUR_TUN) for side in SIDES}
        if set(mtu.values()) != {args.mtu}:
            raise BenchError(f"our TUN MTU is not {args.mtu}: {mtu}")
        want = args.encap == "udp"
        if {bool(c["encap"]) for c in child} != {want}:
            raise BenchError(f"our Child SA is not {'ESP-in-UDP' if want else 'raw ESP'}")

        def esp_packets(side: str) -> tuple[int, int]:
            stats = gws[side].snapshot()["statistics"]["esp"]
            return int(stats.get("esp_in_packets", 0)), int(stats.get("esp_out_packets", 0))

        pids = {side: gws[side].proc.pid for side in SIDES}
        info: dict[str, Any] = {
            "esp": encryption[0],
            "tun_mtu": mtu,
            "datapath": datapath,
            "encap": "ESP-in-UDP 4500" if child[0]["encap"] else "ESP (IP protocol 50)",
            "offload": args.offload,
            # read after each TCP run (one_round calls it): kernel offloads really used
            "offload_counters": lambda: {s: _offload_counters(gws[s].snapshot()) for s in SIDES},
        }
        if prof:
            # written when the daemons (and their workers) exit, at the end of this block
            info["profiles"] = {
                side: [f"{prof}.{p}" for p in (pid, *_children(pid))] for side, pid in pids.items()
            }
        yield Setup(pids, esp_packets, info)


OFFLOAD_COUNTERS = ("tun_gso_reads", "tun_gso_writes", "esp_udp_gso_sends", "esp_udp_gro_batches")


def _offload_counters(snap: dict[str, Any]) -> dict[str, int]:
    stats = snap["statistics"]
    return {k: int(stats["tun"].get(k, stats["esp"].get(k, 0))) for k in OFFLOAD_COUNTERS}


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@contextlib.contextmanager
def floor_path(lab: Lab, args: argparse.Namespace, work: Path, tag: str) -> Iterator[Setup]:
    """tools/bench/forwarder.py on both sides: TUN <-> raw socket and nothing else."""
    with bare_forwarders(lab, OUR_TUN, args.mtu) as pids:
        ping_until_up(lab)
        mtu = {side: link_mtu(lab.ns(side), OUR_TUN) for side in SIDES}

        def tun_packets(side: str) -> tuple[int, int]:
            # No ESP counters here: the TUN's own (written to it = in, read from it = out).
            stats = tun_stats(lab.ns(side), OUR_TUN)
            return stats["rx"]["packets"], stats["tx"]["packets"]

        info = {"encap": "bare IP protocol 50, no ESP, no crypto", "tun_mtu": mtu}
        yield Setup(pids, tun_packets, info)


def _sw_esp_packets(peer: StrongSwanPeer) -> tuple[int, int]:
    """(in, out) over all Child SAs, as tests/ipsecmgr/test_lab_strongswan.py counts them."""
    sas = peer.swanctl("--list-sas", "--raw").stdout
    return (
        sum(int(n) for n in re.findall(r"packets-in=(\d+)", sas)),
        sum(int(n) for n in re.findall(r"packets-out=(\d+)", sas)),
    )


@contextlib.contextmanager
def strongswan_tunnel(lab: Lab, args: argparse.Namespace, work: Path, tag: str) -> Iterator[Setup]:
    """charon (kernel-libipsec) on both sides, the tunnel up (same checks as ours)."""
    psk = Secret(b"bench-strongswan-psk")
    peers: dict[str, StrongSwanPeer] = {}
    with contextlib.ExitStack() as stack:
        for side in ("gw", "client"):  # the responder first, then the initiator
            sw = lab_strongswan_args(lab.addresses, side)
            peer = StrongSwanPeer(lab.ns(side), work / f"{tag}-{side}")
            stack.callback(peer.stop)
            peer.start(local=sw.local, remote=sw.remote, psk=psk, options=sw.options,
                       initiate=side == "client")  # fmt: skip
            peers[side] = peer
        ping_until_up(lab)
        raw = peers["client"].swanctl("--list-sas", "--raw").stdout
        algs = sorted(set(re.findall(r"encr-alg=(\w+) encr-keysize=(\d+)", raw)))
        if ("AES_GCM_16", "256") not in algs:
            raise BenchError(f"strongSwan's SAs are not AES-GCM-256: {algs}")
        mtu = {side: link_mtu(lab.ns(side), SW_TUN) for side in SIDES}
        if set(mtu.values()) != {TUN_MTU}:
            raise BenchError(f"strongSwan's TUN MTU is not {TUN_MTU}: {mtu}")
        pids: dict[str, int] = {}
        for side, peer in peers.items():
            pid = peer.pid
            if pid is None:
                raise BenchError(f"strongSwan on {side} is not running")
            pids[side] = pid
        info = {
            "esp": "AES-GCM-16-256",
            "tun_mtu": mtu,
            "encap": "ESP-in-UDP 4500" if "encap=yes" in raw else "ESP (IP protocol 50)",
        }
        yield Setup(pids, lambda side: _sw_esp_packets(peers[side]), info)


PathSetup = Callable[[Lab, argparse.Namespace, Path, str], contextlib.AbstractContextManager[Setup]]
PATHS: dict[str, PathSetup] = {
    "clear": clear_path,
    "ours": our_tunnel,
    "strongswan": strongswan_tunnel,
    "floor": floor_path,
    # --datapath both: ours again, with the opt-in split data path (information)
    "split": lambda lab, args, work, tag: our_tunnel(lab, args, work, tag, "split"),
}


def _ratio(ours: float | None, ref: float | None) -> float | None:
    return ours / ref if ours is not None and ref else None


def summarise(res: dict[str, Any]) -> None:
    """Ratios (ours / strongSwan) and the issues' targets, added to ``res``."""
    o, s, f = res["ours"], res["strongswan"], res["floor"]
    res["ratios"] = {
        "tcp": _ratio(o["tcp_mbps"], s["tcp_mbps"]),
        "tcp_floor": _ratio(o["tcp_mbps"], f["tcp_mbps"]),
        "rtt_median": _ratio(o["rtt"].get("median_us"), s["rtt"].get("median_us")),
        "rtt_p90": _ratio(o["rtt"].get("p90_us"), s["rtt"].get("p90_us")),
    }
    for side in SIDES:
        res["ratios"][f"cpu_{side}"] = _ratio(
            o["cpu"][side]["us_per_packet"], s["cpu"][side]["us_per_packet"]
        )
    tcp, rtt = res["ratios"]["tcp"], res["ratios"]["rtt_median"]
    floor = res["ratios"]["tcp_floor"]
    res["targets"] = [
        {"target": f"TCP throughput >= {TCP_TARGET:g}x strongSwan", "ratio": tcp,
         "met": tcp is not None and tcp >= TCP_TARGET},
        {"target": f"TCP throughput >= {FLOOR_TARGET:g}x the bare forwarder (Python floor)",
         "ratio": floor, "met": floor is not None and floor >= FLOOR_TARGET},
        {"target": f"UDP RTT median <= {RTT_TARGET:g}x strongSwan", "ratio": rtt,
         "met": rtt is not None and rtt <= RTT_TARGET},
    ]  # fmt: skip


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render(res: dict[str, Any]) -> str:
    o, s, c, f = res["ours"], res["strongswan"], res["clear"], res["floor"]
    cfg = res["config"]
    lines = [
        f"tunnel benchmark: lab tunnel mode, ESP {o['esp']}, TUN MTU {cfg['tun_mtu']} (ours, "
        f"floor; strongSwan {TUN_MTU}); TCP {cfg['seconds']:g} s x {cfg['runs']} rounds "
        f"(median), paths alternating; {cfg['rtt_count']} UDP round trips of "
        f"{o['rtt']['size']} B",
        f"ours: datapath = {o.get('datapath')!r}, {o['encap']}, offload {o.get('offload')}; "
        f"strongSwan (kernel-libipsec, "
        f"userspace ESP): {s['encap']}; floor: tools/bench/forwarder.py ({f['encap']})",
        "",
        f"{'metric':<40} {'ours':>9} {'strongSwan':>10} {'ratio':>6} {'floor':>8} "
        f"{'ratio':>6} {'clear':>8}",
    ]

    def row(name: str, ours: float | None, ref: float | None, clear: float | None = None,
            floor: float | None = None, digits: int = 1) -> None:  # fmt: skip
        r, rf = _ratio(ours, ref), _ratio(ours, floor)
        lines.append(
            f"{name:<40} {_fmt(ours, digits):>9} {_fmt(ref, digits):>10} "
            f"{_fmt(r, 2) + 'x' if r is not None else '-':>6} {_fmt(floor, digits):>8} "
            f"{_fmt(rf, 2) + 'x' if rf is not None else '-':>6} {_fmt(clear, digits):>8}"
        )

    row("TCP throughput, Mbit/s", o["tcp_mbps"], s["tcp_mbps"], c["tcp_mbps"], f["tcp_mbps"])
    row("UDP RTT median, us", o["rtt"].get("median_us"), s["rtt"].get("median_us"),
        c["rtt"].get("median_us"), f["rtt"].get("median_us"))  # fmt: skip
    row("UDP RTT p90, us", o["rtt"].get("p90_us"), s["rtt"].get("p90_us"), c["rtt"].get("p90_us"),
        f["rtt"].get("p90_us"))  # fmt: skip
    for side, label in (("client", "initiator (client)"), ("gw", "responder (gw)")):
        row(f"CPU us per ESP packet, {label}", o["cpu"][side]["us_per_packet"],
            s["cpu"][side]["us_per_packet"], floor=f["cpu"][side]["us_per_packet"],
            digits=2)  # fmt: skip
    row("UDP round trips lost", o["rtt"]["lost"], s["rtt"]["lost"], c["rtt"]["lost"], digits=0)
    lines.append("")
    for who, r in (("ours", o), ("strongSwan", s), ("floor", f), ("clear text", c)):
        runs = ", ".join(f"{x:.0f}" for x in r["tcp_runs_mbps"])
        extra = ""
        if "cpu" in r:
            extra = "; ESP packets in TCP runs: " + ", ".join(
                f"{side} {r['cpu'][side]['esp_packets_in']} in + "
                f"{r['cpu'][side]['esp_packets_out']} out ({r['cpu'][side]['cpu_s']:.2f} s CPU, "
                f"{r['cpu'][side]['system_s'] / r['cpu'][side]['cpu_s']:.0%} in the kernel)"
                for side in SIDES
            )
        lines.append(f"{who}: TCP runs {runs} Mbit/s{extra}")
    if "offload_counters" in o:
        lines.append("ours, offload counters at the end of the last round: " + "; ".join(
            f"{side} " + ", ".join(f"{k} {v}" for k, v in o["offload_counters"][side].items())
            for side in SIDES))  # fmt: skip
    if "split" in res:
        g = res["split"]
        lines.append(
            f"ours with datapath = 'split' (same run): TCP {g['tcp_mbps']:.1f} Mbit/s "
            f"({_fmt(_ratio(g['tcp_mbps'], s['tcp_mbps']), 2)}x strongSwan, "
            f"{_fmt(_ratio(g['tcp_mbps'], f['tcp_mbps']), 2)}x floor), RTT median "
            f"{_fmt(g['rtt'].get('median_us'))} us "
            f"({_fmt(_ratio(g['rtt'].get('median_us'), s['rtt'].get('median_us')), 2)}x "
            f"strongSwan), CPU us per ESP packet "
            + ", ".join(f"{side} {_fmt(g['cpu'][side]['us_per_packet'], 2)}" for side in SIDES)
            + "; TCP runs "
            + ", ".join(f"{x:.0f}" for x in g["tcp_runs_mbps"])
        )
    lines.append("")
    for t in res["targets"]:
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}x"
        lines.append(f"target: {t['target']}: {ratio}  {'met' if t['met'] else 'NOT met'}")
    load = " ".join(f"{x:.2f}" for x in res["loadavg"])
    lines.append(f"(total {res['elapsed_s']:.0f} s; {os.cpu_count()} CPUs, load average {load})")
    if "profiles" in o:
        lines.append("(ours ran under cProfile: its figures are slowed down and not comparable)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    res: dict[str, Any] = {
        "config": {"seconds": args.seconds, "runs": args.runs, "rtt_count": args.rtt_count,
                   "tun_mtu": args.mtu, "datapath": args.datapath, "esp": "aes256gcm16",
                   "encap": args.encap, "offload": args.offload},
    }  # fmt: skip
    # Jumbo TUN MTUs need WAN links that carry them (plus the outer header and ESP).
    lab_mtu = args.mtu + 100 if args.mtu > TUN_MTU else None
    with (
        tempfile.TemporaryDirectory(prefix="ipsecmgr-bench-") as tmp,
        Lab("tunnel", mtu=lab_mtu) as lab,
    ):
        work = Path(tmp)
        res["config"]["lab"] = lab.pool.tag
        _progress(args, f"lab {lab.pool.tag} up")
        samples = {name: Samples() for name in PATHS if name != "split" or args.datapath == "both"}
        # The round trips are spread over the rounds (the first rounds get the remainder).
        rtt_counts = [args.rtt_count // args.runs + (r < args.rtt_count % args.runs)
                      for r in range(args.runs)]  # fmt: skip
        with udp_echo_server(lab):
            for r in range(args.runs):
                # Ours and strongSwan alternate, round by round, so that a busy spell of
                # this shared machine does not fall on one of them only.
                order = ["ours", "strongswan", "floor"]
                if args.datapath == "both":
                    order.insert(1, "split")
                order = order if r % 2 == 0 else order[::-1]
                if r == 0:
                    # Context only, ~50x faster than either tunnel: one round is enough.
                    order.insert(0, "clear")
                for name in order:
                    _progress(args, f"round {r + 1}/{args.runs}: {name}")
                    count = args.rtt_count if name == "clear" else rtt_counts[r]
                    with PATHS[name](lab, args, work, f"{name}{r}") as setup:
                        one_round(lab, args, setup, count, samples[name])
        for name, smp in samples.items():
            res[name] = summary(smp)
    summarise(res)
    res["elapsed_s"] = time.monotonic() - t0
    # Everything shares these cores: a busy machine lowers every figure (see the docs).
    res["loadavg"] = list(os.getloadavg())
    return res


def _progress(args: argparse.Namespace, what: str) -> None:
    if not args.json:
        print(f"measuring {what} ...", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="length of one iperf3 run")
    p.add_argument("--runs", type=int, default=3,
                   help="rounds: one iperf3 run per tunnel each (median)")  # fmt: skip
    p.add_argument("--rtt-count", type=int, default=1000, help="UDP round trips per tunnel")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s, 1 run, 100 round trips")
    p.add_argument("--datapath", choices=("single", "split", "both"), default="single",
                   help="our gateway's [gateway] datapath (default: single, the daemon's "
                   "default); both: single, and split as an extra line")  # fmt: skip
    p.add_argument("--encap", choices=("udp", "raw"), default="udp",
                   help="our ESP: in UDP 4500 like strongSwan (default), or raw (50)")  # fmt: skip
    p.add_argument("--offload", choices=("on", "off"), default="on",
                   help="our [gateway] offload: TUN TSO, UDP GSO/GRO (default: on)")  # fmt: skip
    p.add_argument(
        "--mtu",
        type=int,
        default=TUN_MTU,
        help="TUN MTU of ours and the floor, up to 9000 (strongSwan stays at 1400)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run our daemons under cProfile, write the stats to DIR and print the top "
        "functions (slows ours down: its figures are then not comparable)",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.seconds, a.runs, a.rtt_count = 2.0, 1, 100
    if not 576 <= a.mtu <= 9000:
        p.error("--mtu must be in 576..9000")
    if not (0 < a.seconds <= 60 and 1 <= a.runs <= 10 and 1 <= a.rtt_count <= 100_000):
        p.error("--seconds must be in (0, 60], --runs in 1..10, --rtt-count in 1..100000")
    # Round trips take ~0.1-1 ms each; a lost one costs 1 s. Bound the whole series.
    a.rtt_max_seconds = min(60.0, 5.0 + a.rtt_count * 0.01)
    return a


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def print_profiles(res: dict[str, Any], top: int = 25) -> None:
    """The hottest functions of each of our daemons, by own time (tottime)."""
    for side, all_paths in res["ours"].get("profiles", {}).items():
        paths = [p for p in all_paths if Path(p).exists()]  # a worker writes its own file
        print(f"\n== cProfile of our {side} gateway ({', '.join(paths)}), top {top} by own time")
        out = io.StringIO()
        pstats.Stats(*paths, stream=out).sort_stats("tottime").print_stats(top)
        print(out.getvalue().strip())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C, and SIGTERM too, unwind through the context managers that remove everything
    # (also when started in the background, where a shell leaves SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    try:
        res = run(args)
    except KeyboardInterrupt:
        print("interrupted: lab, gateways and tools removed", file=sys.stderr)
        return 130
    except (BenchError, GatewayError, StrongSwanError, NetnsError, TimeoutError) as exc:
        print(f"tunnel benchmark: setup failed: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2) if args.json else render(res))
    if args.profile and not args.json:
        print_profiles(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
