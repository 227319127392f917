"""The control API: JSON lines over a Unix socket, one request and one response per line.

Request: ``{"command": "show crypto map", ...arguments}``.
Response: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.
A handler that returns an async iterator streams instead (``trace``): the
response is ``{"ok": true, "stream": true}`` followed by one line per item.

The socket is the only way into the running daemon, so only its owner may use
it: the file is mode 0600 in a directory of mode 0700 that the daemon creates
(default ``/run/ipsecmgr``); a directory that others can enter is refused
rather than silently tightened (it might be /tmp). A stale socket file left by
a crashed daemon is replaced; a live one (another daemon answers) is an error.

Bounds (a local client must not be able to exhaust the daemon, issue #15):

* at most ``max_connections`` (:data:`MAX_CONNECTIONS`) at once. A connection
  over the limit evicts the oldest one that is idle (waiting for a request,
  nothing sent yet); if none is idle it is answered "too many connections"
  and closed. A flood of idle connections therefore never locks out ``show``.
* ``idle_timeout`` (:data:`IDLE_TIMEOUT`) seconds to send the next request,
  then the connection is answered "idle timeout" and closed (a ``trace``
  stream is not idle: it ends when the client closes it).
* a request line of at most :data:`MAX_REQUEST` bytes, JSON nested at most
  :data:`MAX_DEPTH` deep (checked before decoding: ``json.loads`` would recurse
  into a RecursionError).

``counters`` counts what each bound refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import inspect
import json
import os
import socket
import stat
import sys
import termios
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# A show snapshot is ~1.8 KB per peer (IKE SA, Child SA, crypto map: 1.8 MB at 1,000 peers,
# tools/bench/lab_scale.py), so 64 MiB holds some 35,000; anything larger is refused
MAX_LINE = 64 << 20
MAX_REQUEST = 64 * 1024  # the largest request (a trace filter) is a few hundred bytes
MAX_DEPTH = 32  # requests are flat objects; a deeper one is an attack
MAX_CONNECTIONS = 32
IDLE_TIMEOUT = 30.0  # seconds to send a request (a person typing uses the CLI, not the socket)
#: Answers to a connection whose request was never read: :func:`request` retries them.
BUSY = "too many connections"
EVICTED = "evicted: too many connections (no request was read)"

#: A command handler: takes the request, returns a JSON-able result (or an awaitable of one).
Handler = Callable[[dict[str, Any]], Any]


class ControlError(RuntimeError):
    """The control socket could not be set up, reached, or gave no valid answer."""


def prepare_socket_dir(path: Path) -> None:
    """Create the socket's directory 0700, or check that an existing one is private."""
    d = path.parent
    if not d.exists():
        d.mkdir(mode=0o700, parents=True)
        os.chmod(d, 0o700)  # mkdir's mode is filtered by the umask
        return
    problem = socket_dir_problem(d)
    if problem is not None:
        raise ControlError(problem)


def socket_dir_problem(d: Path) -> str | None:
    """Why an existing directory cannot hold the control socket (None: it can).
    Also ``check-config``'s check, so that it refuses what ``run`` would."""
    st = d.stat()
    if not stat.S_ISDIR(st.st_mode):
        return f"{d} is not a directory"
    if stat.S_IMODE(st.st_mode) & 0o077 or st.st_uid != os.geteuid():
        return (
            f"{d} has mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}: "
            "the control socket needs a directory of mode 0700 owned by this user"
        )
    return None


def _remove_stale(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise ControlError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink()  # left behind by a daemon that is gone
            return
    raise ControlError(f"{path}: another daemon is listening there")


class ControlServer:
    """Serves commands from ``handlers`` (name -> function of the request dict)."""

    def __init__(
        self,
        path: Path | str,
        handlers: Mapping[str, Handler],
        *,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
        max_request: int = MAX_REQUEST,
        max_depth: int = MAX_DEPTH,
    ) -> None:
        self.path = Path(path)
        self.handlers = dict(handlers)
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.max_request = max_request
        self.max_depth = max_depth
        self.counters: dict[str, int] = dict.fromkeys(
            ("refused", "evicted", "idle_timeouts", "too_long", "too_deep"), 0
        )
        self._server: asyncio.AbstractServer | None = None
        # Open connections; the idle ones (waiting for a request) oldest first.
        self._open: set[asyncio.StreamWriter] = set()
        self._idle: dict[asyncio.StreamWriter, None] = {}

    async def start(self) -> None:
        prepare_socket_dir(self.path)
        _remove_stale(self.path)
        self._server = await asyncio.start_unix_server(
            self._client, str(self.path), limit=self.max_request
        )
        # The directory is 0700, so nobody else can reach the socket between
        # bind() and this chmod.
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def dispatch(self, request: object) -> dict[str, Any]:
        """Answer one decoded request (also usable without a socket)."""
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": 'request must be a JSON object with a "command" string'}
        handler = self.handlers.get(request["command"])
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return {
                "ok": False,
                "error": f"unknown command {request['command']!r} (known: {known})",
            }
        try:
            result = handler(request)
            if inspect.isawaitable(result):
                result = await result
        except Exception as e:  # a failing command must not take the daemon down
            return {"ok": False, "error": f"{request['command']}: {type(e).__name__}: {e}"}
        return {"ok": True, "result": result}

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        """Room for one more connection: evict the oldest idle one if need be."""
        if len(self._open) >= self.max_connections:
            for victim in list(self._idle):
                if _pending(victim):
                    continue  # its request has arrived, unread: not idle
                del self._idle[victim]
                self._open.discard(victim)
                # It sent nothing: tell it so (its client may retry), and close; its
                # _client ends on the closed reader.
                with contextlib.suppress(ConnectionError):
                    victim.write(_line({"ok": False, "error": EVICTED}))
                victim.close()
                self.counters["evicted"] += 1
                break
            else:
                self.counters["refused"] += 1
                return False
        self._open.add(writer)
        return True

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._admit(writer):
            with contextlib.suppress(ConnectionError):
                writer.write(_line({"ok": False, "error": BUSY}))
            writer.close()
            return
        try:
            while True:
                self._idle[writer] = None
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    return
                except TimeoutError:
                    self.counters["idle_timeouts"] += 1
                    writer.write(_line({"ok": False, "error": "idle timeout"}))
                    return
                except asyncio.LimitOverrunError:
                    self.counters["too_long"] += 1
                    writer.write(
                        _line(
                            {"ok": False, "error": f"request longer than {self.max_request} bytes"}
                        )
                    )
                    return
                finally:
                    self._idle.pop(writer, None)
                if _too_deep(line, self.max_depth):
                    self.counters["too_deep"] += 1
                    response: dict[str, Any] = {
                        "ok": False,
                        "error": f"request nested deeper than {self.max_depth}",
                    }
                else:
                    try:
                        request = json.loads(line)
                    except ValueError as e:
                        response = {"ok": False, "error": f"not JSON: {e}"}
                    else:
                        response = await self.dispatch(request)
                        if response["ok"] and hasattr(response["result"], "__aiter__"):
                            await self._stream(response["result"], reader, writer)
                            return
                writer.write(_line(response))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._open.discard(writer)
            self._idle.pop(writer, None)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _stream(
        self, items: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A streaming command (``trace``): ``{"ok": true, "stream": true}``, then one
        line per item until the source ends or the client closes its end."""

        async def pump() -> None:
            async for item in items:
                writer.write(_line(item))
                await writer.drain()

        async def until_eof() -> None:
            while await reader.read(4096):  # anything more the client sends is ignored
                pass

        writer.write(_line({"ok": True, "stream": True}))
        sender = asyncio.ensure_future(pump())
        closed = asyncio.ensure_future(until_eof())
        try:
            await writer.drain()
            await asyncio.wait((sender, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, closed):
                task.cancel()
            await asyncio.gather(sender, closed, return_exceptions=True)
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()


def _pending(writer: asyncio.StreamWriter) -> bool:
    """Whether the kernel holds bytes the client sent that asyncio has not read yet
    (FIONREAD, which is SIOCINQ on a socket: asyncio's socket wrapper has no recv)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    try:
        unread = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return False
    return int.from_bytes(unread, sys.byteorder) > 0


def _too_deep(line: bytes, limit: int) -> bool:
    """Whether ``[`` and ``{`` nest deeper than ``limit`` outside strings (a scan,
    no recursion; a line with no more brackets than the limit is not scanned)."""
    if line.count(b"[") + line.count(b"{") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for byte in line:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


def _line(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, default=str).encode() + b"\n"


def request(path: Path | str, command: Mapping[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one command to the daemon and return its response (blocking). While a
    client floods the socket the daemon may refuse or evict this connection before
    it reads the request (:data:`BUSY`, :data:`EVICTED`): nothing was done, so the
    request is sent again on a new connection until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        response = _request_once(path, command, max(0.1, deadline - time.monotonic()))
        if response.get("error") not in (BUSY, EVICTED) or time.monotonic() > deadline:
            return response
        time.sleep(0.01)


def _request_once(path: Path | str, command: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    s.connect(str(path))
                    break
                except BlockingIOError:
                    # The listen backlog is full (a client floods the socket): the
                    # daemon drains it; retry until the deadline.
                    if time.monotonic() > deadline:
                        raise TimeoutError from None
                    time.sleep(0.01)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                # Refused or evicted before the request went out: the answer says which.
                s.sendall(_line(dict(command)))
            buf = bytearray()  # appended in place: a many-peer snapshot is megabytes
            chunk = b""
            while b"\n" not in chunk:  # the new chunk only: a rescan of buf is quadratic
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    # The daemon closed this connection with our request unread (an
                    # eviction; Linux resets a Unix socket closed with data queued).
                    return {"ok": False, "error": EVICTED}
                if not chunk:
                    raise ControlError(f"{path}: connection closed before a response")
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise ControlError(f"{path}: response too long")
        except FileNotFoundError:
            raise ControlError(f"{path}: no such socket (is the daemon running?)") from None
        except ConnectionRefusedError:
            raise ControlError(f"{path}: connection refused (is the daemon running?)") from None
        except PermissionError:
            raise ControlError(f"{path}: permission denied (the socket is for its owner)") from None
        except TimeoutError:
            raise ControlError(f"{path}: no response within {timeout} s") from None
        except ConnectionError as e:
            raise ControlError(f"{path}: {e.strerror or e}") from None
    try:
        # One line: after it the daemon may already have closed this (now idle)
        # connection with a notice, which is not ours to read.
        response = json.loads(buf.split(b"\n", 1)[0])
    except ValueError as e:
        raise ControlError(f"{path}: response is not JSON: {e}") from None
    if not isinstance(response, dict):
        raise ControlError(f"{path}: response is not a JSON object")
    return response
