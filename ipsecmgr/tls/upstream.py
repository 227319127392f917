"""The upstream servers of one TLS map: priority order, hold-down, saved sessions.

StarOS's ``server priority N``: the servers are tried in configuration order.
A server whose TCP connect or TLS handshake fails is held down (skipped) for
``hold_down`` seconds, doubled for each further consecutive failure up to
``hold_down_max``; a success clears its failures. When every server is held
down, all are still tried in priority order: refusing without trying would turn
a short outage of all servers into a longer one, and trying costs at most the
connect timeouts the operator configured.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ipsecmgr.peers import HoldDown
from ipsecmgr.tls.config import TlsMap, TlsServer
from ipsecmgr.tls.tlsconn import TlsConn, TlsError, open_tls

Trace = Callable[[str, dict[str, Any]], None]


class AllServersDown(ConnectionError):
    """No upstream server could be reached; the client's flow is refused (fail closed)."""


@dataclass
class ServerState:
    server: TlsServer
    priority: int
    state: str = "unknown"  # unknown | up | held-down
    last_error: str = ""
    last_error_at: float | None = None  # wall clock
    connections: int = 0  # TLS connections established (full + resumed)
    active: int = 0
    handshakes: int = 0  # full handshakes
    resumed: int = 0  # resumed handshakes (session ticket accepted)
    failures: int = 0  # connect/handshake/relay failures, total
    # Skipped after a failure, doubled per failure in a row (the crypto maps' own
    # mechanism, ipsecmgr.peers.HoldDown; times on the pool's monotonic clock)
    hold: HoldDown = field(default_factory=HoldDown)
    requests: int = 0
    responses: int = 0
    session: ssl.SSLSession | None = field(default=None, repr=False)

    def held(self, now: float) -> bool:
        return self.hold.held(now)

    def view(self, now: float) -> dict[str, Any]:
        state = "held-down" if self.held(now) else self.state
        return {
            "priority": self.priority,
            "server": str(self.server),
            "identity": self.server.identity,
            "state": state,
            "hold_down_left": self.hold.left(now) or 0.0,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "connections": self.connections,
            "active": self.active,
            "handshakes": self.handshakes,
            "resumed": self.resumed,
            "failures": self.failures,
            "requests": self.requests,
            "responses": self.responses,
        }


class UpstreamPool:
    def __init__(
        self,
        m: TlsMap,
        ctx: ssl.SSLContext,
        mark: int | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.map = m
        self.ctx = ctx
        self.mark = mark
        self.clock = clock
        self.servers = [
            ServerState(s, i + 1, hold=HoldDown(m.hold_down, m.hold_down_max))
            for i, s in enumerate(m.servers)
        ]

    def order(self) -> list[ServerState]:
        """Servers to try, in priority order: those not held down, else all."""
        now = self.clock()
        ready = [s for s in self.servers if not s.held(now)]
        return ready or list(self.servers)

    def failed(self, s: ServerState, reason: str) -> None:
        s.failures += 1
        s.hold.fail(self.clock(), reason)
        s.state = "down"
        s.last_error = reason
        s.last_error_at = time.time()
        s.session = None  # do not offer a ticket a failing server may have lost

    async def connect(
        self, trace: Trace, exclude: set[int] | None = None
    ) -> tuple[ServerState, TlsConn]:
        """The first server (in :meth:`order`, not in ``exclude``) that completes a
        TLS 1.3 handshake; raise :class:`AllServersDown` naming each failure."""
        errors = []
        for s in self.order():
            if exclude and s.priority in exclude:
                continue
            trace("upstream-chosen", {"server": str(s.server), "priority": s.priority})
            try:
                conn = await open_tls(
                    str(s.server.address), s.server.port, self.ctx, s.server.identity,
                    s.session, mark=self.mark, connect_timeout=self.map.connect_timeout,
                    handshake_timeout=self.map.handshake_timeout,
                )  # fmt: skip
            except TlsError as e:
                self.failed(s, str(e))
                trace("upstream-failed", {"server": str(s.server), "error": str(e)})
                errors.append(f"{s.server}: {e}")
                continue
            s.state = "up"
            s.hold.reset()
            s.connections += 1
            if conn.session_reused:
                s.resumed += 1
            else:
                s.handshakes += 1
            trace(
                "tls-up",
                {"server": str(s.server), "version": conn.version, "resumed": conn.session_reused},
            )
            return s, conn
        if not errors:
            errors.append("no untried server left" if exclude else "no server configured")
        raise AllServersDown("; ".join(errors))

    def save_session(self, s: ServerState, conn: TlsConn) -> None:
        sess = conn.session
        if sess is not None and sess.has_ticket:
            s.session = sess
