"""The responder daemon with N real peers in the lab: time for all to come up, RSS.

Run (root): .venv/bin/python tools/bench/lab_scale.py [--peers 1000] [--json]

``ipsecmgr run`` as the responder in one namespace, with one crypto map per
peer (generated; the daemon has no map template), and N initiators in another
(:mod:`ipsecmgr.lab.many_peers`: one ``ike.IkeEndpoint`` per peer on its own UDP
socket, 2001:db8:1::1 .. ::N, one selector loop). Measured:

- start: ``ipsecmgr run`` spawned -> "ready" (N maps parsed, TUN, routes, sockets);
- up: every peer initiates at once; the driver's time from its first IKE_SA_INIT
  to its last Child SA installed (a storm: COOKIEs engage above 64 half-open SAs,
  as configured), and the daemon's CPU time (utime + stime, /proc) over it;
- each peer sends one ESP probe on its Child SA; ``ipsecmgr show crypto statistics
  --json`` must count N decrypted packets (``esp_in_packets``), and the snapshot N
  established IKE SAs and N Child SAs with one packet in each (else the run fails);
- RSS (VmRSS) of the daemon once ready (no peers) and with the N peers up;
- restart: SIGTERM (the daemon DELETEs every IKE SA, the peers answer), a new
  ``ipsecmgr run``, every peer initiates again: the same figures, and the time from
  SIGTERM to all N up again.

The two sides share the machine's 2 cores: the peers' CPU (the same handshake
work) is in the wall time. References of the same run: the same lab, peers and N
against strongSwan 5.9.8's charon as the responder (one connection for the peer
prefix; its first start only; it fakes a NAT, so the peers float to UDP 4500 and
send their probes in UDP, which this run does not count at charon), and the
in-process figure for the same N (``tools/bench/ike_scale.py --one N``: the
daemon's Manager with the datagrams passed in memory, its restart storm).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _lab import cpu_times
from ike_responder import CHARON_OPTS

from ipsecmgr.lab.many_peers import GW, PEER_NET, SERVER, ManyPeersLab, rss_kb
from ipsecmgr.lab.strongswan import PeerOptions, StrongSwanPeer
from ipsecmgr.netns import NetnsPool, is_root
from ipsecmgr.secret import Secret

IKE_SCALE = Path(__file__).resolve().parent / "ike_scale.py"


def cpu(pid: int) -> float:
    user, system = cpu_times(pid)
    return user + system


def one_round(lab: ManyPeersLab, timeout: float) -> dict[str, Any]:
    """All peers initiate; wait for all up and every probe counted; the figures."""
    assert lab.gw is not None
    pid = lab.gw.proc.pid
    cpu0 = cpu(pid)
    up = lab.bring_up(timeout)
    all_up_at = time.monotonic()
    cpu1 = cpu(pid)  # every IKE_AUTH response is out: the handshakes' work is done
    rss = lab.gateway_rss_kb()  # before the snapshots (1.8 KB JSON per peer) grow the heap
    peers = lab.status()
    retransmitted = peers["counters"].get("retransmitted", 0)
    snap = lab.wait_counted(timeout)
    stats = lab.show_statistics()
    if stats["esp"].get("esp_in_packets") != lab.n:
        raise RuntimeError(f"show crypto statistics: esp {stats['esp']} (want {lab.n} in)")
    return {
        "up_s": up["seconds"],
        "probes": up["probes"],
        "retransmitted": retransmitted,
        "retries": peers["retries"],
        "responder_cpu_s": cpu1 - cpu0,
        "ike_sas": sum(1 for sa in snap["ike_sas"] if sa["state"] == "ESTABLISHED"),
        "child_sas": len(snap["child_sas"]),
        "esp_in_packets": stats["esp"]["esp_in_packets"],
        "cookies_sent": stats["ike"].get("cookie_sent", 0),
        "rss_up_kb": rss,
        "rss_after_show_kb": lab.gateway_rss_kb(),
        "all_up_at": all_up_at,
    }


def lab_run(n: int, timeout: float) -> dict[str, Any]:
    with NetnsPool("lsc") as pool, tempfile.TemporaryDirectory(prefix="lab-scale-") as tmp:
        lab = ManyPeersLab(pool, n, Path(tmp))
        try:
            res: dict[str, Any] = {"n": n, "start_s": lab.start_gateway(timeout)}
            res["rss_idle_kb"] = lab.gateway_rss_kb()
            lab.start_driver(timeout)
            res["first"] = one_round(lab, timeout)
            t0 = time.monotonic()
            res["stop_s"] = lab.stop_gateway(timeout)
            res["deleted_seen_by_peers"] = lab.status()["deleted"]
            res["restart_start_s"] = lab.start_gateway(timeout)
            res["rss_idle_restart_kb"] = lab.gateway_rss_kb()
            res["restart"] = one_round(lab, timeout)
            res["restart"]["sigterm_to_all_up_s"] = res["restart"]["all_up_at"] - t0
        finally:
            lab.close()
    return res


def charon_run(n: int, timeout: float) -> dict[str, Any]:
    """The same N peers against strongSwan's charon as the responder: one connection for
    the whole peer range (``remote_addrs`` a prefix, its selector narrowed to each peer),
    the same algorithms, tuned as in tools/bench/ike_responder.py. bookworm's charon
    fakes a NAT (kernel-libipsec only does ESP in UDP), so the peers float to UDP 4500."""
    with NetnsPool("lsw") as pool, tempfile.TemporaryDirectory(prefix="lab-scale-") as tmp:
        lab = ManyPeersLab(pool, n, Path(tmp))
        charon = StrongSwanPeer(lab.gw_ns, Path(tmp) / "charon")
        try:
            opts = PeerOptions(
                ike="aes256gcm16-prfsha256-curve25519", esp="aes256gcm16",
                local_ts=f"{SERVER}/128", remote_ts="dynamic", remote_id="%any",
                log_level=0, charon_opts=CHARON_OPTS,
            )  # fmt: skip
            charon.start(local=GW, remote=PEER_NET, psk=Secret(lab.psk_file.read_bytes()),
                         options=opts, timeout=timeout)  # fmt: skip
            pid = charon.pid
            if pid is None:
                raise RuntimeError("charon did not start")
            res: dict[str, Any] = {"rss_idle_kb": rss_kb(pid)}
            lab.start_driver(timeout)
            cpu0 = cpu(pid)
            up = lab.bring_up(timeout)
            res |= {"up_s": up["seconds"], "up": up["up"], "responder_cpu_s": cpu(pid) - cpu0,
                    "rss_up_kb": rss_kb(pid)}  # fmt: skip
            peers = lab.status()
            res |= {"retransmitted": peers["counters"].get("retransmitted", 0),
                    "retries": peers["retries"]}  # fmt: skip
            stats = charon.swanctl("--stats").stdout
            res["charon_stats"] = " ".join(stats.split())[:200]
        finally:
            lab.close()
            charon.stop()
    return res


def reference(n: int) -> dict[str, Any]:
    """tools/bench/ike_scale.py for the same N, in-process, in a process of its own."""
    cmd = [sys.executable, str(IKE_SCALE), "--one", str(n)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    ref: dict[str, Any] = json.loads(out)
    return ref


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--peers", type=int, default=1000, help="N peers (default 1,000)")
    ap.add_argument("--timeout", type=float, default=300.0, help="bound on every wait, s")
    ap.add_argument("--no-charon", action="store_true", help="skip the charon reference")
    ap.add_argument("--no-reference", action="store_true", help="skip the in-process run")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = ap.parse_args(argv)
    if not is_root():
        print("lab_scale: needs root (network namespaces)", file=sys.stderr)
        return 2
    n = args.peers
    res = lab_run(n, args.timeout)
    if not args.no_charon:
        res["charon"] = charon_run(n, args.timeout)
    if not args.no_reference:
        res["reference"] = reference(n)
    res["loadavg"] = os.getloadavg()
    if args.json:
        print(json.dumps(res))
        return 0
    first, again = res["first"], res["restart"]
    print(f"lab: ipsecmgr run as responder, {n} peers over real UDP (IPv6), "
          f"load average {res['loadavg'][0]:.2f}")  # fmt: skip
    print(f"  start ({n} crypto maps) {res['start_s']:.2f} s; RSS idle "
          f"{res['rss_idle_kb'] / 1024:.1f} MB")  # fmt: skip
    for name, r, start in (("first start", first, None), ("after restart", again, res)):
        per = r["rss_up_kb"] - (res["rss_idle_restart_kb"] if start else res["rss_idle_kb"])
        print(
            f"  {name}: {r['ike_sas']}/{n} IKE SAs, {r['child_sas']} Child SAs, "
            f"{r['esp_in_packets']} probes decrypted; all up in {r['up_s']:.2f} s "
            f"({n / r['up_s']:.0f} handshakes/s), responder CPU {r['responder_cpu_s']:.2f} s "
            f"({r['responder_cpu_s'] / n * 1e6:.0f} µs/handshake), {r['cookies_sent']} COOKIEs, "
            f"{r['retransmitted']} retransmissions and {r['retries']} retries by the peers; "
            f"RSS {r['rss_up_kb'] / 1024:.1f} MB ({per / n:.1f} KB/peer; "
            f"{r['rss_after_show_kb'] / 1024:.1f} MB after the snapshots)"
        )
    print(f"  restart: SIGTERM -> exit {res['stop_s']:.2f} s ({res['deleted_seen_by_peers']} "
          f"DELETEs seen by the peers), start {res['restart_start_s']:.2f} s, SIGTERM -> all "
          f"{n} up {again['sigterm_to_all_up_s']:.2f} s")  # fmt: skip
    if "charon" in res:
        sw = res["charon"]
        print(
            f"reference, strongSwan 5.9.8 charon as the responder (same lab, peers and N, this "
            f"run): {sw['up']}/{n} up in {sw['up_s']:.2f} s ({n / sw['up_s']:.0f} "
            f"handshakes/s), responder CPU {sw['responder_cpu_s']:.2f} s, "
            f"{sw['retransmitted']} retransmissions and {sw['retries']} retries by the peers; RSS "
            f"{sw['rss_idle_kb'] / 1024:.1f} -> {sw['rss_up_kb'] / 1024:.1f} MB "
            f"({(sw['rss_up_kb'] - sw['rss_idle_kb']) / n:.1f} KB/peer)"
        )
        print(
            f"  ours / charon: time for all up x{first['up_s'] / sw['up_s']:.2f}, responder "
            f"CPU x{first['responder_cpu_s'] / sw['responder_cpu_s']:.2f}"
        )
    if "reference" in res:
        ref = res["reference"]
        print(
            f"reference, in-process (tools/bench/ike_scale.py --one {n}, same run): responder "
            f"{ref['first_mean_us']:.0f} µs/handshake (mean of the first 1,000), restart storm "
            f"{ref['storm_up']}/{n} up, responder {ref['storm_responder_s']:.2f} s, wall with "
            f"the initiators {ref['storm_wall_s']:.2f} s; RSS {ref['rss_kb_per_peer']:.1f} "
            f"KB/peer"
        )
        print(
            f"  lab / in-process: responder CPU of the restart storm "
            f"x{again['responder_cpu_s'] / ref['storm_responder_s']:.2f} (the daemon's "
            f"whole process: sockets, event loop, probes; in-process: the Manager's calls)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
