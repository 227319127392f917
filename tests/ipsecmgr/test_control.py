"""Control socket: JSON lines, owner-only permissions, stale sockets, errors as answers."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from ipsecmgr.control import ControlError, ControlServer, prepare_socket_dir, request


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
