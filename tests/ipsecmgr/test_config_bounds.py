"""Configuration bounds and parity with ``run`` (issue #15 item 2).

Each mistake gives an error naming the file (or the key path) and what to
fix; ``check-config`` and ``run`` refuse the same files, both without a
traceback; ACL lines that can never match are warned about.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipsecmgr.config import diagnose_config, load_config
from ipsecmgr.daemon import validate_acl

CONFIG = """
[access_list.foo]
rules = {rules}

[crypto_map.foo]
peer = "198.51.100.2"
match_address = "foo"
local_psk = {{ file = "{psk}" }}
src_ip = "192.0.2.1"
{map_extra}

[tun.tun-foo]
addresses = ["192.0.2.1/32"]
crypto_maps = ["foo"]

[gateway]
local_addresses = {local}
management_interface = "eth0"
control_socket = "{sock}"
{gw_extra}
"""

RULES = '["permit tcp host 192.0.2.1 host 203.0.113.49 eq 49"]'


def write(
    tmp_path: Path,
    *,
    rules: str = RULES,
    map_extra: str = "",
    gw_extra: str = "",
    local: str = '["198.51.100.1"]',
    sock: str | None = None,
    tail: str = "",
) -> Path:
    psk = tmp_path / "psk"
    psk.write_bytes(b"correct horse battery staple")
    psk.chmod(0o600)
    run = tmp_path / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    os.chmod(run, 0o700)
    path = tmp_path / "gw.toml"
    path.write_text(
        CONFIG.format(
            rules=rules,
            psk=psk,
            map_extra=map_extra,
            gw_extra=gw_extra,
            local=local,
            sock=sock or run / "control.sock",
        )
        + tail
    )
    return path


def errors(path: Path) -> list[str]:
    return diagnose_config(path, validate_acl=validate_acl).errors


def test_the_base_file_is_valid(tmp_path: Path) -> None:
    d = diagnose_config(write(tmp_path), validate_acl=validate_acl)
    assert d.errors == [] and d.config is not None


def test_local_addresses_as_a_string_is_an_error_not_an_assertion(tmp_path: Path) -> None:
    assert errors(write(tmp_path, local='"x"')) == [
        "gateway.local_addresses: expected a list of strings, got a string"
    ]


def test_a_binary_file_is_named_by_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_bytes(b'# ok\n[gateway]\nx = "\xff\xfe"\n')
    assert errors(path) == [
        f"{path}: line 3, column 6: byte 0xff is not UTF-8 "
        "(is this a binary file? TOML files are UTF-8 text)"
    ]


def test_deeply_nested_toml_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text("a = " + "[" * 50_000 + "]" * 50_000)
    assert errors(path) == [f"{path}: not valid TOML: nested too deeply"]


@pytest.mark.parametrize(
    ("where", "text", "message"),
    [
        ("tail", "[ike_transform_set.default]\nlifetime = 604801",
         "ike_transform_set.default.lifetime: 604801 is out of range (expected 2..604800)"),
        ("tail", "[ipsec_transform_set.default]\nlifetime_seconds = 1",
         "ipsec_transform_set.default.lifetime_seconds: 1 is out of range (expected 2..604800)"),
        ("tail", "[ipsec_transform_set.default]\nlifetime_bytes = 0",
         "ipsec_transform_set.default.lifetime_bytes: 0 is out of range "
         "(expected 1..9223372036854775807)"),
        ("map", "dpd = { interval = nan }",
         "crypto_map.foo.dpd.interval: expected a number, got a number nan"),
        ("map", "dpd = { interval = inf }",
         "crypto_map.foo.dpd.interval: expected a number, got a number inf"),
        ("map", "dpd = { interval = 0.01 }",
         "crypto_map.foo.dpd.interval: 0.01 is out of range (expected 0 (off) or 0.1..86400)"),
        ("map", "dpd = { timeout = 0 }",
         "crypto_map.foo.dpd.timeout: 0 is out of range (expected 0.1..3600)"),
        ("map", "dpd = { retries = 21 }",
         "crypto_map.foo.dpd.retries: 21 is out of range (expected 0..20)"),
        ("map", "nat_keepalive = 1e9",
         "crypto_map.foo.nat_keepalive: 1000000000.0 is out of range "
         "(expected 0 (off) or 0.1..86400)"),
        ("map", "queue_size = 0",
         "crypto_map.foo.queue_size: 0 is out of range (expected 1..1024)"),
        ("gw", 'management_interface = "eth 0"',
         "gateway.management_interface: 'eth 0' is not a valid interface name "
         "(no '/', ':', spaces; not '.' or '..')"),
    ],
)  # fmt: skip
def test_bounds_name_the_key_and_the_range(
    tmp_path: Path, where: str, text: str, message: str
) -> None:
    if where == "gw":
        path = (
            write(tmp_path, gw_extra="").read_text().replace('management_interface = "eth0"', text)
        )
        (tmp_path / "gw.toml").write_text(path)
        got = errors(tmp_path / "gw.toml")
    else:
        got = errors(write(tmp_path, map_extra=text if where == "map" else "",
                           tail="\n" + text if where == "tail" else ""))  # fmt: skip
    assert got == [message]


def test_zero_turns_dpd_and_keepalives_off(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, map_extra="dpd = { interval = 0 }\nnat_keepalive = 0"))
    assert cfg.crypto_maps["foo"].dpd.interval == 0 and cfg.crypto_maps["foo"].nat_keepalive == 0


def test_control_socket_paths_the_daemon_refuses(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    os.chmod(open_dir, 0o755)
    a_file = tmp_path / "file"
    a_file.write_text("")
    private = tmp_path / "run"
    private.mkdir(mode=0o700)
    (private / "taken").write_text("")
    cases = {
        open_dir / "c.sock": "has mode 0755",
        a_file / "c.sock": "is not a directory",
        a_file / "sub" / "c.sock": "is not a directory (the socket directory cannot be made)",
        private / "taken": "exists and is not a socket",
        private / ("x" * 120): "longer than 107 bytes",
    }
    for sock, fragment in cases.items():
        got = errors(write(tmp_path, sock=str(sock)))
        assert len(got) == 1 and got[0].startswith("gateway.control_socket: "), got
        assert fragment in got[0], got
    assert errors(write(tmp_path, sock="relative.sock")) == [
        "gateway.control_socket: 'relative.sock' is not an absolute path"
    ]
    assert errors(write(tmp_path, sock=str(tmp_path / "new" / "dir" / "c.sock"))) == []


def test_shadowed_acl_lines_are_warned_about(tmp_path: Path) -> None:
    rules = (
        '["permit tcp host 192.0.2.1 203.0.113.0 0.0.0.255",'
        ' "deny tcp host 192.0.2.1 host 203.0.113.49 eq 23",'  # shadowed by line 1
        ' "permit ip any any",'
        ' "permit udp host 192.0.2.1 host 198.51.100.9 eq 53",'  # shadowed by line 3
        ' "permit tcp host 192.0.2.1 host 203.0.113.49 range 40 60"]'  # shadowed by line 1
    )
    d = diagnose_config(write(tmp_path, rules=rules), validate_acl=validate_acl)
    assert d.errors == []
    shadow = [w for w in d.warnings if "can never match" in w]
    assert [w.split(" (")[0] for w in shadow] == [
        "access_list.foo.rules: line 2",
        "access_list.foo.rules: line 4",
        "access_list.foo.rules: line 5",
    ]
    assert "line 1 ('permit tcp host 192.0.2.1 203.0.113.0 0.0.0.255')" in shadow[0]
    assert "this deny would" in shadow[0] and "this permit would" in shadow[1]


def test_no_warning_when_the_later_line_is_wider(tmp_path: Path) -> None:
    rules = (
        '["deny tcp host 192.0.2.1 host 203.0.113.49 eq 23",'
        ' "permit tcp host 192.0.2.1 host 203.0.113.49",'
        ' "permit ip host 192.0.2.1 host 203.0.113.49",'
        ' "permit tcp host 192.0.2.1 host 203.0.113.50 eq 49"]'
    )
    d = diagnose_config(write(tmp_path, rules=rules), validate_acl=validate_acl)
    assert not [w for w in d.warnings if "can never match" in w]


@pytest.mark.parametrize(
    "case", ["string-addresses", "nan-interval", "socket-under-a-file", "socket-path-too-long"]
)
def test_check_config_and_run_refuse_the_same_files_without_a_traceback(
    tmp_path: Path, case: str
) -> None:
    (tmp_path / "a-file").write_text("")
    broken = {
        "string-addresses": {"local": '"x"'},
        "nan-interval": {"map_extra": "dpd = { interval = nan }"},
        "socket-under-a-file": {"sock": str(tmp_path / "a-file" / "c.sock")},
        "socket-path-too-long": {"sock": str(tmp_path / "run" / ("x" * 120))},
    }[case]
    path = write(tmp_path, **broken)
    outputs = []
    for cmd in (["check-config", str(path)], ["run", "--config", str(path)]):
        proc = subprocess.run(
            [sys.executable, "-m", "ipsecmgr.cli", *cmd],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 1, (cmd, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        outputs.append(proc.stderr)
    check, run = outputs
    first_error = next(ln for ln in check.splitlines() if ln.startswith("error: "))[7:]
    assert first_error in run, (check, run)
