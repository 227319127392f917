"""``ipsecmgr lab up`` leaves a working lab behind; ``lab down`` removes all of it (root)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root


def _ipsecmgr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipsecmgr.cli", *args], capture_output=True, text=True, timeout=120
    )


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_lab_up_then_down(tmp_path: Path) -> None:
    state = tmp_path / "state"
    up = _ipsecmgr("lab", "up", "--state", str(state))
    try:
        assert up.returncode == 0, up.stderr
        desc = json.loads((state / "lab.json").read_text())
        names = set(desc["namespaces"].values())
        assert names <= _namespaces()
        # The configs it wrote are valid, and the lab carries traffic in clear.
        for side in ("gw", "client"):
            check = _ipsecmgr("check-config", str(state / f"{side}.toml"))
            assert check.returncode == 0, check.stderr
        client = desc["namespaces"]["client"]
        ping = subprocess.run(["ip", "netns", "exec", client, "ping", "-c1", "-W2", "198.51.100.2"],
                              capture_output=True, text=True)  # fmt: skip
        assert ping.returncode == 0, ping.stdout
        assert _ipsecmgr("lab", "up", "--state", str(state)).returncode == 1  # one at a time
    finally:
        down = _ipsecmgr("lab", "down", "--state", str(state))
    assert down.returncode == 0, down.stderr
    assert not names & _namespaces()
    assert not state.exists()
