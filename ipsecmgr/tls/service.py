"""What the daemon runs for the ``[tls_map]`` sections: routes, listeners, relays.

Order (see :mod:`ipsecmgr.daemon`): :meth:`TlsService.setup` after the
gateway's own set-up (its rules and table exist, a stale table was flushed)
and before the event loop; :meth:`start` on the loop (listeners accept);
:meth:`close` on leaving it; :meth:`teardown` before the gateway's.

Tracing: the service is one of the :class:`ipsecmgr.trace.Tracer`'s targets;
while someone traces, every step of a TLS-protected flow (capture, classify,
upstream chosen, TLS up, request, response, refusals) is an event with step
``tls`` and flow ``tls:<map>:<connection number>``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from ipsecmgr.config import Config, ConfigError
from ipsecmgr.tls.capture import CaptureRoutes, plain_listener, transparent_listener
from ipsecmgr.tls.config import IPAddress
from ipsecmgr.tls.proxy import MapProxy

log = logging.getLogger(__name__)


class TlsService:
    def __init__(
        self, config: Config, *, table: int | None, priority: int = 0, mark: int | None
    ) -> None:
        self.config = config
        self.trace: Any = None  # set by the Tracer while someone traces
        self.proxies = {name: MapProxy(m, mark, self._trace) for name, m in config.tls_maps.items()}
        # A table of its own next to the gateway's (TABLE+1); rules at the fwmark
        # rule's priority, after it (see ipsecmgr.tls.capture.CaptureRoutes).
        sources = config.gateway.local_addresses
        self.routes = CaptureRoutes(table + 1, priority, sources) if table is not None else None
        self._socks: list[tuple[MapProxy, socket.socket, str]] = []
        self._servers: list[asyncio.Server] = []

    def __bool__(self) -> bool:
        return bool(self.proxies)

    def _trace(self, step: str, fields: dict[str, Any]) -> None:
        tr = self.trace
        if tr is not None:
            flow = f"tls:{fields.get('map', '?')}:{fields.get('conn', 0)}"
            tr("tls", step, None, flow=flow, **fields)

    def setup(self) -> None:
        """Local routes and bound listening sockets (before the loop; pyroute2 is sync)."""
        if self.routes is not None and self.proxies:
            self.routes.flush_stale()
        for proxy in self.proxies.values():
            m = proxy.map
            if m.transparent:
                if self.routes is not None:
                    self.routes.add(m.capture)
                for a, port in m.capture:
                    s = self._bind(m.name, transparent_listener, a, port)
                    self._socks.append((proxy, s, f"transparent {a}:{port}"))
            if m.listen is not None:
                s = self._bind(m.name, plain_listener, *m.listen)
                host, port = s.getsockname()[:2]
                self._socks.append((proxy, s, f"listen {host}:{port}"))

    @staticmethod
    def _bind(
        name: str, make: Callable[[IPAddress, int], socket.socket], a: IPAddress, port: int
    ) -> socket.socket:
        try:
            return make(a, port)
        except OSError as e:
            # Reported like a configuration error (ipsecmgr run prints it, exit 1).
            raise ConfigError(
                [f"tls_map.{name}: cannot listen on {a}:{port}: {e.strerror or e}"]
            ) from None

    async def start(self) -> None:
        for proxy, sock, what in self._socks:
            srv = await asyncio.start_server(proxy.handle, sock=sock)
            self._servers.append(srv)
            log.info("tls map %s: accepting on %s", proxy.map.name, what)

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
        for proxy in self.proxies.values():
            await proxy.close()
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()

    def teardown(self) -> None:
        if self.routes is not None:
            self.routes.remove()
        for _proxy, sock, _what in self._socks:
            sock.close()
        self._socks.clear()

    def listening(self) -> list[str]:
        return [what for _p, _s, what in self._socks]

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "time": time.time(),
            "listening": self.listening(),
            "maps": [p.view(now) for p in self.proxies.values()],
        }

    def handlers(self) -> dict[str, Any]:
        return {"tls": lambda req: self.snapshot()}
