"""Control socket: JSON lines, owner-only permissions, stale sockets, errors as answers."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ipsecmgr.control import (
    BUSY,
    EVICTED,
    ControlError,
    ControlServer,
    prepare_socket_dir,
    request,
)


def _run_with_server(path: Path, body: Any) -> Any:
    async def echo(req: dict[str, Any]) -> dict[str, Any]:
        return {"echo": req.get("arg")}

    def boom(req: dict[str, Any]) -> None:
        raise RuntimeError("kaput")

    async def main() -> Any:
        async with ControlServer(path, {"echo": echo, "boom": boom, "sync": lambda r: 42}):
            return await asyncio.to_thread(body)

    return asyncio.run(main())


def test_request_response_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control.sock"

    def client() -> list[dict[str, Any]]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        return [
            request(path, {"command": "echo", "arg": [1, "x"]}),
            request(path, {"command": "sync"}),
            request(path, {"command": "boom"}),
            request(path, {"command": "nope"}),
            request(path, {"no": "command"}),
        ]

    got = _run_with_server(path, client)
    assert got[0] == {"ok": True, "result": {"echo": [1, "x"]}}
    assert got[1] == {"ok": True, "result": 42}
    assert got[2] == {"ok": False, "error": "boom: RuntimeError: kaput"}
    assert got[3] == {"ok": False, "error": "unknown command 'nope' (known: boom, echo, sync)"}
    assert got[4]["ok"] is False and "command" in got[4]["error"]
    assert not path.exists()  # removed on close


def test_garbage_line_and_several_requests_per_connection(tmp_path: Path) -> None:
    path = tmp_path / "d" / "c.sock"

    def client() -> list[dict[str, Any]]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(path))
            s.sendall(b'not json\n{"command": "echo", "arg": 1}\n')
            f = s.makefile("rb")
            return [json.loads(f.readline()), json.loads(f.readline())]

    first, second = _run_with_server(path, client)
    assert first["ok"] is False and first["error"].startswith("not JSON")
    assert second == {"ok": True, "result": {"echo": 1}}


def test_open_directory_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    with pytest.raises(ControlError, match="mode 0755"):
        prepare_socket_dir(d / "c.sock")


def test_stale_socket_is_replaced_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "d" / "c.sock"
    prepare_socket_dir(path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    assert _run_with_server(path, lambda: request(path, {"command": "sync"})) == {
        "ok": True, "result": 42,
    }  # fmt: skip

    async def two() -> None:
        async with ControlServer(path, {}):
            with pytest.raises(ControlError, match="another daemon"):
                await ControlServer(path, {}).start()

    asyncio.run(two())


def test_client_errors(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="is the daemon running"):
        request(tmp_path / "absent.sock", {"command": "x"})


# -- bounds (issue #15 item 3) ---------------------------------------------------------


def _bounded(path: Path, body: Any, **limits: Any) -> tuple[Any, ControlServer]:
    """Run ``body`` in a thread against a server with ``limits``; also return the server."""

    async def forever(req: dict[str, Any]) -> Any:
        async def items() -> Any:
            await asyncio.Event().wait()
            yield None  # pragma: no cover - never reached

        return items()

    handlers = {"echo": lambda r: r.get("arg"), "stream": forever}
    server = ControlServer(path, handlers, **limits)

    async def main() -> Any:
        async with server:
            return await asyncio.to_thread(body)

    return asyncio.run(main()), server


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))  # blocking: waits while the listen backlog is full
    s.settimeout(10)
    return s


def _answer(s: socket.socket) -> dict[str, Any]:
    line = s.makefile("rb").readline()
    assert line, "closed without an answer"
    answer: dict[str, Any] = json.loads(line)
    return answer


def test_request_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "d" / "c.sock"

    def client() -> tuple[dict[str, Any], bytes, dict[str, Any]]:
        with _connect(path) as s:
            s.sendall(b'{"command": "echo", "arg": "' + b"x" * 5000 + b'"}\n')
            too_long = _answer(s)
            rest = s.recv(100)  # then the daemon closes this connection
        return too_long, rest, request(path, {"command": "echo", "arg": "x" * 900})

    (too_long, rest, ok), server = _bounded(path, client, max_request=1024)
    assert too_long == {"ok": False, "error": "request longer than 1024 bytes"}
    assert rest == b""
    assert ok == {"ok": True, "result": "x" * 900}
    assert server.counters["too_long"] == 1


def test_json_nesting_limit_instead_of_recursion_error(tmp_path: Path) -> None:
    path = tmp_path / "d" / "c.sock"
    deep = 30000  # json.loads would raise RecursionError on this

    def client() -> list[dict[str, Any]]:
        nested = "[" * deep + "]" * deep
        with _connect(path) as s:
            s.sendall(('{"command": "echo", "arg": ' + nested + "}\n").encode())
            first = _answer(s)
        at_limit = "[" * 31 + "]" * 31  # with the request object: 32 deep
        in_string = '"' + "[{" * 100 + '\\"' + '"'
        return [
            first,
            request(path, {"command": "echo", "arg": json.loads(at_limit)}),
            request(path, {"command": "echo", "arg": json.loads("[" + at_limit + "]")}),
            request(path, {"command": "echo", "arg": json.loads(in_string)}),
        ]

    (first, limit, over, string), server = _bounded(path, client)
    assert first == {"ok": False, "error": "request nested deeper than 32"}
    assert limit["ok"] is True
    assert over == {"ok": False, "error": "request nested deeper than 32"}
    assert string == {"ok": True, "result": "[{" * 100 + '"'}
    assert server.counters["too_deep"] == 2


def test_idle_timeout(tmp_path: Path) -> None:
    path = tmp_path / "d" / "c.sock"

    def client() -> tuple[dict[str, Any], bytes, float]:
        with _connect(path) as s:
            start = time.monotonic()
            answer = _answer(s)
            waited = time.monotonic() - start
            return answer, s.recv(100), waited

    (answer, rest, waited), server = _bounded(path, client, idle_timeout=0.3)
    assert answer == {"ok": False, "error": "idle timeout"}
    assert rest == b"" and 0.25 <= waited < 8
    assert server.counters["idle_timeouts"] == 1


def test_connection_limit_evicts_the_oldest_idle_and_refuses_when_none_is(tmp_path: Path) -> None:
    path = tmp_path / "d" / "c.sock"

    def client() -> dict[str, Any]:
        idle = [_connect(path) for _ in range(4)]
        time.sleep(0.2)  # let the server accept them; the check below does not rely on it
        # A fifth connection: the oldest idle one makes room, the request is answered.
        got: dict[str, Any] = {"answered": request(path, {"command": "echo", "arg": 5})}
        got["oldest_told"] = _answer(idle[0])
        got["oldest_closed"] = idle[0].recv(100) == b""
        for s in idle:
            s.close()
        streams = []
        for _ in range(4):  # four trace-like streams: busy, never evicted
            s = _connect(path)
            s.sendall(b'{"command": "stream"}\n')
            assert _answer(s) == {"ok": True, "stream": True}
            streams.append(s)
        got["refused"] = request(path, {"command": "echo", "arg": 6}, timeout=0.5)
        for s in streams:
            s.close()
        deadline = time.monotonic() + 10
        while True:  # the closed streams free their slots
            got["after"] = request(path, {"command": "echo", "arg": 7})
            if got["after"]["ok"] or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    got, server = _bounded(path, client, max_connections=4)
    assert got["answered"] == {"ok": True, "result": 5}
    assert got["oldest_told"] == {"ok": False, "error": EVICTED}  # request() retries it
    assert got["oldest_closed"] is True
    assert got["refused"] == {"ok": False, "error": BUSY}
    assert got["after"] == {"ok": True, "result": 7}
    assert server.counters["evicted"] >= 1 and server.counters["refused"] >= 1


def test_a_flood_of_idle_connections_never_locks_out_a_request(tmp_path: Path) -> None:
    path = tmp_path / "d" / "c.sock"
    flood = 3000

    def client() -> list[dict[str, Any]]:
        held: list[socket.socket] = []
        answers = []
        try:
            for i in range(flood):
                held.append(_connect(path))
                if i % 300 == 299:
                    answers.append(request(path, {"command": "echo", "arg": i}))
        finally:
            for s in held:
                s.close()
        return answers

    answers, server = _bounded(path, client, max_connections=16)
    assert answers == [{"ok": True, "result": i} for i in range(299, flood, 300)]
    assert server.counters["evicted"] >= flood - 16


def test_requests_during_a_concurrent_flood_are_all_answered(tmp_path: Path) -> None:
    # A flooder thread connects as fast as it can while requests are made: a request's
    # connection may be evicted before the daemon reads it (another thread ran between
    # its connect and its send); request() is told so and sends it again.
    path = tmp_path / "d" / "c.sock"

    def client() -> list[dict[str, Any]]:
        held: list[socket.socket] = []
        stop = threading.Event()

        def flood() -> None:
            for _ in range(3000):
                if stop.is_set():
                    return
                held.append(_connect(path))

        flooder = threading.Thread(target=flood)
        flooder.start()
        try:
            return [request(path, {"command": "echo", "arg": i}, timeout=20) for i in range(20)]
        finally:
            stop.set()
            flooder.join(timeout=30)
            for s in held:
                s.close()

    answers, server = _bounded(path, client, max_connections=8)
    assert answers == [{"ok": True, "result": i} for i in range(20)]
    assert server.counters["evicted"] > 0
