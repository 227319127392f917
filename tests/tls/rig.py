"""Helpers for the TLS protection tests: a throw-away PKI (with a second CA and
an expired certificate), and an asyncio loop in a thread running TLS TACACS+
servers and the gateway's relay on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from ipsecmgr.lab.tacacs_server import TacacsServer, User
from ipsecmgr.lab.tls_server import server_context
from ipsecmgr.secret import Secret
from ipsecmgr.tls.config import TlsMap, TlsServer
from ipsecmgr.tls.proxy import MapProxy

DOWNSTREAM = b"downstream-secret"
PASSWORD = "alice-pw"
T = TypeVar("T")


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    server_crt: Path
    server_key: Path
    client_crt: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing the server presents
    expired_crt: Path
    expired_key: Path
    wrong_name_crt: Path
    wrong_name_key: Path


def users() -> dict[str, User]:
    return {"alice": User("alice", Secret(PASSWORD.encode()), 15, ("priv-lvl=15",))}


class LoopThread:
    """An asyncio loop in a thread; :meth:`run` runs a coroutine on it and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def _c() -> T:
            return fn()

        return self.run(_c())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def tls_map(pki: Pki, servers: list[tuple[str, int]], **kw: Any) -> TlsMap:
    m = TlsMap(
        "b", "tls-b",
        tuple(TlsServer(ipaddress.ip_address(h), p, kw.pop("name", None)) for h, p in servers),
        pki.ca, pki.client_crt, pki.client_key, Secret(DOWNSTREAM),
        listen=(ipaddress.ip_address("127.0.0.1"), 0), transparent=False,
        connect_timeout=2.0, handshake_timeout=3.0, hold_down=30.0,
    )  # fmt: skip
    return replace(m, **kw)


class Rig:
    """TLS TACACS+ servers and one relay on loopback, on a :class:`LoopThread`."""

    def __init__(self, lt: LoopThread) -> None:
        self.lt = lt
        self.servers: list[TacacsServer] = []
        self._listeners: list[asyncio.Server] = []
        self.proxy: MapProxy | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = 0

    def tls_server(
        self, pki: Pki, *, cert: Path | None = None, key: Path | None = None,
        tls12_only: bool = False,
    ) -> tuple[TacacsServer, int]:  # fmt: skip
        ctx = server_context(pki.ca, cert or pki.server_crt, key or pki.server_key,
                             tls12_only=tls12_only)  # fmt: skip
        srv = TacacsServer(None, users())
        bound = self.lt.run(srv.start(["127.0.0.1"], 0, ssl=ctx))
        self.servers.append(srv)
        return srv, bound[0][1]

    def openssl_tls12_server(self, pki: Pki) -> int:
        """``openssl s_server`` limited to TLS 1.2: a real server that answers a
        TLS 1.3-only ClientHello with a protocol_version alert."""
        port = free_port()
        proc = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_2", "-cert",
             str(pki.server_crt), "-key", str(pki.server_key), "-CAfile", str(pki.ca),
             "-Verify", "1", "-quiet"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)  # polling for the listener, bounded by the deadline
        else:
            raise RuntimeError("openssl s_server did not start")
        return port

    def start_proxy(self, m: TlsMap) -> MapProxy:
        async def go() -> tuple[MapProxy, asyncio.Server]:
            proxy = MapProxy(m, None)
            srv = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
            return proxy, srv

        self.proxy, lst = self.lt.run(go())
        self._listeners.append(lst)
        self.port = lst.sockets[0].getsockname()[1]
        return self.proxy

    def close(self) -> None:
        async def go() -> None:
            for lst in self._listeners:
                lst.close()
            if self.proxy is not None:
                await self.proxy.close()
            for s in self.servers:
                await s.close()

        self.lt.run(go())
        for p in self.procs:
            p.kill()
            p.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
