"""The shipped systemd units (contrib/systemd): systemd's own checks pass.

``systemd-analyze`` comes with the ``systemd`` package, which
``tools/install-system-deps`` installs (``make setup``); it needs no running
systemd. ``security --offline=true`` (systemd >= 250) scores the unit file alone.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
MAX_EXPOSURE = 2.5


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: `make setup` installs the systemd package"
    return tool


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The units with ExecStart= pointing at this checkout's ``ipsecmgr`` (verify
    checks that the command exists), and an instance name for the template."""
    exe = Path(sys.executable).with_name("ipsecmgr")
    assert exe.exists(), exe
    for unit in ("ipsecmgr.service", "ipsecmgr@.service"):
        text = (UNITS / unit).read_text()
        assert "/usr/bin/ipsecmgr " in text
        (tmp_path / unit).write_text(text.replace("/usr/bin/ipsecmgr ", f"{exe} "))
    (tmp_path / "ipsecmgr@lab.service").symlink_to("ipsecmgr@.service")
    return tmp_path


@pytest.mark.parametrize("unit", ["ipsecmgr.service", "ipsecmgr@lab.service"])
def test_systemd_analyze_verify_is_silent(units: Path, unit: str) -> None:
    # verify exits 0 even for unknown keys; it then says so on stderr: both must be clean.
    r = subprocess.run(
        [_analyze(), "verify", "--man=no", str(units / unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_verify_would_catch_a_bad_key(units: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    bad = units / "ipsecmgr.service"
    bad.write_text(bad.read_text().replace("ProtectHome=yes", "ProtectHomes=yes"))
    r = subprocess.run(
        [_analyze(), "verify", "--man=no", str(bad)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "ProtectHomes" in r.stderr


@pytest.mark.parametrize("unit", ["ipsecmgr.service", "ipsecmgr@lab.service"])
def test_security_exposure_is_at_most_2_5(units: Path, unit: str) -> None:
    r = subprocess.run(
        [_analyze(), "security", "--offline=true", "--no-pager", str(units / unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    score = float(m.group(1))
    print(f"systemd-analyze security --offline=true {unit}: exposure {score}")
    assert score <= MAX_EXPOSURE, r.stdout


def test_units_carry_the_hardening_the_daemon_relies_on() -> None:
    """What the daemon needs stays allowed; what it must not have stays out."""
    for unit in ("ipsecmgr.service", "ipsecmgr@.service"):
        keys: dict[str, list[str]] = {}
        for line in (UNITS / unit).read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                k, _, v = line.partition("=")
                keys.setdefault(k, []).append(v)
        assert keys["Type"] == ["notify"]
        assert keys["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE"]
        assert keys["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
        assert keys["SystemCallFilter"][0] == "@system-service"
        assert "capset" in keys["SystemCallFilter"]  # the daemon drops its own capabilities
        assert keys["DeviceAllow"] == ["/dev/net/tun rw"]
        assert keys["RuntimeDirectoryMode"] == ["0700"]  # control.prepare_socket_dir insists
        for k in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
            assert keys[k] == ["yes"], k
        assert keys["ProtectSystem"] == ["strict"]
        assert "WatchdogSec" in keys and "ExecReload" in keys
