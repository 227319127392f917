"""Control socket: a many-peer snapshot (megabytes on one line) reaches the client whole.

At 1,000 peers ``show``'s snapshot is ~1.8 MB (tools/bench/lab_scale.py); the
client refused any answer above 1 MiB, so every ``ipsecmgr show`` failed there.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from ipsecmgr import control
from ipsecmgr.control import ControlError, ControlServer, request

# ~3 MB of JSON: as many rows as the snapshot of ~1,700 peers
ROWS = [{"spi_in": f"{i:08x}", "remote": f"[2001:db8:1::{i:x}]:500", "pad": "x" * 120}
        for i in range(20_000)]  # fmt: skip


def _ask(path: Path) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        async with ControlServer(path, {"snapshot": lambda req: ROWS}):
            return await asyncio.to_thread(request, path, {"command": "snapshot"}, timeout=30.0)

    return asyncio.run(main())


def test_a_multi_megabyte_answer_arrives_whole(tmp_path: Path) -> None:
    got = _ask(tmp_path / "control.sock")
    assert got == {"ok": True, "result": ROWS}


def test_an_answer_over_the_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "MAX_LINE", 1 << 20)  # the old limit, below this answer
    with pytest.raises(ControlError, match="response too long"):
        _ask(tmp_path / "control.sock")
