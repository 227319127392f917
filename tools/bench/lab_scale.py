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
work) is in the wall time. The reference of the same run is the in-process figure
for the same N (``tools/bench/ike_scale.py --one N``: the daemon's Manager with the
datagrams passed in memory, its restart storm), not strongSwan: see
docs/performance.md.
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

from ipsecmgr.lab.many_peers import ManyPeersLab
from ipsecmgr.netns import NetnsPool, is_root

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
    cpu1 = cpu(pid)  # every IKE_AUTH response is out: the handshakes' work is done
    snap = lab.wait_counted(timeout)
    stats = lab.show_statistics()
    if stats["esp"].get("esp_in_packets") != lab.n:
        raise RuntimeError(f"show crypto statistics: esp {stats['esp']} (want {lab.n} in)")
    return {
        "up_s": up["seconds"],
        "probes": up["probes"],
        "responder_cpu_s": cpu1 - cpu0,
        "ike_sas": sum(1 for sa in snap["ike_sas"] if sa["state"] == "ESTABLISHED"),
        "child_sas": len(snap["child_sas"]),
        "esp_in_packets": stats["esp"]["esp_in_packets"],
        "cookies_sent": stats["ike"].get("cookie_sent", 0),
        "rss_up_kb": lab.gateway_rss_kb(),
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
            res["restart"]["sigterm_to_all_up_s"] = time.monotonic() - t0
        finally:
            lab.close()
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
    ap.add_argument("--no-reference", action="store_true", help="skip the in-process run")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = ap.parse_args(argv)
    if not is_root():
        print("lab_scale: needs root (network namespaces)", file=sys.stderr)
        return 2
    n = args.peers
    res = lab_run(n, args.timeout)
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
            f"({r['responder_cpu_s'] / n * 1e6:.0f} µs/handshake), {r['cookies_sent']} COOKIEs; "
            f"RSS {r['rss_up_kb'] / 1024:.1f} MB ({per / n:.1f} KB/peer)"
        )
    print(f"  restart: SIGTERM -> exit {res['stop_s']:.2f} s ({res['deleted_seen_by_peers']} "
          f"DELETEs seen by the peers), start {res['restart_start_s']:.2f} s, SIGTERM -> all "
          f"{n} up {again['sigterm_to_all_up_s']:.2f} s")  # fmt: skip
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
