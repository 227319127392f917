"""TLS 1.3 client connections over asyncio streams, with session resumption.

asyncio's own TLS (``open_connection(ssl=...)``) cannot offer a saved session,
so the upstream side drives an :class:`ssl.SSLObject` over memory BIOs: the
handshake, records and close_notify go through the TCP stream we opened (from a
socket carrying the gateway's bypass mark), and :meth:`TlsConn.session` is
offered again on the next connection to the same server (RFC 8446 §2.2: a
resumed TLS 1.3 handshake skips the certificate exchange and signature).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl

from ipsecmgr.tls.config import TlsMap

READ_CHUNK = 65536


class TlsError(ConnectionError):
    """An upstream connection or handshake failed; ``str()`` is the operator's reason."""


def client_context(m: TlsMap) -> ssl.SSLContext:
    """The RFC 9887 profile: TLS 1.3 only, server certificate verified against
    the CA file and the configured identity, our client certificate presented."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # RFC 9887 §3.2: TLS 1.3 or later; nothing older is offered.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    ctx.load_verify_locations(cafile=str(m.ca_file))
    ctx.load_cert_chain(str(m.client_cert), str(m.client_key))
    # RFC 9887 §5.1.2: no 0-RTT. Python's ssl never sends early data (there is no
    # API for it), so nothing to switch off; tickets are still used to resume.
    if m.keylog_file is not None:
        ctx.keylog_filename = str(m.keylog_file)
    return ctx


def describe_ssl_error(e: BaseException) -> str:
    """A short, stable reason: the verify message for certificate failures."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    if isinstance(e, ssl.SSLEOFError) or getattr(e, "reason", "") == "UNEXPECTED_EOF_WHILE_READING":
        return "TLS error: server closed the connection during the handshake (no alert)"
    if isinstance(e, ssl.SSLError):
        return f"TLS error: {e.reason or e}"
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, OSError):
        if e.errno:
            return os.strerror(e.errno)  # asyncio's own message adds nothing
        return e.strerror or str(e) or type(e).__name__
    return str(e) or type(e).__name__


class TlsConn:
    """One TLS connection to an upstream server over an asyncio stream pair."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ctx: ssl.SSLContext,
        server_hostname: str,
        session: ssl.SSLSession | None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(
            self._in, self._out, server_side=False, server_hostname=server_hostname,
            session=session,
        )  # fmt: skip
        self._buf = bytearray()
        self.exchanges = 0  # request/reply pairs relayed on this connection

    @property
    def session(self) -> ssl.SSLSession | None:
        return self._obj.session

    @property
    def session_reused(self) -> bool:
        return self._obj.session_reused

    @property
    def version(self) -> str | None:
        return self._obj.version()

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def _feed(self) -> None:
        data = await self._reader.read(READ_CHUNK)
        if not data:
            self._in.write_eof()
        else:
            self._in.write(data)

    async def handshake(self) -> None:
        while True:
            try:
                self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if self._in.eof:
                    raise TlsError("connection closed during the TLS handshake") from None
                await self._feed()
        await self._flush()
        if self._obj.version() != "TLSv1.3":  # belt and braces: minimum_version refuses it
            raise TlsError(f"server negotiated {self._obj.version()}, TLS 1.3 required")

    async def send(self, data: bytes) -> None:
        self._obj.write(data)
        await self._flush()

    async def recv_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            try:
                chunk = self._obj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                await self._flush()  # e.g. a key update answered
                if self._in.eof:
                    raise TlsError("server closed the connection") from None
                await self._feed()
                continue
            except ssl.SSLZeroReturnError:
                raise TlsError("server closed the TLS session") from None
            if not chunk:
                raise TlsError("server closed the TLS session")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def poll_tickets(self) -> None:
        """Read what the server sent after the handshake (TLS 1.3 NewSessionTicket,
        RFC 8446 §4.6.1) without waiting, so :attr:`session` can be saved."""
        with contextlib.suppress(ssl.SSLError):
            while True:
                chunk = self._obj.read(READ_CHUNK)
                if not chunk:
                    break
                self._buf += chunk

    async def close(self) -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            self._obj.unwrap()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self._flush()
        self._writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self._writer.wait_closed()


async def open_tls(
    address: str,
    port: int,
    ctx: ssl.SSLContext,
    server_hostname: str,
    session: ssl.SSLSession | None,
    *,
    mark: int | None,
    connect_timeout: float,
    handshake_timeout: float,
) -> TlsConn:
    """TCP connect (from a socket with SO_MARK = ``mark``, so the gateway's own
    capture route does not take it back) and TLS 1.3 handshake, each bounded."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with asyncio.timeout(connect_timeout):
                await loop.sock_connect(sock, (address, port))
        except TimeoutError:
            raise TlsError(f"TCP connect timeout ({connect_timeout:g} s)") from None
        except OSError as e:
            raise TlsError(f"TCP connect: {describe_ssl_error(e)}") from None
        reader, writer = await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise
    conn = TlsConn(reader, writer, ctx, server_hostname, session)
    try:
        async with asyncio.timeout(handshake_timeout):
            await conn.handshake()
    except TimeoutError:
        await conn.close()
        raise TlsError(f"TLS handshake timeout ({handshake_timeout:g} s)") from None
    except (ssl.SSLError, OSError) as e:
        await conn.close()
        if isinstance(e, TlsError):
            raise
        raise TlsError(describe_ssl_error(e)) from None
    return conn
