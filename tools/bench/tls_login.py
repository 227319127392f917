"""TACACS+ login time through the TLS path, the IPsec path and directly in clear.

Run (root): .venv/bin/python tools/bench/tls_login.py [--rounds 3] [--logins 30]
            [--seconds 5] [--json]

One lab (tunnel topology). In each round, three set-ups are measured one after
the other from the client host with the same client (the independent
tacacs_plus client, in-process in a loop inside the client namespace, so no
process start is timed):

- clear: no gateway; the lab's TACACS+ server on 203.0.113.49:49 (the reference).
- ipsec: our gateways on both sides (first_packet = "queue"), the same server.
- tls: our gateway on the client host with a [tls_map], the lab's TLS server
  (ipsecmgr.lab.tls_server) on 203.0.113.49:300 (RFC 9887).

Figures per set-up: cold = the first login after the gateway started (IPsec:
includes IKE_SA_INIT + IKE_AUTH; TLS: a full TLS 1.3 handshake), warm = the
median of ``--logins`` further logins (IPsec: SA up; TLS: a resumed TLS 1.3
session, one new TCP + TLS connection per login as pam_tacplus makes), and
transactions/s = PAP logins back to back from one client for ``--seconds``,
and from ``--clients`` client processes at once (summed: one gateway's rate).
Medians over ``--rounds``. Every process and namespace is removed at the end.

Then, on loopback in this process (no lab, quick): the relay's login time with
TLS session resumption (the gateway offers its saved ticket) against a full
TLS 1.3 handshake per login (no ticket saved): what resumption saves per
reconnect. Client, relay and TLS server share this host's CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ipsecmgr.lab import tls_pki  # noqa: E402
from ipsecmgr.lab.gateways import LabGateways  # noqa: E402
from ipsecmgr.lab.tls_lab import start_tls_server, tls_client_config  # noqa: E402
from ipsecmgr.lab.topology import Lab, python_env  # noqa: E402

USER, PASSWORD = "alice", "bench-pw"


def client_loop(server: str, secret_file: str, logins: int, seconds: float) -> None:
    """Inside the client namespace: one cold login, ``logins`` timed logins, then
    back-to-back logins for ``seconds``; prints one JSON line."""
    from ipsecmgr.lab.tacacs_client import query
    from ipsecmgr.secret import Secret, read_secret_file

    secret, _ = read_secret_file(Path(secret_file))
    pw = Secret(PASSWORD.encode())

    def one() -> float:
        t0 = time.perf_counter()
        r = query(server, secret, USER, password=pw, timeout=10)
        if r["status"] != "PASS":
            raise SystemExit(f"login failed: {r}")
        return time.perf_counter() - t0

    cold = one()
    warm = [one() for _ in range(logins)]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and n < 100000:
        one()
        n += 1
    tps = n / (time.perf_counter() - t0)
    print(json.dumps({"cold": cold, "warm": statistics.median(warm or [cold]), "tps": tps}))


def measure(lab: Lab, secret: Path, logins: int, seconds: float) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--client-loop", lab.addresses.server4, str(secret),
           str(logins), str(seconds)]  # fmt: skip
    out = subprocess.run(lab.client.argv(cmd), env=python_env(), capture_output=True, text=True,
                         timeout=120 + seconds, check=False)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"client loop failed: {out.stderr[-2000:]}")
    result: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
    return result


def measure_parallel(lab: Lab, secret: Path, seconds: float, clients: int) -> float:
    """Logins/s summed over ``clients`` client processes running back to back at once."""
    cmd = [sys.executable, __file__, "--client-loop", lab.addresses.server4, str(secret),
           "0", str(seconds)]  # fmt: skip
    procs = [
        subprocess.Popen(lab.client.argv(cmd), env=python_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(clients)
    ]  # fmt: skip
    total = 0.0
    for proc in procs:
        out, err = proc.communicate(timeout=120 + seconds)
        if proc.returncode != 0:
            raise RuntimeError(f"client loop failed: {err[-2000:]}")
        total += json.loads(out.splitlines()[-1])["tps"]
    return total


def run(rounds: int, logins: int, seconds: float, clients: int = 4) -> dict[str, dict[str, float]]:
    figures: dict[str, list[dict[str, float]]] = {"clear": [], "ipsec": [], "tls": []}
    with tempfile.TemporaryDirectory(prefix="ipsecmgr-bench-tls-") as tmp:
        work = Path(tmp)
        secret = work / "tacacs-secret"
        secret.write_bytes(b"bench-tacacs-key")
        secret.chmod(0o600)
        users = work / "users.json"
        users.write_text(json.dumps({USER: {"password": PASSWORD}}))
        with Lab("tunnel") as lab, LabGateways(lab) as gws:
            a = lab.addresses
            tls_pki.write_pki(work, server_ips=[a.server4])
            clear = lab.start_tacacs_server("server", secret_file=secret, users_file=users,
                                            listen=[a.server4])  # fmt: skip
            tls_server = start_tls_server(lab, pki=work, users_file=users)
            conf = work / "client-tls.toml"
            conf.write_text(tls_client_config(
                a, pki=work, secret_file=secret,
                management_interface=lab.interfaces["client.wan"],
                control_socket=gws.dir / "client.sock",
            ))  # fmt: skip

            def both() -> dict[str, float]:
                r = measure(lab, secret, logins, seconds)
                r["tps_n"] = measure_parallel(lab, secret, seconds, clients)
                return r

            for _ in range(rounds):
                figures["clear"].append(both())
                gws.start_both(first_packet="queue")
                figures["ipsec"].append(both())
                gws.stop()
                gws.start("client", config=conf)
                figures["tls"].append(both())
                gws.stop()
            del clear, tls_server
    return {
        name: {k: statistics.median(r[k] for r in rs) for k in ("cold", "warm", "tps", "tps_n")}
        for name, rs in figures.items()
    }


def loopback_resumption(logins: int) -> dict[str, float]:
    """Median login time through the relay on loopback: resumed vs full handshakes."""
    import asyncio
    import ipaddress
    import threading

    from ipsecmgr.lab.tacacs_client import query
    from ipsecmgr.lab.tacacs_server import TacacsServer, User
    from ipsecmgr.lab.tls_server import server_context
    from ipsecmgr.secret import Secret
    from ipsecmgr.tls.config import TlsMap, TlsServer
    from ipsecmgr.tls.proxy import MapProxy

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_loop(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ipsecmgr-bench-tls-") as tmp:
        d = Path(tmp)
        tls_pki.write_pki(d, server_ips=["127.0.0.1"])
        srv = TacacsServer(None, {USER: User(USER, Secret(PASSWORD.encode()), 15, ())})
        ctx = server_context(d / "ca.crt", d / "server.crt", d / "server.key")
        ((_, port),) = on_loop(srv.start(["127.0.0.1"], 0, ssl=ctx))
        m = TlsMap("bench", "bench", (TlsServer(ipaddress.ip_address("127.0.0.1"), port),),
                   d / "ca.crt", d / "client.crt", d / "client.key", Secret(b"k"))  # fmt: skip
        proxy = MapProxy(m, None)

        async def listen() -> asyncio.Server:
            return await asyncio.start_server(proxy.handle, "127.0.0.1", 0)

        lst = on_loop(listen())
        lport = lst.sockets[0].getsockname()[1]
        try:
            for mode in ("resumed", "full"):
                if mode == "full":
                    proxy.pool.save_session = lambda s, c: None  # type: ignore[method-assign]
                    proxy.pool.servers[0].session = None
                times = []
                for _ in range(logins):
                    t0 = time.perf_counter()
                    r = query("127.0.0.1", Secret(b"k"), USER, password=Secret(PASSWORD.encode()),
                              port=lport, timeout=10)  # fmt: skip
                    if r["status"] != "PASS":
                        raise RuntimeError(f"login failed: {r}")
                    times.append(time.perf_counter() - t0)
                out[mode] = statistics.median(times)
            s = proxy.view(0.0)["servers"][0]
            out["resumed_count"], out["full_count"] = s["resumed"], s["handshakes"]
        finally:

            async def close_listener() -> None:
                lst.close()  # asyncio.Server is not thread-safe: closed on its loop

            on_loop(close_listener())
            on_loop(proxy.close())
            on_loop(srv.close())
            on_loop(_cancel_others())
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
    return out


async def _cancel_others() -> None:
    """The server's idle connection handlers: cancelled and awaited, not left pending."""
    import asyncio

    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--logins", type=int, default=30)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=4, help="parallel clients for logins/s")
    p.add_argument("--json", action="store_true")
    p.add_argument("--loopback-only", action="store_true", help="skip the lab part")
    p.add_argument("--client-loop", nargs=4, metavar=("SERVER", "SECRET", "N", "SECONDS"))
    args = p.parse_args(argv)
    if args.client_loop:
        server, secret_file, n, seconds = args.client_loop
        client_loop(server, secret_file, int(n), float(seconds))
        return 0
    try:
        res = (
            {} if args.loopback_only
            else run(args.rounds, args.logins, args.seconds, args.clients)
        )  # fmt: skip
        loop_res = loopback_resumption(max(args.logins, 20))
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps({"lab": res, "loopback": loop_res}, indent=2))
        return 0
    if not res:
        print_loopback(loop_res)
        return 0
    print(f"TACACS+ PAP login from the client host, medians of {args.rounds} rounds "
          f"({args.logins} warm logins, {args.seconds:g} s back to back per round)")  # fmt: skip
    n = args.clients
    print(f"{'path':<8}{'cold ms':>10}{'warm ms':>10}{'logins/s':>10}{f'x{n} /s':>10}"
          "   warm vs clear")  # fmt: skip
    base = res["clear"]["warm"]
    for name in ("clear", "ipsec", "tls"):
        r = res[name]
        print(f"{name:<8}{r['cold'] * 1e3:>10.2f}{r['warm'] * 1e3:>10.2f}{r['tps']:>10.1f}"
              f"{r['tps_n']:>10.1f}   {r['warm'] / base:>5.2f}x")  # fmt: skip
    print_loopback(loop_res)
    return 0


def print_loopback(r: dict[str, float]) -> None:
    print("\nrelay on loopback, one TCP + TLS connection per login (median):")
    print(f"  resumed session (ticket offered): {r['resumed'] * 1e3:7.2f} ms")
    print(f"  full TLS 1.3 handshake:           {r['full'] * 1e3:7.2f} ms"
          f"   resumption saves {1 - r['resumed'] / r['full']:.0%}")  # fmt: skip
    print(f"  (handshakes counted by the relay: {r['resumed_count']:.0f} resumed, "
          f"{r['full_count']:.0f} full)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
