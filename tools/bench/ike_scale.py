"""A responder for N peers, in-process: cost per handshake, per timer, per datagram, RSS.

Run: .venv/bin/python tools/bench/ike_scale.py [--peers 1000 10000] [--no-storm]

One :class:`ipsecmgr.manager.Manager` as the daemon builds it, from a generated
configuration of N responder crypto maps (one ACL, one peer address and one
identity each; IPv6 peers 2001:db8:1::/64, the gateway 2001:db8::1; X25519,
AES-GCM-256, PSK). N initiator :class:`ike.IkeSA` s (the same engine, the
mirrored configuration) hand their datagrams to ``Manager.on_ike_datagram`` in
memory, ``WINDOW`` handshakes in flight; the responder's answers go back the
same way. Only the responder's calls are timed, in CPU time of this thread
(``time.thread_time``: the machine is shared, and a handshake during which the
process was not scheduled would otherwise count the other processes' work).

Printed per N:
- handshake: the responder's µs per handshake (IKE_SA_INIT + IKE_AUTH with the
  first Child SA, its ESP SAs installed) over the first and the last 1,000
  peers, and their ratio (goal at 10,000: last/first <= 1.3);
- timer: ``IkeEndpoint.get_timer`` + ``handle_timer`` with nothing due, and
  ``Manager.next_deadline`` + ``on_timer`` with nothing due (the daemon's
  re-arm after every batch of datagrams);
- datagram: the Manager's fixed cost per IKE datagram (an unknown SPI, dropped:
  ``on_ike_datagram`` + ``next_deadline``);
- RSS per peer: the growth of this process's RSS over the N handshakes divided
  by N (the initiators are dropped once up, so at most ``WINDOW`` of them are
  alive: what grows is the responder: engine IKE SA + Child SA pair + the
  Manager's records, ESP SAs and SA-flow entries);
- storm: a restart of the responder (a new Manager), all N initiators at once
  (INITIAL_CONTACT); COOKIEs engage above the half-open threshold (64) as
  configured. The responder's total time, against N x the per-handshake cost.

The reference of the same run is N = 1,000 (the goals are ratios to it).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ike
import npusim
from ike.caches import EngineCaches
from ipsecmgr import config as cfg
from ipsecmgr.daemon import parse_acls, validate_acl
from ipsecmgr.datapath import Datapath
from ipsecmgr.manager import Manager
from ipsecmgr.records import Address
from ipsecmgr.serve import GC_THRESHOLDS

GW = "2001:db8::1"
# The N initiators stand for N peers in this one process: they share one endpoint's
# lookup tables (ike.caches), so that each one does not decode and derive afresh
# (untimed, but its garbage would be collected during the responder's calls)
PEER_CACHES = EngineCaches()
SERVER = "2001:db8:ffff::49"
PSK_ENV = "IKE_SCALE_PSK"
PSK = "ike-scale-bench-psk-0123456789"
WINDOW = 32  # handshakes in flight (below the COOKIE threshold of 64)
SAMPLE = 1000  # first / last handshakes averaged
REPEAT = 200  # timer and datagram calls averaged


def peer_address(i: int) -> str:
    return f"2001:db8:1::{i >> 16:x}:{i & 0xFFFF:x}" if i >= 0x10000 else f"2001:db8:1::{i:x}"


def config_text(n: int) -> str:
    """N responder crypto maps, each with its own ACL, peer and identity."""
    out = [
        '[ike_transform_set.ike]\nencryption = "aes-gcm-256"\nprf = "sha256"\ndh_group = 31\n',
        '[ipsec_transform_set.esp]\nesp = "aes-gcm-256"\nmode = "tunnel"\n',
        f'[gateway]\nlocal_addresses = ["{GW}"]\nmanagement_interface = "eth0"\n',
    ]
    names = []
    for i in range(n):
        peer = peer_address(i + 1)
        name = f"m{i}"
        names.append(name)
        out.append(
            f'[access_list.a{i}]\nrules = ["permit ipv6 host {SERVER} host {peer}"]\n'
            f"[crypto_map.{name}]\n"
            f'match_address = "a{i}"\npeer = "{peer}"\nrole = "responder"\n'
            f'local_psk = {{ env = "{PSK_ENV}" }}\n'
            f'ike_transform_sets = ["ike"]\nipsec_transform_sets = ["esp"]\n'
            f'remote_id = {{ type = "fqdn", value = "nas{i}.example" }}\n'
        )
    out.append("[tun.t]\ncrypto_maps = [" + ",".join(f'"{m}"' for m in names))
    out[-1] += "]\n"
    return "\n".join(out)


def rss_kb() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


class NullSock:
    def sendto(self, data: bytes, addr: Address) -> int:
        return len(data)


class Responder:
    """The Manager as the daemon builds it (without sockets and TUN)."""

    def __init__(self, config: cfg.Config, acls: dict[str, npusim.Acl]) -> None:
        classifier = npusim.Classifier(
            [
                npusim.CryptoMap(n, acls[m.match_address], (str(m.peer),))
                for n, m in config.crypto_maps.items()
            ]
        )
        saflow = npusim.SaFlowTable()
        sock = NullSock()
        esp_socks: dict[int, Any] = {socket.AF_INET: sock, socket.AF_INET6: sock}
        datapath = Datapath(classifier, saflow, esp_socks, {}, lambda name, pkt: None)
        self.out: list[tuple[bytes, Address]] = []
        self.manager = Manager(config, acls, datapath, self._send)
        self.busy = 0.0  # seconds spent in the responder

    def _send(self, data: bytes, peer: Address, local: Address | None) -> None:
        self.out.append((data, peer))

    def datagram(self, data: bytes, peer: Address, now: float) -> list[tuple[bytes, Address]]:
        m = self.manager
        t0 = time.thread_time()
        m.on_ike_datagram(data, (GW, 500), peer, now)
        m.next_deadline()  # the daemon re-arms its timer after every batch
        self.busy += time.thread_time() - t0
        out, self.out = self.out, []
        return out


def initiator_configs(resp: Responder) -> list[ike.IkeConfig]:
    """Each map's IkeConfig seen from the peer's side."""
    out = []
    for state in resp.manager.maps.values():
        c = state.ike_config
        out.append(
            dataclasses.replace(
                c,
                local_addr=c.peer_addr,
                peer_addr=c.local_addr,
                local_id=c.remote_id,
                remote_id=c.local_id,
                local_psk=c.peer_psk,
                remote_psk=c.local_psk,
                local_ts=c.remote_ts,
                remote_ts=c.local_ts,
                name="i",
            )
        )
    return out


def handshakes(
    resp: Responder, configs: list[ike.IkeConfig], now: float, window: int
) -> tuple[list[float], int]:
    """Establish every config's IKE SA, ``window`` at a time; responder µs per handshake
    in the order they completed, and how many failed."""
    per: list[float] = []
    failed = 0
    todo = iter(configs)
    inflight: dict[bytes, tuple[Any, float]] = {}  # SPIi -> (initiator, responder time)
    pending: list[tuple[bytes, Address, bytes]] = []  # (datagram, from, SPIi)

    def start() -> None:
        for c in todo:
            sa = ike.IkeSA(c, True, caches=PEER_CACHES)
            sa.initiate(now)
            inflight[sa.spi_i] = (sa, 0.0)
            for data, _ in sa.datagrams_to_send(now):
                pending.append((data, c.local_addr, sa.spi_i))
            if len(inflight) >= window:
                return

    start()
    while pending:
        batch, pending[:] = list(pending), []
        for data, src, spi_i in batch:
            before = resp.busy
            answers = resp.datagram(data, src, now)
            sa, spent = inflight[spi_i]
            spent += resp.busy - before
            inflight[spi_i] = (sa, spent)
            for answer, _ in answers:
                sa.receive_datagram(answer, (GW, 500), now)
                for d, _ in sa.datagrams_to_send(now):
                    pending.append((d, sa.config.local_addr, spi_i))
            if sa.established and sa.children:
                per.append(spent)
                del inflight[spi_i]
            elif sa.dead or (not answers and not sa.established):
                failed += 1
                del inflight[spi_i]
        start()
    return per, failed + len(inflight)


def fixed_costs(resp: Responder, now: float) -> dict[str, float]:
    """µs per call with nothing due / nothing to do."""
    m, ep = resp.manager, resp.manager.endpoint

    def per_call(fn: Callable[[], object]) -> float:
        # The median of 7 rounds: a round the scheduler interrupted says nothing
        rounds = []
        for _ in range(7):
            t0 = time.thread_time()
            for _ in range(REPEAT):
                fn()
            rounds.append((time.thread_time() - t0) / REPEAT * 1e6)
        return statistics.median(rounds)

    # A well-formed INFORMATIONAL with an SPI nobody has: parsed, looked up, dropped.
    junk = ike.payloads.build_plain_message(b"\x01" * 8, b"\x02" * 8, 37, 0x08, 1, [])
    peer = (peer_address(1), 500)
    return {
        "timer_engine": per_call(lambda: (ep.get_timer(), ep.handle_timer(now))),
        "timer_manager": per_call(lambda: (m.on_timer(now), m.next_deadline())),
        "datagram": per_call(lambda: resp.datagram(junk, peer, now)),
    }


def storm(
    config: cfg.Config, acls: dict[str, npusim.Acl], configs: list[ike.IkeConfig], now: float
) -> dict[str, float]:
    """A responder restart: every peer initiates at once (COOKIEs above 64 half-open)."""
    resp = Responder(config, acls)
    t0 = time.perf_counter()
    sas = {}
    pending: list[tuple[bytes, Address, bytes]] = []
    for c in configs:
        sa = ike.IkeSA(c, True, caches=PEER_CACHES)
        sa.initiate(now)
        sas[sa.spi_i] = sa
        pending += [(d, c.local_addr, sa.spi_i) for d, _ in sa.datagrams_to_send(now)]
    rounds = 0
    while pending and rounds < 20:
        rounds += 1
        batch, pending = pending, []
        for data, src, spi_i in batch:
            sa = sas[spi_i]
            for answer, _ in resp.datagram(data, src, now):
                sa.receive_datagram(answer, (GW, 500), now)
                pending += [(d, src, spi_i) for d, _ in sa.datagrams_to_send(now)]
    up = sum(1 for sa in sas.values() if sa.established and sa.children)
    counters = resp.manager.endpoint.counters
    return {
        "wall_s": time.perf_counter() - t0,
        "responder_s": resp.busy,
        "up": up,
        "cookies": counters.get("cookie_sent", 0),
        "rounds": rounds,
    }


def breakdown(n: int, sites: int = 0) -> dict[str, float]:
    """Bytes per established peer by where Python allocated them (tracemalloc:
    ike/, esp/, ipsecmgr/, npusim/, the rest), and what RSS grew by beyond that
    (OpenSSL contexts of the AESGCM objects, allocator overhead). With ``sites``,
    also that many lines of this repository that allocated the most (the snapshot
    grouped by traceback, each traceback charged to its innermost frame in the
    repository, outside tools/)."""
    import tracemalloc

    diag = cfg.parse_config(
        tomllib.loads(config_text(n)), environ={PSK_ENV: PSK}, validate_acl=validate_acl
    )
    assert diag.config is not None
    acls = parse_acls(diag.config)
    resp = Responder(diag.config, acls)
    configs = initiator_configs(resp)
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    tracemalloc.start(25 if sites else 1)
    s0 = tracemalloc.take_snapshot()
    per, _ = handshakes(resp, configs, 1000.0, WINDOW)
    gc.collect()
    s1 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    root = str(Path(__file__).resolve().parents[2]) + "/"
    if sites:
        by_site: dict[str, list[float]] = {}
        for st in s1.compare_to(s0, "traceback"):
            site = "other"
            for fr in reversed(st.traceback):  # innermost first
                if fr.filename.startswith(root) and "/tools/" not in fr.filename:
                    site = f"{fr.filename[len(root) :]}:{fr.lineno}"
                    break
            acc = by_site.setdefault(site, [0.0, 0.0])
            acc[0] += st.size_diff / len(per)
            acc[1] += st.count_diff / len(per)
        for site, (size, count) in sorted(by_site.items(), key=lambda kv: -kv[1][0])[:sites]:
            print(f"{size:8.0f} B/peer {count:5.1f} objects  {site}")
        print()
    out: dict[str, float] = {}
    for st in sorted(s1.compare_to(s0, "filename"), key=lambda st: -st.size_diff):
        name = st.traceback[0].filename
        where = name[len(root) :].split("/")[0] + "/" if name.startswith(root) else "other"
        out[where] = out.get(where, 0.0) + st.size_diff / len(per)
    python = sum(out.values())
    # RSS from a run of its own (tracemalloc's records would be counted here)
    cmd = [sys.executable, __file__, "--one", str(n), "--no-storm"]
    rss = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
    out["= Python objects, total"] = python
    out["RSS growth (a run without tracemalloc)"] = rss["rss_kb_per_peer"] * 1024
    out["RSS - Python objects: OpenSSL, allocator"] = rss["rss_kb_per_peer"] * 1024 - python
    return out


def run(n: int, with_storm: bool) -> dict[str, Any]:
    gc.collect()
    text = config_text(n)
    t0 = time.perf_counter()
    diag = cfg.parse_config(tomllib.loads(text), environ={PSK_ENV: PSK}, validate_acl=validate_acl)
    assert diag.config is not None, diag.errors[:5]
    config = diag.config
    acls = parse_acls(config)
    resp = Responder(config, acls)
    start_s = time.perf_counter() - t0
    configs = initiator_configs(resp)
    now = 1000.0
    # As the daemon does once it is up: start-up objects out of the collector's reach,
    # and its collector thresholds
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    rss0 = rss_kb()
    per, failed = handshakes(resp, configs, now, WINDOW)
    gc.collect()
    rss1 = rss_kb()
    res: dict[str, Any] = {
        "n": n,
        "config_start_s": start_s,
        "up": len(per),
        "failed": failed,
        # Medians (a run shares the machine: a preempted handshake says nothing), and
        # means (they include the collector's full passes, which grow with the heap)
        "first_us": statistics.median(per[:SAMPLE]) * 1e6,
        "last_us": statistics.median(per[-SAMPLE:]) * 1e6,
        "first_mean_us": statistics.fmean(per[:SAMPLE]) * 1e6,
        "last_mean_us": statistics.fmean(per[-SAMPLE:]) * 1e6,
        "rss_kb_per_peer": (rss1 - rss0) / max(len(per), 1),
        "rss_mb": rss1 / 1024,
    }
    res |= fixed_costs(resp, now)
    if with_storm:
        del resp
        gc.collect()
        res |= {"storm_" + k: v for k, v in storm(config, acls, configs, now).items()}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--peers", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--no-storm", action="store_true", help="skip the restart storm")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # (internal) one N, JSON out
    ap.add_argument("--breakdown", type=int, metavar="N", help="bytes per peer by package, N peers")
    ap.add_argument(
        "--sites", type=int, default=0, metavar="K", help="with --breakdown: the top K lines"
    )
    args = ap.parse_args(argv)
    if args.breakdown:
        for where, size in breakdown(args.breakdown, args.sites).items():
            print(f"{size:8.0f} B/peer  {where}")
        return 0
    if args.one is not None:
        print(json.dumps(run(args.one, not args.no_storm)))
        return 0
    results = []
    for n in args.peers:
        # One process per N: RSS growth is only meaningful in a fresh heap
        cmd = [sys.executable, __file__, "--one", str(n)] + (["--no-storm"] * args.no_storm)
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
        results.append(r)
        print(
            f"N={n:>6}: config+start {r['config_start_s']:.1f} s, {r['up']} up "
            f"({r['failed']} failed); handshake median first {r['first_us']:.0f} µs, last "
            f"{r['last_us']:.0f} µs (x{r['last_us'] / r['first_us']:.2f}), mean "
            f"{r['first_mean_us']:.0f} / {r['last_mean_us']:.0f} µs; timer engine "
            f"{r['timer_engine']:.1f} µs, manager {r['timer_manager']:.1f} µs; datagram "
            f"{r['datagram']:.1f} µs; RSS {r['rss_kb_per_peer']:.1f} KB/peer "
            f"({r['rss_mb']:.0f} MB)",
            flush=True,
        )
        if "storm_up" in r:
            print(
                f"          storm: {r['storm_up']}/{n} up in {r['storm_rounds']} rounds, "
                f"{r['storm_cookies']} COOKIEs; responder {r['storm_responder_s']:.1f} s "
                f"(wall with initiators {r['storm_wall_s']:.1f} s)",
                flush=True,
            )
    ref = results[0]
    for r in results[1:]:
        storm_goal = ""
        if "storm_responder_s" in r:
            bound = 1.3 * r["n"] * ref["first_us"] / 1e6
            storm_goal = f", storm {r['storm_responder_s']:.1f} s vs 1.3xNx{ref['first_us']:.0f}"
            storm_goal += f" µs = {bound:.1f} s"
        print(
            f"N={r['n']} vs N={ref['n']}: last/first x{r['last_us'] / r['first_us']:.2f}, "
            f"timer engine x{r['timer_engine'] / ref['timer_engine']:.2f}, manager "
            f"x{r['timer_manager'] / ref['timer_manager']:.2f}, datagram "
            f"x{r['datagram'] / ref['datagram']:.2f}{storm_goal} (goals: 1.3)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
