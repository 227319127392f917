"""What the daemon runs for the ``[tls_map]`` sections: routes, listeners, relays.

Order (see :mod:`ipsecmgr.serve`): :meth:`TlsService.setup` after the
gateway's own set-up (its rules and table exist, a stale table was flushed)
and before the event loop; :meth:`start` on the loop (listeners accept);
:meth:`close` on leaving it; :meth:`teardown` before the gateway's.

SIGHUP (:meth:`reload_begin`, then the gateway's own reload, then
:meth:`reload_end`): the captures of the new configuration are installed
*before* the crypto maps change and the ones it no longer has are removed
*after*, so a server moved from a crypto map to a TLS map (or back) is never
unprotected in between: the migration has no clear-text window. A listener
dispatches to the current relay of its map by name, so a changed map keeps its
listening sockets; connections already relayed finish on the relay they began on.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ipsecmgr.config import Config, ConfigError
from ipsecmgr.tls.capture import CaptureRoutes, plain_listener, transparent_listener
from ipsecmgr.tls.config import IPAddress, TlsMap
from ipsecmgr.tls.proxy import MapProxy

log = logging.getLogger(__name__)

# (kind, address, port): kind "transparent" (a captured server address) or "listen".
ListenerKey = tuple[str, IPAddress, int]


@dataclass
class _Listener:
    map: str
    sock: socket.socket
    what: str
    server: asyncio.Server | None = None


def _listener_keys(m: TlsMap) -> Iterator[ListenerKey]:
    if m.transparent:
        for a, port in m.capture:
            yield ("transparent", a, port)
    if m.listen is not None:
        yield ("listen", *m.listen)


def _captures(config: Config) -> set[tuple[IPAddress, int]]:
    return {c for m in config.tls_maps.values() if m.transparent for c in m.capture}


class TlsService:
    def __init__(
        self, config: Config, *, table: int | None, priority: int = 0, mark: int | None
    ) -> None:
        self.config = config
        self.mark = mark
        self.trace: Any = None  # the Tracer while someone traces (set_trace)
        self.proxies = {name: self._proxy(m) for name, m in config.tls_maps.items()}
        self._retired: list[MapProxy] = []  # replaced by a reload, may still relay
        # A table of its own next to the gateway's (TABLE+1); rules at the fwmark
        # rule's priority, after it (see ipsecmgr.tls.capture.CaptureRoutes).
        self.routes = CaptureRoutes(table + 1, priority) if table is not None else None
        self._listeners: dict[ListenerKey, _Listener] = {}
        self._pending: Config | None = None

    def __bool__(self) -> bool:
        return bool(self.proxies)

    def _proxy(self, m: TlsMap) -> MapProxy:
        return MapProxy(m, self.mark, self._trace)

    def set_trace(self, hook: Any) -> None:
        """The Tracer while someone traces (``ipsecmgr trace``), None when none does."""
        self.trace = hook

    def _trace(self, step: str, fields: dict[str, Any]) -> None:
        tr = self.trace
        if tr is not None:
            flow = f"tls:{fields.get('map', '?')}:{fields.get('conn', 0)}"
            tr("tls", step, None, flow=flow, **fields)

    # -- start and stop ---------------------------------------------------------------

    def setup(self) -> None:
        """Rules, routes and bound listening sockets (before the loop: pyroute2 is sync)."""
        if self.routes is not None and self.proxies:
            captures = _captures(self.config)
            # Captures first (one left by a dead daemon is taken over as it is), then
            # the stale ones no longer wanted: no window in which port 49 goes clear.
            self.routes.sync(captures)
            self.routes.flush_stale(a for a, _ in captures)
        for m in self.config.tls_maps.values():
            for key in _listener_keys(m):
                self._listeners[key] = self._bind(m.name, key)

    @staticmethod
    def _bind(name: str, key: ListenerKey) -> _Listener:
        kind, a, port = key
        make = transparent_listener if kind == "transparent" else plain_listener
        try:
            sock = make(a, port)
        except OSError as e:
            # Reported like a configuration error (ipsecmgr run prints it, exit 1).
            raise ConfigError(
                [f"tls_map.{name}: cannot listen on {a}:{port}: {e.strerror or e}"]
            ) from None
        host, bound = sock.getsockname()[:2]
        return _Listener(name, sock, f"{kind} {host}:{bound}")

    def _handler(self, key: ListenerKey) -> Callable[..., Any]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Looked up per connection: a reload may have given the key another relay.
            proxy = self.proxies.get(self._listeners[key].map) if key in self._listeners else None
            if proxy is None:
                writer.close()
                return
            await proxy.handle(reader, writer)

        return handle

    async def start(self) -> None:
        for key, lst in self._listeners.items():
            if lst.server is None:
                lst.server = await asyncio.start_server(self._handler(key), sock=lst.sock)
                log.info("tls map %s: accepting on %s", lst.map, lst.what)

    async def close(self) -> None:
        for lst in self._listeners.values():
            if lst.server is not None:
                lst.server.close()
        for proxy in [*self.proxies.values(), *self._retired]:
            await proxy.close()
        for lst in self._listeners.values():
            if lst.server is not None:
                await lst.server.wait_closed()
                lst.server = None

    def teardown(self) -> None:
        if self.routes is not None and self.config.gateway.on_stop == "clear":
            self.routes.remove()
        elif self.routes is not None and self.routes.routes:
            # on_stop = "block" (#14): the captures stay, with no listener behind them a
            # client's SYN is refused locally (RST) until the next start or 'ipsecmgr down'.
            log.warning("stopped; TLS-protected servers stay captured (refused) until the "
                        "next start or 'ipsecmgr down'")  # fmt: skip
        for lst in self._listeners.values():
            lst.sock.close()
        self._listeners.clear()

    # -- SIGHUP -------------------------------------------------------------------------

    async def reload_begin(self, config: Config) -> None:
        """Install what ``config`` adds (listeners, captures, relays of new or changed
        maps) while everything of the running configuration stays in place. Raises
        (having changed nothing that :meth:`reload_abort` does not undo) if a new
        listener cannot be bound or a route not installed."""
        loop = asyncio.get_running_loop()
        bound: dict[ListenerKey, _Listener] = {}
        try:
            for name, m in config.tls_maps.items():
                for key in _listener_keys(m):
                    if key not in self._listeners and key not in bound:
                        bound[key] = self._bind(name, key)
            if self.routes is not None:
                both = _captures(self.config) | _captures(config)
                # pyroute2's sync API runs an event loop of its own: not on ours.
                await loop.run_in_executor(None, self.routes.sync, both)
        except BaseException:
            for lst in bound.values():
                lst.sock.close()
            raise
        self._pending = config
        self._listeners.update(bound)
        for name, m in config.tls_maps.items():
            old = self.proxies.get(name)
            if old is None or old.map != m:
                if old is not None:
                    self._retired.append(old)
                self.proxies[name] = self._proxy(m)
                log.info("tls map %s: %s", name, "changed" if old else "added")
            for key in _listener_keys(m):
                self._listeners[key].map = name
        await self.start()

    async def reload_abort(self) -> None:
        """After a failed :meth:`reload_begin`: back to the running configuration's routes."""
        self._pending = None
        if self.routes is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self.routes.sync, _captures(self.config))

    async def reload_end(self) -> None:
        """Remove what the new configuration no longer has (after the gateway's reload)."""
        config = self._pending
        if config is None:
            return
        self._pending = None
        keep = {k for m in config.tls_maps.values() for k in _listener_keys(m)}
        for key in [k for k in self._listeners if k not in keep]:
            lst = self._listeners.pop(key)
            if lst.server is not None:
                lst.server.close()
                await lst.server.wait_closed()
            lst.sock.close()
        for name in [n for n in self.proxies if n not in config.tls_maps]:
            self._retired.append(self.proxies.pop(name))
            log.info("tls map %s: removed", name)
        if self.routes is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self.routes.sync, _captures(config))
        self.config = config

    # -- show ---------------------------------------------------------------------------

    def listening(self) -> list[str]:
        return [lst.what for lst in self._listeners.values()]

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "time": time.time(),
            "listening": self.listening(),
            "maps": [p.view(now) for p in self.proxies.values()],
        }

    def handlers(self) -> dict[str, Any]:
        return {"tls": lambda req: self.snapshot()}
