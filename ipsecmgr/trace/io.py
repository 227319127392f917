"""Trace events in and out: the control-socket stream, and JSON-lines files.

A recording is one event per line (the objects described in
:mod:`ipsecmgr.trace`). It holds packets, so it is written with mode 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from ipsecmgr.control import ControlError, request
from ipsecmgr.trace import Event


class TraceClient:
    """A subscription to a running daemon's events (blocking socket).

    The constructor returns once the daemon has registered the subscription,
    so every event after that point is delivered. Iterate to read events;
    :meth:`close` (from any thread) ends the iteration.
    """

    def __init__(
        self,
        path: Path | str,
        tfilter: Mapping[str, str] | None = None,
        rate: float | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError as exc:
            self._sock.close()
            raise ControlError(f"{path}: {exc.strerror or exc} (is the daemon running?)") from None
        req = {"command": "trace", "filter": dict(tfilter or {}), "rate": rate}
        self._sock.sendall(json.dumps(req).encode() + b"\n")
        self._file = self._sock.makefile("rb")
        try:
            header = json.loads(self._file.readline() or b"null")
        except (ValueError, TimeoutError) as exc:
            self.close()
            raise ControlError(f"{path}: no valid answer to 'trace': {exc}") from None
        if not isinstance(header, dict) or not header.get("ok") or not header.get("stream"):
            self.close()
            error = header.get("error") if isinstance(header, dict) else header
            raise ControlError(f"{path}: trace refused: {error}")
        self._sock.settimeout(None)

    def __iter__(self) -> Iterator[Event]:
        while True:
            try:
                line = self._file.readline()
            except (OSError, ValueError):  # closed under us
                return
            if not line:
                return
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict):
                yield item

    def close(self) -> None:
        with contextlib.suppress(OSError):  # already closed, or never connected
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def __enter__(self) -> TraceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_private(path: Path | str) -> IO[str]:
    """A new file only its owner can read (traces carry packets, key files keys)."""
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode otherwise
    return os.fdopen(fd, "w")


def write_event(out: IO[str], e: Event) -> None:
    out.write(json.dumps(e, sort_keys=True) + "\n")


def record(path: Path | str, events: Iterable[Event]) -> int:
    with open_private(path) as out:
        n = 0
        for e in events:
            write_event(out, e)
            n += 1
    return n


def read_events(path: Path | str) -> list[Event]:
    """Events from a recording; lines that are not JSON objects are skipped
    (a recording cut short by Ctrl-C may end with half a line)."""
    out: list[Event] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and "step" in item:
                out.append(item)
    return out


def fetch_keys(path: Path | str) -> dict[str, Any]:
    """The daemon's SA keys (the ``trace-keys`` command), for --wireshark-keys."""
    response = request(path, {"command": "trace-keys"})
    if not response.get("ok"):
        raise ControlError(f"trace-keys: {response.get('error')}")
    result: dict[str, Any] = response["result"]
    return result
