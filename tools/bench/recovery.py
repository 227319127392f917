"""Recovery figures on the lab topology: takeover, dead-peer detection, rekeys.

Run (root): /work/main/.venv/bin/python tools/bench/recovery.py [--runs 3]
            [--rekey-seconds 10] [--json]

One :class:`ipsecmgr.lab.topology.Lab` (tunnel mode) with the TACACS+ server;
our gateway on the client host (the Active, then the Standby: same addresses,
same config, one at a time) and on the gw (responder). Per run:

1. Takeover with INITIAL_CONTACT: a TACACS+ transaction through the Active;
   SIGKILL it; start the Standby; one TACACS+ transaction through it. Figures:
   SIGKILL → first successful transaction (includes starting the Standby's
   process), and the transaction itself (its first packet triggers IKE:
   first_packet = "queue"), against the reference measured in the same run:
   the Standby's own IKE handshake time (its log: IKE_SA_INIT sent → Child SA
   installed) + 100 ms, the issue's target.
2. Takeover without INITIAL_CONTACT: the same, and the time until gw's
   dead-peer detection clears the stale IKE SA (gw's log: "peer ... is dead"),
   against the configured bound interval × 1.1 + timeout × (retries + 1) from
   the last thing heard, at most the SIGKILL (docs/recovery.md).
3. Rekeys under load (once, ``--rekey-seconds``): Child SA lifetime 3 s, IKE
   SA lifetime 5 s on both sides, TACACS+ transactions back to back from one
   client process; figures: transactions done and lost, rekeys done. Target 0 lost.
4. Far-end restart (issue #15 item 6), default timers (DPD 30 s / 10 s / 3):
   a TACACS+ transaction through the tunnel; SIGKILL the gw (the responder,
   the TACACS+ server's side); start it again at once (same config, no SA);
   TACACS+ transactions back to back (5 s timeout each, as the lab client)
   until the first succeeds. Figures: SIGKILL → first successful transaction,
   and its parts from the client's log: the hint (the restarted gw's
   INVALID_SPI, RFC 7296 §1.5) → the probe gives up → the new IKE SA. Twice:
   our gateway as the gw, and strongSwan (``--strongswan-runs``; it sends no
   INVALID_SPI, so the client's "only outgoing ESP" check finds it, §2.4).
   References: the goal (3 s) and what dead-peer detection alone needs with
   these timers (interval × 1.1 + timeout × (retries + 1) = 73 s).

Medians over ``--runs`` for 1, 2 and 4. Exit 0 with the figures (targets are
printed as met / not met), 2 if the setup failed, 130 on an interrupt.
Everything (namespaces, daemons, servers) is removed at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
# First, even when PYTHONPATH has it already: as a script, tools/bench is sys.path[0],
# and its esp.py would shadow the esp package (the client mode runs as a script).
sys.path.insert(0, str(ROOT))

from ipsecmgr.lab.gateways import GatewayProcess, LabGateways  # noqa: E402
from ipsecmgr.lab.topology import Lab, python_env  # noqa: E402
from ipsecmgr.periodic import DPD_SAMPLES  # noqa: E402

USER, PASSWORD = "bench", "bench-recovery-pw"
DPD = {"interval": 1.0, "timeout": 0.5, "retries": 2}
TARGET_MARGIN = 0.100  # s: takeover within one handshake + 100 ms
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


class BenchError(RuntimeError):
    pass


def dpd_bound(dpd: dict[str, float]) -> float:
    """The latest a silent peer is declared dead, from the last packet it sent: an
    idle interval (inbound ESP is looked at every interval/DPD_SAMPLES), then the
    request and its retries ``timeout`` apart, and one more ``timeout``."""
    return dpd["interval"] * (1 + 1 / DPD_SAMPLES) + dpd["timeout"] * (dpd["retries"] + 1)


# --- the TACACS+ client side (runs inside the client namespace) --------------------------


def client_main(argv: Sequence[str]) -> int:
    """``recovery.py client --server S --secret-file F [--seconds N]``: one transaction
    (or back-to-back ones for N seconds); prints one JSON line with wall times."""
    from ipsecmgr.lab.tacacs_client import TacacsClientError, query
    from ipsecmgr.secret import Secret, read_secret_file

    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--secret-file", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--until-ok", action="store_true", help="stop at the first success")
    p.add_argument("--user", default=USER)
    a = p.parse_args(argv)
    secret = read_secret_file(a.secret_file)[0]
    password = Secret(os.environ["BENCH_PASSWORD"].encode())
    results: list[dict[str, Any]] = []
    end = time.time() + a.seconds
    while True:
        t0 = time.time()
        try:
            ok = bool(query(a.server, secret, a.user, password=password, timeout=a.timeout)["ok"])
            err = ""
        except TacacsClientError as exc:
            ok, err = False, str(exc)
        results.append({"start": t0, "end": time.time(), "ok": ok, "error": err})
        if time.time() >= end or (ok and a.until_ok):
            break
    print(json.dumps(results), flush=True)
    return 0


# --- the measurements -----------------------------------------------------------------------


def log_time(line: str) -> float:
    m = _STAMP.match(line)
    if m is None:
        raise BenchError(f"no timestamp in {line!r}")
    return datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def first_line(gw: GatewayProcess, pattern: str, after: float = 0.0) -> float | None:
    rx = re.compile(pattern)
    for line in list(gw.log_lines):
        if rx.search(line) and _STAMP.match(line) and log_time(line) >= after:
            return log_time(line)
    return None


def wait_until(what: str, cond: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)  # polling a condition with a deadline


def run_client(
    lab: Lab, server: str, secret: Path, user: str, password: str,
    seconds: float = 0.0, timeout: float = 5.0, until_ok: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
    """:func:`client_main` in the client namespace (one process, back to back)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "client", "--server", server,
           "--secret-file", str(secret), "--seconds", str(seconds), "--timeout", str(timeout),
           "--user", user] + (["--until-ok"] if until_ok else [])  # fmt: skip
    proc = subprocess.run(
        lab.client.argv(cmd), env=python_env({"BENCH_PASSWORD": password}),
        capture_output=True, text=True, timeout=seconds + timeout + 30, check=False,
    )  # fmt: skip
    try:
        out: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as exc:
        raise BenchError(f"TACACS+ client: {proc.stderr[-1500:]}") from exc
    return out


def restart_figures(
    client: GatewayProcess, results: list[dict[str, Any]], killed: float, ready: float
) -> dict[str, float]:
    """SIGKILL → first successful transaction, and its parts from the client's log."""
    ok = [r for r in results if r["ok"]]
    if not ok:
        raise BenchError(f"no transaction after the restart succeeded: {results[-1]['error']}")
    probe = first_line(client, r"does not know SPI|unanswered for", killed)
    dead = first_line(client, r"no answer .* after the probe started", killed)
    up = first_line(client, r"Child SA \d+ installed", killed)
    out = {
        "kill_to_ok": ok[0]["end"] - killed,
        "restart": ready - killed,
        "ready_to_ok": ok[0]["end"] - ready,
        "failed_attempts": float(len(results) - 1),
    }
    if probe is not None:
        out["kill_to_probe"] = probe - killed
    if probe is not None and dead is not None:
        out["probe_to_dead"] = dead - probe
    if dead is not None and up is not None:
        out["dead_to_new_sa"] = up - dead
    out["invalid_spi_received"] = float(client.counter("ike", "invalid_spi_received"))
    out["silence_probes"] = float(client.counter("ike", "tacacs/silence_probes"))
    out["probe_holds"] = float(client.counter("ike", "tacacs/probe_holds"))
    return out


def strongswan_restart(workdir: Path, runs: int) -> list[dict[str, float]]:
    """Item 4 with strongSwan as the gw (tests/interop/harness.py builds the case)."""
    # By path: tests/ has no __init__.py, and a site-packages "tests" package would win
    spec = importlib.util.spec_from_file_location(
        "interop_harness", ROOT / "tests" / "interop" / "harness.py"
    )
    assert spec is not None and spec.loader is not None
    h = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = h  # (dataclasses look their module up)
    spec.loader.exec_module(h)
    case = h.Case("bench-sw-restart", ours="client")
    interop = h.InteropLab("tunnel", workdir)
    rows = []
    try:
        for _ in range(runs):
            with interop.run(case) as r:
                if r.tacacs()["status"] != "PASS":
                    raise BenchError(f"no transaction through strongSwan: {r.diagnostics()}")
                r.sw.stop(kill=True)
                killed = time.time()
                local, remote, o = h.sw_options(case, r.lab, r.files)
                r.sw.start(local=local, remote=remote, psk=h.psk_for_addr_ids(case), options=o)
                ready = time.time()
                res = run_client(r.lab, r.server_addr, r.files.secret, h.USER, h.PASSWORD,
                                 60.0, 5.0, until_ok=True)  # fmt: skip
                rows.append(restart_figures(r.ours, res, killed, ready))
    finally:
        interop.close()
    return rows


class Bench:
    def __init__(self, lab: Lab, gws: LabGateways, workdir: Path) -> None:
        self.lab, self.gws = lab, gws
        self.secret = workdir / "tacacs-secret"
        self.secret.write_bytes(b"bench-tacacs-key")
        self.secret.chmod(0o600)
        users = workdir / "users.json"
        users.write_text(json.dumps({USER: {"password": PASSWORD}}))
        self.server = lab.start_tacacs_server("server", secret_file=self.secret, users_file=users)

    def transactions(
        self, seconds: float = 0.0, timeout: float = 5.0, until_ok: bool = False
    ) -> list[dict[str, Any]]:
        return run_client(self.lab, self.lab.addresses.server4, self.secret, USER, PASSWORD,
                          seconds, timeout, until_ok)  # fmt: skip

    def start(self, side: str, **options: Any) -> GatewayProcess:
        return self.gws.start(side, first_packet="queue", **options)

    def takeover(self, initial_contact: bool) -> dict[str, float]:
        opts: dict[str, Any] = {"map_options": {"dpd": DPD, "initial_contact": initial_contact}}
        gw = self.start("gw", **opts)
        self.start("client", **opts)
        try:
            if not all(r["ok"] for r in self.transactions()):
                raise BenchError("no transaction through the Active")
            self.gws.gateways.pop("client").kill()
            killed = time.time()
            standby = self.start("client", **opts)
            ready = time.time()
            (res,) = self.transactions()
            if not res["ok"]:
                raise BenchError(f"transaction through the Standby failed: {res['error']}")
            init = first_line(standby, r"sending IKE_SA_INIT request")
            installed = first_line(standby, r"Child SA \d+ installed")
            if init is None or installed is None:
                raise BenchError("no handshake in the Standby's log")
            out = {
                "kill_to_transaction": res["end"] - killed,
                "standby_start": ready - killed,
                "transaction": res["end"] - res["start"],
                "handshake": installed - init,
            }
            if not initial_contact:
                wait_until("gw's DPD", lambda: bool(first_line(gw, r"peer \S+ is dead")), 15)
                dead = first_line(gw, r"peer \S+ is dead")
                assert dead is not None
                out["dpd_detection"] = dead - killed
            elif gw.counter("ike", "replaced_by_initial_contact") != 1:
                raise BenchError("gw did not replace the stale SA on INITIAL_CONTACT")
            return out
        finally:
            self.gws.stop()

    def far_end_restart(self) -> dict[str, float]:
        """Item 4, our gateway as the gw: default timers on both sides."""
        self.start("gw")
        client = self.start("client")
        try:
            if not all(r["ok"] for r in self.transactions()):
                raise BenchError("no transaction before the restart")
            self.gws.gateways.pop("gw").kill()
            killed = time.time()
            gw = self.start("gw")
            ready = time.time()
            res = self.transactions(60.0, until_ok=True)
            out = restart_figures(client, res, killed, ready)
            out["invalid_spi_sent"] = float(gw.counter("ike", "invalid_spi_sent"))
            return out
        finally:
            self.gws.stop()

    def rekeys(self, seconds: float) -> dict[str, float]:
        opts: dict[str, Any] = {
            "ike_options": {"lifetime": 5},
            "ipsec_options": {"lifetime_seconds": 3},
        }
        gw = self.start("gw", **opts)
        client = self.start("client", **opts)
        try:
            results = self.transactions(seconds)
            counters = {
                f"{side.side}_{what}": side.counter("ike", f"tacacs/{what}")
                for side in (client, gw)
                for what in ("child_rekeyed", "ike_rekeyed")
            }
            unknown = sum(s.counter("esp", "esp_unknown_spi") for s in (client, gw))
            return {
                "transactions": len(results),
                "lost": sum(1 for r in results if not r["ok"]),
                "child_rekeys": counters["client_child_rekeyed"],
                "ike_rekeys": counters["client_ike_rekeyed"],
                "esp_unknown_spi": unknown,
            }
        finally:
            self.gws.stop()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rekey-seconds", type=float, default=10.0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--only-restart", action="store_true", help="only item 4")
    p.add_argument("--strongswan-runs", type=int, default=None, help="default: --runs")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("recovery.py needs root (network namespaces)", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="bench-recovery-") as d, Lab("tunnel") as lab, \
                LabGateways(lab) as gws:  # fmt: skip
            bench = Bench(lab, gws, Path(d))
            ic = no_ic = []
            rekey: dict[str, float] = {}
            if not a.only_restart:
                ic = [bench.takeover(True) for _ in range(a.runs)]
                no_ic = [bench.takeover(False) for _ in range(a.runs)]
                rekey = bench.rekeys(a.rekey_seconds)
            ours = [bench.far_end_restart() for _ in range(a.runs)]
        sw_runs = a.runs if a.strongswan_runs is None else a.strongswan_runs
        with tempfile.TemporaryDirectory(prefix="bench-recovery-sw-") as d:
            sw = strongswan_restart(Path(d), sw_runs) if sw_runs > 0 else []
    except BenchError as exc:
        print(f"setup failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    report = summarise(ic, no_ic, rekey) if ic else {}
    report["far_end_restart"] = {"ours": ours, "strongswan": sw}
    if a.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        if ic:
            print_report(report, a.runs)
        print_restart(ours, sw)
    return 0


def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def summarise(
    ic: list[dict[str, float]], no_ic: list[dict[str, float]], rekey: dict[str, float]
) -> dict[str, Any]:
    out: dict[str, Any] = {"rekey": rekey, "dpd": DPD, "dpd_bound": dpd_bound(DPD)}
    for name, rows in (("initial_contact", ic), ("no_initial_contact", no_ic)):
        out[name] = {k: _median(rows, k) for k in rows[0]}
        out[name]["runs"] = rows
        out[name]["target"] = out[name]["handshake"] + TARGET_MARGIN
    return out


def _row(label: str, seconds: float, extra: str = "") -> None:
    print(f"  {label:<56}{seconds * 1000.0:9.1f} ms{extra}")


def print_report(r: dict[str, Any], runs: int) -> None:
    print(f"Recovery on the lab topology (medians of {runs} runs)")
    for name, title in (
        ("initial_contact", "with INITIAL_CONTACT"),
        ("no_initial_contact", "without INITIAL_CONTACT"),
    ):
        t = r[name]
        met = "met" if t["transaction"] < t["target"] else "NOT met"
        print(f"\nTakeover {title}:")
        _row("SIGKILL of the Active -> first TACACS+ transaction OK", t["kill_to_transaction"])
        _row("  of which starting the Standby's process", t["standby_start"])
        _row("first transaction through the Standby (IKE included)", t["transaction"])
        _row("reference: the Standby's IKE handshake + 100 ms", t["target"],
             f"  (handshake {t['handshake'] * 1000.0:.1f} ms)")  # fmt: skip
        print(
            f"  ratio transaction / reference: {t['transaction'] / t['target']:.2f}, target {met}"
        )
        if "dpd_detection" in t:
            b = r["dpd_bound"]
            _row("gw's dead-peer detection of the stale SA after SIGKILL", t["dpd_detection"])
            _row("reference: interval x 1.1 + timeout x (retries + 1)", b, f"  (dpd {r['dpd']})")
            within = "within" if t["dpd_detection"] <= b else "beyond"
            print(f"  ratio detection / bound: {t['dpd_detection'] / b:.2f} ({within} the bound)")
    k = r["rekey"]
    met = "met" if k["lost"] == 0 else "NOT met"
    print(f"\nRekeys under TACACS+ load (Child SA 3 s, IKE SA 5 s): {k['transactions']} "
          f"transactions, {k['child_rekeys']} Child and {k['ike_rekeys']} IKE rekeys")  # fmt: skip
    print(f"  transactions lost: {k['lost']} (reference: 0, target {met}); "
          f"ESP for unknown SPIs: {k['esp_unknown_spi']}")  # fmt: skip


RESTART_GOAL = 3.0  # s, issue #15 item 6: SIGKILL of the far end → first login OK


def print_restart(ours: list[dict[str, float]], sw: list[dict[str, float]]) -> None:
    from ipsecmgr.config import Dpd

    d = Dpd()
    dpd_alone = d.interval * (1 + 1 / DPD_SAMPLES) + d.timeout * (d.retries + 1)
    print(f"\nFar-end restart, default timers (dpd {d.interval:g} s / {d.timeout:g} s / "
          f"{d.retries}), medians")  # fmt: skip
    for title, rows in (("our gateway as the gw", ours), ("strongSwan as the gw", sw)):
        if not rows:
            continue
        print(f"  {title} ({len(rows)} runs):")
        for key, label in (
            ("kill_to_ok", "SIGKILL -> first TACACS+ transaction OK"),
            ("restart", "  of which the gw's restart (process up)"),
            ("ready_to_ok", "  and from the gw up to that transaction"),
            ("kill_to_probe", "SIGKILL -> the client starts its probe"),
            ("probe_to_dead", "probe -> peer declared dead"),
            ("dead_to_new_sa", "dead -> new IKE and Child SA"),
        ):
            vals = [r[key] for r in rows if key in r]
            if vals:
                _row(label, statistics.median(vals),
                     f"  (min {min(vals) * 1000:.0f}, max {max(vals) * 1000:.0f} ms)")  # fmt: skip
        how = ("INVALID_SPI hints received" if rows[0]["invalid_spi_received"] else
               "no INVALID_SPI received; silence probes")  # fmt: skip
        print(f"    trigger: {how}: {[int(r['invalid_spi_received']) for r in rows]} / "
              f"{[int(r['silence_probes']) for r in rows]}; probes that held the client's "
              f"packets: {[int(r.get('probe_holds', 0)) for r in rows]}; failed attempts "
              f"before the first OK: {[int(r['failed_attempts']) for r in rows]}")  # fmt: skip
        k = statistics.median(r["kill_to_ok"] for r in rows)
        met = "met" if k <= RESTART_GOAL else "NOT met"
        print(f"    reference: goal {RESTART_GOAL:.1f} s ({met}, ratio {k / RESTART_GOAL:.2f}); "
              f"dead-peer detection alone: up to {dpd_alone:.0f} s")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
