"""Fail-closed kill loop on the lab topology (issue #14; figures in docs/security.md).

Run (root): .venv/bin/python tools/bench/failclosed.py [--kills 200] [--seed N]
            [--pcap FILE] [--json]

One :class:`ipsecmgr.lab.topology.Lab` (tunnel mode, IPv4) with the TACACS+
server and the bypass server; our gateway on gw (responder) for the whole run
and on the client host, which is SIGKILLed ``--kills`` times at random moments
(:mod:`ipsecmgr.lab.killloop`: half 0-0.4 s after "ready", i.e. mid-handshake;
half 0-2.5 s after a successful login, with Child SA / IKE SA lifetimes of 2 s /
3 s, so often mid-rekey) and restarted at once, while two threads log in back to
back. A capture of clear TCP port 49 on the client's WAN runs throughout.

Prints: clear segments to/from the protected server (the property: 0), the same
for the bypass server (the positive control: every fifth login goes there in
clear), logins done/passed, and the distribution of recovery times (restart
"ready" -> end of the first successful login after it) next to the
restarted daemon's own IKE handshake time measured in the same run (the
reference: the issue's bound is one handshake + 1 s). Exit 0 when no protected
segment was seen in clear, 1 otherwise, 2 if the setup failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ipsecmgr.lab.gateways import LabGateways  # noqa: E402
from ipsecmgr.lab.killloop import OPTIONS, kill_loop  # noqa: E402
from ipsecmgr.lab.topology import Lab  # noqa: E402

USER, PASSWORD = "bench", "bench-failclosed-pw"


def quantiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    if not xs:
        return {}

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, int(p * len(xs)))]

    return {"n": len(xs), "min": xs[0], "p50": statistics.median(xs), "p90": q(0.9),
            "p99": q(0.99), "max": xs[-1]}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=200)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--pcap", type=Path, default=None, help="keep the capture here")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    seed = a.seed if a.seed is not None else int(time.time())
    with tempfile.TemporaryDirectory(prefix="ipsecmgr-failclosed-") as tmp:
        work = Path(tmp)
        secret = work / "tacacs-secret"
        secret.write_bytes(b"bench-tacacs-key")
        secret.chmod(0o600)
        users = work / "users.json"
        users.write_text(json.dumps({USER: {"password": PASSWORD}}))
        try:
            with Lab("tunnel") as lab, LabGateways(lab) as gws:
                for role in ("server", "bypass"):
                    lab.start_tacacs_server(role, secret_file=secret, users_file=users)
                gws.start("gw", **OPTIONS)

                def login(server: str, timeout: float) -> dict[str, Any]:
                    return lab.tacacs_query(
                        "client", server=server, secret_file=secret, user=USER,
                        password=PASSWORD, timeout=timeout,
                    )  # fmt: skip

                res = kill_loop(lab, gws, login, kills=a.kills, seed=seed,
                                pcap=a.pcap or work / "wan.pcap")  # fmt: skip
        except RuntimeError as exc:
            print(f"failclosed: {exc}", file=sys.stderr)
            return 2
    rec = quantiles(res.recoveries())
    hs = quantiles([c.handshake for c in res.cycles if c.handshake is not None])
    over = [c.recovery - c.handshake for c in res.cycles
            if c.recovery is not None and c.handshake is not None]  # fmt: skip
    out = {
        "kills": len(res.cycles),
        "seed": seed,
        "killed_mid_handshake_window": sum(c.early for c in res.cycles),
        "killed_with_rekey_in_flight": sum(c.rekey_in_flight for c in res.cycles),
        "killed_after_a_rekey": sum(c.rekeyed for c in res.cycles),
        "clear_segments_protected": res.clear_protected,
        "clear_segments_bypass": res.clear_bypass,
        "logins": res.logins,
        "logins_passed_protected": res.passed,
        "recovery_s": rec,
        "handshake_s": hs,
        "recovery_minus_handshake_s": quantiles(over),
        "wall_s": res.wall,
    }
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            if isinstance(v, dict):
                v = "  ".join(f"{kk} {vv:.3f}" if isinstance(vv, float) else f"{kk} {vv}"
                              for kk, vv in v.items())  # fmt: skip
            elif isinstance(v, float):
                v = f"{v:.1f}"
            print(f"{k:34} {v}")
    return 0 if res.clear_protected == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
