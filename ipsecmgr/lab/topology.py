"""The lab network: namespaces, links, addresses and routes for the demo and the tests.

Tunnel mode (the reference's first example)::

      client                      wan (bridge br0)                gw                server
    198.51.100.1/24 ───────────────────┬─────────────── 198.51.100.2/24
    lo 192.0.2.1/32 (src_ip)           │                203.0.113.1/24 ───── 203.0.113.49/24
                                       │                (forwards)           (TACACS+ server)
                                    bypass
                                 198.51.100.3/24 (a second TACACS+ server, reached in clear)

IPv6 mirrors it: WAN 2001:db8:100::/64 (::1 client, ::2 gw, ::3 bypass),
src_ip 2001:db8:2::1/128, server LAN 2001:db8:113::/64 (::1 gw, ::49 server).

Transport mode (the reference's second example): the responder runs on the
TACACS+ server host itself, so ``gw`` and ``server`` are one namespace at
198.51.100.2 / 2001:db8:100::2, and there is no src_ip.

Before any gateway runs, the client reaches the server *in clear* (routes via
gw, sourced from src_ip); the daemon then routes the protected destinations
into its TUN. ``bypass`` is reached directly on the WAN (the management
interface) and no ACL matches it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ipsecmgr.netns import Netns, NetnsPool

_PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
ROLES = ("client", "wan", "gw", "server", "bypass")


@dataclass(frozen=True)
class LabAddresses:
    """Every address of the lab (documentation ranges only)."""

    mode: str
    client_wan4: str = "198.51.100.1"
    client_wan6: str = "2001:db8:100::1"
    gw_wan4: str = "198.51.100.2"
    gw_wan6: str = "2001:db8:100::2"
    bypass4: str = "198.51.100.3"
    bypass6: str = "2001:db8:100::3"
    wan_prefix4: int = 24
    wan_prefix6: int = 64
    src_ip4: str | None = "192.0.2.1"
    src_ip6: str | None = "2001:db8:2::1"
    gw_lan4: str | None = "203.0.113.1"
    gw_lan6: str | None = "2001:db8:113::1"
    server4: str = "203.0.113.49"
    server6: str = "2001:db8:113::49"
    lan4: str | None = "203.0.113.0/24"
    lan6: str | None = "2001:db8:113::/64"

    @classmethod
    def for_mode(cls, mode: str) -> LabAddresses:
        if mode == "tunnel":
            return cls(mode)
        if mode == "transport":
            return cls(
                mode, src_ip4=None, src_ip6=None, gw_lan4=None, gw_lan6=None,
                server4="198.51.100.2", server6="2001:db8:100::2", lan4=None, lan6=None,
            )  # fmt: skip
        raise ValueError(f"mode must be 'tunnel' or 'transport', not {mode!r}")


class LabProcess:
    """A process started in a lab namespace whose stdout is JSON lines.

    A reader thread collects the lines; :meth:`wait_for` blocks until one
    matches (no sleeping), :meth:`events` returns all seen so far.
    """

    def __init__(self, proc: subprocess.Popen[str], name: str) -> None:
        self.proc = proc
        self.name = name
        self._events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "text", "line": line.rstrip("\n")}
            with self._cond:
                self._events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._events.append({"event": "exit"})
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self._events if kind is None or e.get("event") == kind]

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """The first event matching ``predicate``; raise TimeoutError (with stderr) if none."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self._events:
                    if predicate(e):
                        return e
                if any(e.get("event") == "exit" for e in self._events):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        raise TimeoutError(f"{self.name}: no matching event; stderr: {self._stderr_tail()}")

    def _stderr_tail(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(still running)"
        return self.proc.stderr.read()[-2000:]

    def transactions(self) -> list[dict[str, Any]]:
        return self.events("transaction")


def _is_listening(addr: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == "listening" and e.get("address") == addr


def python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for ``python -m ipsecmgr...`` in a namespace: this tree importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


class Lab:
    """Builds the lab topology on a :class:`NetnsPool`; ``close()`` removes all of it."""

    def __init__(
        self, mode: str = "tunnel", *, pool: NetnsPool | None = None, mtu: int | None = None
    ) -> None:
        self.addresses = LabAddresses.for_mode(mode)
        self.mode = mode
        self._own_pool = pool is None
        self.pool = pool if pool is not None else NetnsPool("lab")
        self.mtu = mtu
        self._ns: dict[str, Netns] = {}
        self.interfaces: dict[str, str] = {}  # "client.wan" -> interface name, etc.

    def __enter__(self) -> Lab:
        return self.build()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ accessors

    def ns(self, role: str) -> Netns:
        if role == "server" and self.mode == "transport":
            role = "gw"
        return self._ns[role]

    @property
    def client(self) -> Netns:
        return self.ns("client")

    @property
    def gw(self) -> Netns:
        return self.ns("gw")

    @property
    def server(self) -> Netns:
        return self.ns("server")

    @property
    def bypass(self) -> Netns:
        return self.ns("bypass")

    @property
    def wan(self) -> Netns:
        return self.ns("wan")

    def describe(self) -> dict[str, Any]:
        """JSON-able description: namespaces, interfaces, addresses (see :func:`teardown`)."""
        return {
            "tag": self.pool.tag,
            "mode": self.mode,
            "namespaces": {r: self.ns(r).name for r in ROLES if r in self._ns or r == "server"},
            "interfaces": dict(self.interfaces),
            "addresses": asdict(self.addresses),
        }

    # ------------------------------------------------------------ build

    def build(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        a = self.addresses
        roles = ["client", "wan", "gw", "bypass"] + (["server"] if self.mode == "tunnel" else [])
        for role in roles:
            self._ns[role] = self.pool.add(role)
        wan = self._ns["wan"]
        wan.ip("link", "add", "br0", "type", "bridge", "forward_delay", "0")
        wan.ip("link", "set", "br0", "up")
        w4, w6 = a.wan_prefix4, a.wan_prefix6
        for role, v4, v6 in (
            ("client", a.client_wan4, a.client_wan6),
            ("gw", a.gw_wan4, a.gw_wan6),
            ("bypass", a.bypass4, a.bypass6),
        ):
            link = self.pool.link(
                self._ns[role], wan, [f"{v4}/{w4}", f"{v6}/{w6}"], [], mtu=self.mtu
            )
            wan.ip("link", "set", link.b_if, "master", "br0")
            self.interfaces[f"{role}.wan"] = link.a_if
        client, gw = self._ns["client"], self._ns["gw"]
        if self.mode == "tunnel":
            assert a.src_ip4 and a.src_ip6 and a.gw_lan4 and a.gw_lan6 and a.lan4 and a.lan6
            server = self._ns["server"]
            link = self.pool.link(gw, server, [f"{a.gw_lan4}/24", f"{a.gw_lan6}/64"],
                                  [f"{a.server4}/24", f"{a.server6}/64"], mtu=self.mtu)  # fmt: skip
            self.interfaces["gw.lan"] = link.a_if
            self.interfaces["server.lan"] = link.b_if
            # This kernel has no dummy links: the inner source lives on lo (/32, /128).
            client.add_address("lo", f"{a.src_ip4}/32")
            client.add_address("lo", f"{a.src_ip6}/128")
            # Clear path before any gateway runs: server LAN via gw, from src_ip.
            client.ip("route", "add", a.lan4, "via", a.gw_wan4, "src", a.src_ip4)
            client.ip("-6", "route", "add", a.lan6, "via", a.gw_wan6, "src", a.src_ip6)
            gw.ip("route", "add", f"{a.src_ip4}/32", "via", a.client_wan4)
            gw.ip("-6", "route", "add", f"{a.src_ip6}/128", "via", a.client_wan6)
            server.ip("route", "add", "default", "via", a.gw_lan4)
            server.ip("-6", "route", "add", "default", "via", a.gw_lan6)
            for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
                gw.run(["sysctl", "-qw", f"{key}=1"])

    def close(self) -> None:
        """Stop every lab process and delete the namespaces.

        With a pool passed in, the pool's owner does that (when it closes the pool).
        """
        if self._own_pool:
            self.pool.close()
            self._ns.clear()

    # ------------------------------------------------------------ impairment

    def set_loss(self, role: str, percent: int, *, ifname: str | None = None) -> None:
        """Drop ``percent`` % of the packets ``role`` sends on its WAN link (0 removes it).

        This kernel has no netem; nftables' ``numgen random`` does the same for
        loss (DESIGN: loss injection). Applies to IPv4 and IPv6 alike.
        """
        if not 0 <= percent <= 100:
            raise ValueError("percent must be 0..100")
        ns = self.ns(role)
        ifname = ifname or self.interfaces[f"{role}.wan"]
        ns.run(["nft", "delete", "table", "inet", "ipsm_lab_loss"], check=False)
        if percent == 0:
            return
        # numgen yields 0..99, so "< 100" is out of its range: 100 % is a plain drop.
        match = "" if percent == 100 else f"numgen random mod 100 < {percent} "
        rule = f'oifname "{ifname}" {match}drop'
        rules = (
            "table inet ipsm_lab_loss {\n"
            f"  chain lab_out {{ type filter hook output priority 0; {rule}; }}\n"
            f"  chain lab_forward {{ type filter hook forward priority 0; {rule}; }}\n"
            "}\n"
        )
        proc = subprocess.run(ns.argv(["nft", "-f", "-"]), input=rules, capture_output=True,
                              text=True, check=False)  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"nft in {ns.name}: {proc.stderr.strip()}")

    # ------------------------------------------------------------ TACACS+

    def start_tacacs_server(
        self,
        role: str,
        *,
        secret_file: Path,
        users_file: Path,
        listen: Sequence[str] | None = None,
        port: int = 49,
        timeout: float = 10.0,
    ) -> LabProcess:
        """Start ``ipsecmgr.lab.tacacs_server`` in ``role``'s namespace; return once it listens."""
        a = self.addresses
        if listen is None:
            listen = [a.bypass4, a.bypass6] if role == "bypass" else [a.server4, a.server6]
        cmd = [sys.executable, "-m", "ipsecmgr.lab.tacacs_server", "--port", str(port),
               "--secret-file", str(secret_file), "--users-file", str(users_file)]  # fmt: skip
        for addr in listen:
            cmd += ["--listen", addr]
        proc = LabProcess(self.ns(role).popen(cmd, env=python_env()), f"tacacs-server@{role}")
        for addr in listen:
            proc.wait_for(_is_listening(addr), timeout)
        return proc

    def tacacs_query(
        self,
        role: str,
        *,
        server: str,
        secret_file: Path,
        user: str,
        password: str | None = None,
        action: str = "authenticate",
        authen_type: str = "pap",
        args: Sequence[str] = (),
        acct_flag: str = "start",
        port: int = 49,
        timeout: float = 5.0,
    ) -> dict[str, Any]:
        """Run ``ipsecmgr.lab.tacacs_client`` in ``role``'s namespace; return its JSON line.

        The password travels in the environment, never in the argument list.
        """
        cmd = [sys.executable, "-m", "ipsecmgr.lab.tacacs_client", "--server", server,
               "--port", str(port), "--secret-file", str(secret_file), "--user", user,
               "--action", action, "--authen-type", authen_type, "--acct-flag", acct_flag,
               "--timeout", str(timeout)]  # fmt: skip
        extra = {}
        if password is not None:
            extra["IPSECMGR_LAB_PASSWORD"] = password
            cmd += ["--password-env", "IPSECMGR_LAB_PASSWORD"]
        for arg in args:
            cmd += ["--arg", arg]
        proc = subprocess.run(
            self.ns(role).argv(cmd), env=python_env(extra), capture_output=True, text=True,
            timeout=timeout + 20, check=False,
        )  # fmt: skip
        lines = proc.stdout.strip().splitlines()
        if not lines:
            raise RuntimeError(
                f"tacacs_client printed nothing (exit {proc.returncode}): {proc.stderr}"
            )
        result: dict[str, Any] = json.loads(lines[-1])
        result["exit_code"] = proc.returncode
        return result


def teardown(description: Mapping[str, Any]) -> list[str]:
    """Remove a lab that outlived its process (``ipsecmgr lab down``), from :meth:`Lab.describe`.

    Only namespaces named ``<tag>-<role>`` by the description are touched: the
    processes still running in them are killed by PID, then they are deleted.
    Returns the names removed.
    """
    tag = str(description["tag"])
    existing = set(
        line.split()[0]
        for line in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True
        ).stdout.splitlines()
        if line.strip()
    )
    removed: list[str] = []
    for name in sorted(set(description["namespaces"].values())):
        if not name.startswith(f"{tag}-") or name not in existing:
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        removed.append(name)
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ipsecmgr.lab.topology [tunnel|transport]``: print the address plan."""
    args = list(sys.argv[1:] if argv is None else argv)
    mode = args[0] if args else "tunnel"
    print(json.dumps(asdict(LabAddresses.for_mode(mode)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Lab", "LabAddresses", "LabProcess", "python_env"]
