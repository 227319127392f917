"""The fail-closed prefix set and the ``on_stop`` key (no root): which
destinations get a prohibit route, from the ACL lines as npusim compiles them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from ipsecmgr.config import ConfigError, load_config
from ipsecmgr.daemon import parse_acls, validate_acl
from ipsecmgr.failclosed import protected_prefixes
from ipsecmgr.nlbatch import RouteRequest

CONFIG = """
[access_list.tacacs]
rules = [{rules}]

[ike_transform_set.default]
[ipsec_transform_set.default]
mode = "transport"

[crypto_map.tacacs]
peer = "198.51.100.2"
match_address = "tacacs"
local_psk = {{ file = "{psk}" }}

[tun.ipsm0]
addresses = []
routes = ["203.0.113.0/24"]
crypto_maps = ["tacacs"]

[gateway]
local_addresses = ["198.51.100.1"]
{gateway}
"""


def load(tmp_path: Path, rules: list[str], gateway: str = "") -> object:
    psk = tmp_path / "psk"
    psk.write_bytes(b"0123456789abcdef")
    psk.chmod(0o600)
    conf = tmp_path / "c.toml"
    quoted = ", ".join(f'"{r}"' for r in rules)
    conf.write_text(CONFIG.format(rules=quoted, psk=psk, gateway=gateway))
    return load_config(conf, validate_acl=validate_acl)


def prefixes(tmp_path: Path, rules: list[str]) -> tuple[list[str], list[str]]:
    config = load(tmp_path, rules)
    return protected_prefixes(config, parse_acls(config))  # type: ignore[arg-type]


def test_every_permit_destination_both_families_deny_lines_not(tmp_path: Path) -> None:
    got, notes = prefixes(
        tmp_path,
        [
            "deny tcp host 192.0.2.1 host 203.0.113.9 eq 22",
            "permit tcp host 192.0.2.1 203.0.113.0 0.0.0.255 eq 49",
            "permit ip any host 203.0.113.49",
            "permit tcp any 2001:db8:49::/64 eq 49",
            "permit tcp host 192.0.2.1 203.0.113.0 0.0.0.255 eq 4949",  # same prefix: once
        ],
    )
    assert got == ["203.0.113.0/24", "203.0.113.49/32", "2001:db8:49::/64"]
    assert notes == []


def test_permit_any_any_blocks_both_default_routes(tmp_path: Path) -> None:
    got, _ = prefixes(tmp_path, ["permit ip any any"])
    assert got == ["0.0.0.0/0", "::/0"]


def test_non_contiguous_wildcard_blocks_the_covering_prefix_and_says_so(tmp_path: Path) -> None:
    got, notes = prefixes(tmp_path, ["permit ip any 203.0.113.7 0.0.255.0"])
    assert got == ["203.0.0.0/16"]
    assert len(notes) == 1 and "non-contiguous" in notes[0] and "203.0.0.0/16" in notes[0]


def test_on_stop_defaults_to_block_and_takes_clear(tmp_path: Path) -> None:
    assert load(tmp_path, ["permit ip any any"]).gateway.on_stop == "block"  # type: ignore[attr-defined]
    c = load(tmp_path, ["permit ip any any"], 'on_stop = "clear"')
    assert c.gateway.on_stop == "clear"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"gateway\.on_stop: 'open' is not one of"):
        load(tmp_path, ["permit ip any any"], 'on_stop = "open"')


def test_run_and_check_config_refuse_a_group_readable_psk_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    load(tmp_path, ["permit ip any any"])  # writes c.toml and a 0600 psk
    psk = tmp_path / "psk"
    psk.chmod(0o640)
    fix = f"{psk} has mode 0640: group or others may read or change this key; " \
        f"refusing to use it (fix: chmod 600 {psk})"  # fmt: skip
    for cmd in (
        ["run", "--config", str(tmp_path / "c.toml")],
        ["check-config", str(tmp_path / "c.toml")],
    ):
        out = subprocess.run([sys.executable, "-m", "ipsecmgr.cli", *cmd], capture_output=True,
                             text=True, timeout=30)  # fmt: skip
        assert out.returncode == 1, (cmd, out.stderr)
        assert fix in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


class _KernelWithoutIPv6:
    """Stands in for pyroute2's IPRoute on a kernel booted with ipv6.disable=1 (which
    this machine is not): every AF_INET6 request fails with EAFNOSUPPORT, as there."""

    def __init__(self) -> None:
        self.routes: list[dict[str, object]] = []
        self.batched: list[RouteRequest] = []
        self.rules: list[dict[str, object]] = []

    def _check(self, kwargs: dict[str, object]) -> None:
        import socket

        from pyroute2.netlink.exceptions import NetlinkError

        if kwargs.get("family") == socket.AF_INET6:
            raise NetlinkError(97, "Address family not supported by protocol")

    def route(self, op: str, **kwargs: object) -> None:
        self._check(kwargs)
        self.routes.append(kwargs)

    def rule(self, op: str, **kwargs: object) -> None:
        self._check(kwargs)
        self.rules.append(kwargs)

    def get_rules(self, **kwargs: object) -> list[object]:
        self._check(kwargs)
        return []

    def get_routes(self, **kwargs: object) -> list[object]:
        self._check(kwargs)
        return []

    def link_lookup(self, **kwargs: object) -> list[int]:
        return []

    def apply(self, requests: Sequence[RouteRequest]) -> list[int]:
        """Routing's batches (ipsecmgr.nlbatch): errno 97 for IPv6, as route() raises."""
        self.batched += [r for r in requests if ":" not in r.dst]
        return [97 if ":" in r.dst else 0 for r in requests]

    def close(self) -> None:
        pass


def test_without_ipv6_ipv4_is_still_protected_and_ipv6_is_named(tmp_path: Path) -> None:
    from ipsecmgr.failclosed import take_over
    from ipsecmgr.routing import BLOCK_METRIC, RTN_PROHIBIT, Routing

    config = load(
        tmp_path, ["permit ip any host 203.0.113.49", "permit tcp any 2001:db8::/64 eq 49"]
    )
    rt = Routing.__new__(Routing)
    rt.table, rt.mark, rt.priority = 0x4950, 0x4950, 1000
    fake = _KernelWithoutIPv6()
    rt._ipr = fake  # type: ignore[assignment]
    rt._apply = fake.apply
    rt._dump = lambda table: []
    prefixes, _ = protected_prefixes(config, parse_acls(config))  # type: ignore[arg-type]
    failed = take_over(rt, config, prefixes)  # type: ignore[arg-type]
    assert fake.batched == [
        RouteRequest("replace", "203.0.113.49/32", 0x4950, RTN_PROHIBIT, priority=BLOCK_METRIC)
    ]
    assert [r["priority"] for r in fake.rules] == [1000, 1001]
    err = "Address family not supported by protocol"
    assert failed == [
        f"2001:db8::/64: no fail-closed route (prohibit: {err}; unreachable: {err}; "
        f"blackhole: {err})",
        f"IPv6 policy rules: {err}",
    ]
