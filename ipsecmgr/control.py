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
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import socket
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

MAX_LINE = 1 << 20  # a show snapshot of many SAs fits; anything larger is refused

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
    st = d.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"{d} is not a directory")
    if stat.S_IMODE(st.st_mode) & 0o077 or st.st_uid != os.geteuid():
        raise ControlError(
            f"{d} has mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}: "
            "the control socket needs a directory of mode 0700 owned by this user"
        )


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

    def __init__(self, path: Path | str, handlers: Mapping[str, Handler]) -> None:
        self.path = Path(path)
        self.handlers = dict(handlers)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        prepare_socket_dir(self.path)
        _remove_stale(self.path)
        self._server = await asyncio.start_unix_server(self._client, str(self.path), limit=MAX_LINE)
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

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    return
                except asyncio.LimitOverrunError:
                    writer.write(_line({"ok": False, "error": "request too long"}))
                    return
                try:
                    request = json.loads(line)
                except ValueError as e:
                    response: dict[str, Any] = {"ok": False, "error": f"not JSON: {e}"}
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


def _line(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, default=str).encode() + b"\n"


def request(path: Path | str, command: Mapping[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one command to the daemon and return its response (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            s.sendall(_line(dict(command)))
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
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
    try:
        response = json.loads(buf)
    except ValueError as e:
        raise ControlError(f"{path}: response is not JSON: {e}") from None
    if not isinstance(response, dict):
        raise ControlError(f"{path}: response is not a JSON object")
    return response
