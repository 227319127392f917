"""The relay: legacy TACACS+ client on one side, TLS 1.3 upstream on the other.

Per client connection (RFC 8907 client, obfuscated with the downstream secret):

1. read a packet; the UNENCRYPTED flag must be clear (a secret is configured,
   RFC 8907 §4.5), the body is de-obfuscated with the downstream secret and
   must decode as the body its type and sequence number announce (that is the
   only check a TACACS+ secret allows: a wrong secret decodes to noise);
2. forward header ‖ clear body with the UNENCRYPTED flag set over TLS (RFC 9887
   §4: obfuscation is not applied inside TLS);
3. read the server's reply (its UNENCRYPTED flag must be set), obfuscate it
   with the downstream secret, clear the flag, send it to the client.

TACACS+ is strictly request/response, so the relay alternates. The upstream
connection is opened at the client's first packet. When the upstream fails
before answering a session's first packet (seq_no 1), the packet is sent to the
next server: the client sees no failure when any server is reachable. A failure
later in a multi-packet session ends the client's connection (its state lives
in the server that failed). When no server can be reached the client's
connection is closed: nothing is ever sent anywhere in clear (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from ipsecmgr.lab import tacacs as t
from ipsecmgr.tls.config import TlsMap
from ipsecmgr.tls.tlsconn import TlsConn, TlsError, client_context, describe_ssl_error
from ipsecmgr.tls.upstream import AllServersDown, ServerState, UpstreamPool

log = logging.getLogger(__name__)

MAP_COUNTERS = (
    "accepted", "active", "refused_all_down", "bad_secret", "bad_packet", "failovers",
    "requests", "responses", "upstream_errors",
)  # fmt: skip


# The client connection a relay task serves (each asyncio task has its own context).
_conn: ContextVar[int] = ContextVar("tls_conn", default=0)


class _ClientGone(Exception):
    pass


class _Refuse(Exception):
    """End the client's connection; the message says why (counted by the caller)."""

    def __init__(self, counter: str, reason: str) -> None:
        super().__init__(reason)
        self.counter = counter


def check_body(header: t.Header, body: bytes) -> None:
    """Raise TacacsError unless ``body`` decodes as what ``header`` announces."""
    if header.seq_no % 2 == 0:
        raise t.TacacsError(f"even seq_no {header.seq_no} from a client")
    if header.type == t.AUTHEN:
        if header.seq_no == 1:
            t.AuthenStart.decode(body)
        else:
            t.AuthenContinue.decode(body)
    elif header.seq_no != 1:
        raise t.TacacsError("authorization/accounting sessions have one request")
    elif header.type == t.AUTHOR:
        t.AuthorRequest.decode(body)
    else:
        t.AcctRequest.decode(body)


class MapProxy:
    """The listeners' handler and the counters of one TLS map."""

    def __init__(
        self,
        m: TlsMap,
        mark: int | None,
        trace: Callable[[str, dict[str, Any]], None] | None = None,
        ctx: ssl.SSLContext | None = None,
    ) -> None:
        self.map = m
        self.pool = UpstreamPool(m, ctx or client_context(m), mark)
        self.counters = dict.fromkeys(MAP_COUNTERS, 0)
        self._key = m.downstream_secret.reveal()
        self._trace = trace
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._next_conn = 0

    def trace(self, step: str, fields: dict[str, Any]) -> None:
        if self._trace is not None:
            self._trace(step, {"map": self.map.name, "conn": _conn.get(), **fields})
        log.debug("tls map %s: %s %s", self.map.name, step, fields)

    def view(self, now: float) -> dict[str, Any]:
        return {
            "name": self.map.name,
            "counters": dict(self.counters),
            "servers": [s.view(now) for s in self.pool.servers],
        }

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._next_conn += 1
        _conn.set(self._next_conn)
        self._writers.add(writer)
        self.counters["accepted"] += 1
        self.counters["active"] += 1
        sockname = writer.get_extra_info("sockname")
        peer = writer.get_extra_info("peername")
        # The original destination: the listener is bound to the server's address
        # (transparent capture) or to the configured listen address.
        self.trace("capture", {"client": _fmt(peer), "destination": _fmt(sockname)})
        self.trace("classify", {"tls_map": self.map.name, "acl": self.map.match_address})
        # The upstream connection of this client connection, whatever ends the relay.
        holder: list[tuple[ServerState, TlsConn] | None] = [None]
        try:
            await self._relay(reader, writer, holder)
        except _Refuse as e:
            self.counters[e.counter] += 1
            log.warning("tls map %s: client %s: %s", self.map.name, _fmt(peer), e)
            self.trace("refused", {"client": _fmt(peer), "reason": str(e)})
        except (_ClientGone, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except Exception:  # a relay bug must end one connection, never the daemon's loop
            self.counters["bad_packet"] += 1
            log.exception("tls map %s: client %s: relay error", self.map.name, _fmt(peer))
        finally:
            self.counters["active"] -= 1
            if holder[0] is not None:
                await self._release(*holder[0])
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)

    async def close(self, grace: float = 2.0) -> None:
        """End every client connection: closing the client sockets lets each relay
        task finish (and release its upstream) on its own; cancel what is left."""
        for writer in list(self._writers):
            writer.close()
        tasks = list(self._tasks)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _release(self, s: ServerState, conn: TlsConn) -> None:
        s.active -= 1
        await conn.poll_tickets()
        self.pool.save_session(s, conn)
        await conn.close()

    async def _read_client(self, reader: asyncio.StreamReader) -> tuple[t.Header, bytes] | None:
        try:
            async with asyncio.timeout(self.map.idle_timeout):
                raw = await reader.readexactly(t.HEADER_LEN)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise _Refuse("bad_packet", "truncated header") from None
            return None
        except TimeoutError:
            raise _ClientGone() from None
        try:
            header = t.Header.unpack(raw)
        except t.TacacsError as e:
            raise _Refuse("bad_packet", str(e)) from None
        if header.length > t.MAX_BODY:
            raise _Refuse("bad_packet", f"body length {header.length} too large")
        async with asyncio.timeout(self.map.idle_timeout):
            wire = await reader.readexactly(header.length)
        return header, wire

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        holder: list[tuple[ServerState, TlsConn] | None],
    ) -> None:
        while True:
            got = await self._read_client(reader)
            if got is None:
                return
            header, wire = got
            if header.flags & t.FLAG_UNENCRYPTED:
                # RFC 8907 §4.5: a secret is configured, a cleartext packet is refused.
                raise _Refuse("bad_secret", "client sent the UNENCRYPTED flag; a secret is set")
            body = t.obfuscate(header, wire, self._key)
            try:
                check_body(header, body)
            except t.TacacsError as e:
                raise _Refuse("bad_secret", f"undecodable body (wrong secret?): {e}") from None
            out = t.Header(
                header.version, header.type, header.seq_no, header.flags | t.FLAG_UNENCRYPTED,
                header.session_id, len(body),
            ).pack() + body  # fmt: skip
            self.counters["requests"] += 1
            upstream, reply_header, reply_body = await self._exchange(holder, header, out)
            self.counters["responses"] += 1
            upstream[0].responses += 1
            self.trace(
                "response",
                {"server": str(upstream[0].server), "session": f"{header.session_id:#010x}",
                 "seq": reply_header.seq_no},
            )  # fmt: skip
            back = t.Header(
                reply_header.version, reply_header.type, reply_header.seq_no,
                reply_header.flags & ~t.FLAG_UNENCRYPTED, reply_header.session_id, len(reply_body),
            )  # fmt: skip
            writer.write(back.pack() + t.obfuscate(back, reply_body, self._key))
            await writer.drain()

    async def _exchange(
        self, holder: list[tuple[ServerState, TlsConn] | None], header: t.Header, out: bytes
    ) -> tuple[tuple[ServerState, TlsConn], t.Header, bytes]:
        """Send ``out``, return the reply; ``holder[0]`` always names the live upstream
        (None after a failure), so the caller releases it however this ends."""
        upstream = holder[0]
        tried: set[int] = set()
        reasons: list[str] = []  # of servers that failed after their handshake
        while True:
            if upstream is None:
                try:
                    upstream = await self.pool.connect(self.trace, tried)
                except AllServersDown as e:
                    why = "; ".join([*reasons, str(e)])
                    raise _Refuse("refused_all_down", f"all upstream servers failed: {why}") from e
                upstream[0].active += 1
                holder[0] = upstream
            s, conn = upstream
            self.trace(
                "request",
                {"server": str(s.server), "session": f"{header.session_id:#010x}",
                 "seq": header.seq_no, "type": header.type},
            )  # fmt: skip
            s.requests += 1
            try:
                async with asyncio.timeout(self.map.response_timeout):
                    await conn.send(out)
                    rh = t.Header.unpack(await conn.recv_exactly(t.HEADER_LEN))
                    if rh.length > t.MAX_BODY:
                        raise TlsError(f"reply body length {rh.length} too large")
                    rb = await conn.recv_exactly(rh.length)
                if not rh.flags & t.FLAG_UNENCRYPTED:
                    # RFC 9887 §4: inside TLS the flag is set; an obfuscated reply
                    # means the server is misconfigured (we cannot read it).
                    raise TlsError("server reply without the UNENCRYPTED flag (RFC 9887 §4)")
                if rh.session_id != header.session_id or rh.seq_no != header.seq_no + 1:
                    raise TlsError("server reply does not match the request")
                conn.exchanges += 1
                return upstream, rh, rb
            except (TlsError, t.TacacsError, ssl.SSLError, OSError, TimeoutError,
                    asyncio.IncompleteReadError) as e:  # fmt: skip
                if isinstance(e, TimeoutError):
                    reason = f"no response within {self.map.response_timeout:g} s"
                else:
                    reason = describe_ssl_error(e) if not isinstance(e, TlsError) else str(e)
                s.active -= 1
                holder[0] = upstream = None
                await conn.close()
                if conn.exchanges and header.seq_no == 1:
                    # A connection that already carried a session: the server may
                    # have closed it (no single-connection mode); not a failure.
                    self.trace("upstream-reconnect", {"server": str(s.server), "error": reason})
                    continue
                self.counters["upstream_errors"] += 1
                reasons.append(f"{s.server}: {reason}")
                self.pool.failed(s, reason)
                tried.add(s.priority)
                self.trace("upstream-failed", {"server": str(s.server), "error": reason})
                if header.seq_no != 1:
                    raise _Refuse(
                        "upstream_errors", f"{s.server} failed mid-session: {reason}"
                    ) from None
                self.counters["failovers"] += 1


def _fmt(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"
    return str(addr)
