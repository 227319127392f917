"""Configuration: valid files load with defaults; every mistake is reported with its key path."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from ipsecmgr.config import ConfigError, check_config, diagnose_config, load_config

PSK = b"correct horse battery staple"

BASE = """
[access_list.foo]
rules = ["permit tcp host 192.0.2.1 host 203.0.113.49 eq 49"]

[ike_transform_set.ikesa-foo]
dh_group = 14

[ipsec_transform_set.B-foo]
mode = "tunnel"

[crypto_map.foo]
peer = "198.51.100.2"
match_address = "foo"
local_psk = {{ file = "{psk}" }}
ike_transform_sets = ["ikesa-foo"]
ipsec_transform_sets = ["B-foo"]
src_ip = "192.0.2.1"
{extra_map}

[[tun]]
name = "tun-foo"
addresses = ["192.0.2.1/32"]
crypto_maps = ["foo"]
routes = ["203.0.113.49/32"]

[gateway]
local_addresses = ["198.51.100.1", "2001:db8:100::1"]
management_interface = "eth0"
{extra}
"""


@pytest.fixture
def psk_file(tmp_path: Path) -> Path:
    p = tmp_path / "psk"
    p.write_bytes(PSK + b"\n")
    p.chmod(0o600)
    return p


def write(tmp_path: Path, psk: Path, extra_map: str = "", extra: str = "") -> Path:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(BASE.format(psk=psk, extra_map=extra_map, extra=extra))
    return cfg


def test_minimal_config_loads_with_reference_defaults(tmp_path: Path, psk_file: Path) -> None:
    cfg = load_config(write(tmp_path, psk_file))
    cm = cfg.crypto_maps["foo"]
    assert cm.peer == ipaddress.ip_address("198.51.100.2")
    assert cm.local_address == ipaddress.ip_address("198.51.100.1")
    # reference: ikev2-ikesa retransmission-timeout 2000, max-retransmission 3
    assert (cm.retransmission_timeout_ms, cm.max_retransmission) == (2000, 3)
    assert cm.first_packet == "drop" and cm.encapsulation == "auto" and cm.initial_contact
    assert str(cm.local_id) == "ipv4:198.51.100.1" and str(cm.remote_id) == "ipv4:198.51.100.2"
    assert cm.local_psk.reveal() == PSK  # one trailing newline stripped
    assert cm.remote_psk == cm.local_psk  # remote defaults to local
    assert cm.mode == "tunnel" and cm.src_ip == ipaddress.ip_address("192.0.2.1")
    assert cfg.ike_transform_sets["ikesa-foo"].encryption == "aes-gcm-256"
    assert cfg.access_lists["foo"].rules == ("permit tcp host 192.0.2.1 host 203.0.113.49 eq 49",)
    assert cfg.tuns[0].name == "tun-foo" and cfg.tuns[0].mtu == 1400
    assert str(cfg.gateway.control_socket) == "/run/ipsecmgr/control.sock"
    assert cfg.warnings == ()


def test_tun_named_tables_and_transport_mode(tmp_path: Path, psk_file: Path) -> None:
    cfg_path = tmp_path / "t.toml"
    cfg_path.write_text(
        f"""
[access_list.foo]
rules = ["permit tcp host 198.51.100.1 host 198.51.100.2"]
[ipsec_transform_set.A-foo]
mode = "transport"
pfs = 14
esn = true
[crypto_map.foo]
peer = "198.51.100.2"
match_address = "foo"
local_psk = {{ env = "FOO_PSK" }}
remote_psk = {{ file = "{psk_file}" }}
ipsec_transform_sets = ["A-foo"]
local_id = {{ type = "fqdn", value = "client.example.net" }}
remote_id = "tacacs@example.net"
dpd = {{ interval = 3600, timeout = 10, retries = 3 }}
[tun.tunx]
addresses = ["198.51.100.1/32"]
crypto_maps = ["foo"]
[gateway]
local_addresses = ["198.51.100.1"]
"""
    )
    cfg = load_config(cfg_path, environ={"FOO_PSK": "other-key"})
    cm = cfg.crypto_maps["foo"]
    assert cm.mode == "transport" and cm.src_ip is None
    assert cm.local_psk.reveal() == b"other-key" and cm.remote_psk.reveal() == PSK
    assert (cm.local_id.type, cm.remote_id.type) == ("fqdn", "email")
    assert cm.dpd.interval == 3600 and cm.dpd.retries == 3
    assert cfg.ipsec_transform_sets["A-foo"].pfs_group == 14
    assert cm.ike_transform_sets == ("default",) and "default" in cfg.ike_transform_sets
    assert cfg.tuns[0].name == "tunx"


def test_bad_peer_address_names_the_key(tmp_path: Path, psk_file: Path) -> None:
    p = write(tmp_path, psk_file).read_text().replace('"198.51.100.2"', '"209.165.300.1"')
    (tmp_path / "gw.toml").write_text(p)
    assert check_config(tmp_path / "gw.toml") == [
        "crypto_map.foo.peer: '209.165.300.1' is not an IP address"
    ]


def test_all_errors_are_collected(tmp_path: Path, psk_file: Path) -> None:
    extra_map = """
retransmision_timeout = 500
max_retransmission = "three"
first_packet = "hold"
match_address = "bar"
"""
    text = BASE.format(psk=psk_file, extra_map=extra_map, extra="bogus = 1")
    # match_address given twice is a TOML error; replace the first instead
    text = text.replace('match_address = "foo"\n', "", 1)
    text = text.replace("dh_group = 14", 'dh_group = 2\nencryption = "des"')
    (tmp_path / "gw.toml").write_text(text)
    errors = check_config(tmp_path / "gw.toml")
    assert sorted(errors) == sorted(
        [
            "crypto_map.foo.retransmision_timeout: unknown key (allowed: peer, local_address, "
            "match_address, local_id, remote_id, local_psk, remote_psk, ike_transform_sets, "
            "ipsec_transform_sets, src_ip, role, retransmission_timeout, max_retransmission, "
            "dpd, first_packet, queue_size, encapsulation, initial_contact, nat_keepalive, "
            "peers, preempt, on_unreachable)",
            "crypto_map.foo.max_retransmission: expected an integer, got a string 'three'",
            "crypto_map.foo.first_packet: 'hold' is not one of 'drop' | 'queue'",
            "crypto_map.foo.match_address: no access_list named 'bar'",
            "ike_transform_set.ikesa-foo.encryption: 'des' is not one of "
            "'aes-gcm-128' | 'aes-gcm-256' | 'aes-cbc-256'",
            "ike_transform_set.ikesa-foo.dh_group: 2 is not one of 14 | 19 | 20 | 31",
            "gateway.bogus: unknown key (allowed: local_addresses, management_interface, "
            "control_socket, ike_port, natt_port, datapath, mss_clamp, offload, on_stop)",
        ]
    )
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "gw.toml")
    assert len(ei.value.errors) == len(errors)


def test_inline_psk_is_refused_without_echoing_it(tmp_path: Path, psk_file: Path) -> None:
    text = BASE.format(psk=psk_file, extra_map="", extra="").replace(
        f'local_psk = {{ file = "{psk_file}" }}', 'local_psk = "hunter2-inline"'
    )
    (tmp_path / "gw.toml").write_text(text)
    errors = check_config(tmp_path / "gw.toml")
    assert errors == [
        'crypto_map.foo.local_psk: inline keys are not allowed; use { file = "/path" } '
        'or { env = "VAR" }'
    ]
    assert "hunter2" not in "".join(errors)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read"), (b"", "is empty"), (b"\n", "is empty")],
)
def test_psk_file_problems(
    tmp_path: Path, psk_file: Path, content: bytes | None, message: str
) -> None:
    if content is None:
        psk_file.unlink()
    else:
        psk_file.write_bytes(content)
    errors = check_config(write(tmp_path, psk_file))
    assert len(errors) == 1
    assert errors[0].startswith("crypto_map.foo.local_psk.file: ") and message in errors[0]


def test_env_psk_unset_or_empty(tmp_path: Path, psk_file: Path) -> None:
    text = BASE.format(psk=psk_file, extra_map="", extra="").replace(
        f'local_psk = {{ file = "{psk_file}" }}', 'local_psk = { env = "NO_SUCH_PSK_VAR" }'
    )
    (tmp_path / "gw.toml").write_text(text)
    assert check_config(tmp_path / "gw.toml", environ={}) == [
        "crypto_map.foo.local_psk.env: environment variable NO_SUCH_PSK_VAR is not set"
    ]
    assert check_config(tmp_path / "gw.toml", environ={"NO_SUCH_PSK_VAR": ""}) == [
        "crypto_map.foo.local_psk.env: environment variable NO_SUCH_PSK_VAR is empty"
    ]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_psk_file_open_to_group_or_others_is_refused_naming_file_and_fix(
    tmp_path: Path, psk_file: Path, mode: int
) -> None:
    psk_file.chmod(mode)
    d = diagnose_config(write(tmp_path, psk_file))
    assert d.config is None
    assert d.errors == [
        f"crypto_map.foo.local_psk.file: {psk_file} has mode {mode:04o}: group or others may "
        f"read or change this key; refusing to use it (fix: chmod 600 {psk_file})"
    ]
    psk_file.chmod(0o400)
    assert diagnose_config(write(tmp_path, psk_file)).errors == []


def test_cross_references(tmp_path: Path, psk_file: Path) -> None:
    text = BASE.format(psk=psk_file, extra_map="", extra="")
    text = text.replace('src_ip = "192.0.2.1"\n', "")
    text = text.replace('crypto_maps = ["foo"]', 'crypto_maps = ["foo", "nope"]')
    text = text.replace(
        'peer = "198.51.100.2"', 'peer = "2001:db8:100::2"\nlocal_address = "198.51.100.1"'
    )
    (tmp_path / "gw.toml").write_text(text)
    errors = check_config(tmp_path / "gw.toml")
    assert sorted(errors) == sorted(
        [
            "crypto_map.foo.peer: IPv6 peer but local address 198.51.100.1 is IPv4",
            "crypto_map.foo.src_ip: missing: tunnel mode needs src_ip "
            "(the inner source address of the protected traffic)",
            "tun[0].crypto_maps[1]: no crypto_map named 'nope'",
        ]
    )


def test_ipv6_peer_picks_ipv6_local_address(tmp_path: Path, psk_file: Path) -> None:
    text = BASE.format(psk=psk_file, extra_map="", extra="")
    text = text.replace('peer = "198.51.100.2"', 'peer = "2001:db8:100::2"')
    (tmp_path / "gw.toml").write_text(text)
    d = diagnose_config(tmp_path / "gw.toml")
    assert d.config is not None
    cm = d.config.crypto_maps["foo"]
    assert str(cm.local_address) == "2001:db8:100::1" and cm.local_id.type == "ipv6"
    assert d.warnings == ["crypto_map.foo.src_ip: IPv4 inside an IPv6 tunnel"]


def test_cbc_needs_integrity_gcm_refuses_it(tmp_path: Path, psk_file: Path) -> None:
    text = BASE.format(psk=psk_file, extra_map="", extra="")
    text = text.replace("dh_group = 14", 'dh_group = 14\nencryption = "aes-cbc-256"')
    text = text.replace(
        'mode = "tunnel"', 'mode = "tunnel"\n[ike_transform_set.g]\nintegrity = "sha256"'
    )
    (tmp_path / "gw.toml").write_text(text)
    assert sorted(check_config(tmp_path / "gw.toml")) == [
        "ike_transform_set.g.integrity: must not be set with AEAD encryption 'aes-gcm-256'",
        "ike_transform_set.ikesa-foo.integrity: required with encryption 'aes-cbc-256' "
        "(one of sha256, sha384, sha512)",
    ]


def test_acl_hook_and_empty_rules(tmp_path: Path, psk_file: Path) -> None:
    seen: list[tuple[str, list[str]]] = []

    def validate(name: str, rules: list[str]) -> list[str]:
        seen.append((name, rules))
        return [f"rule 1: {rules[0]!r}: port 'eq 49' needs tcp or udp"]

    cfg = write(tmp_path, psk_file)
    assert check_config(cfg, validate_acl=validate) == [
        "access_list.foo.rules: rule 1: 'permit tcp host 192.0.2.1 host 203.0.113.49 eq 49': "
        "port 'eq 49' needs tcp or udp"
    ]
    assert seen == [("foo", ["permit tcp host 192.0.2.1 host 203.0.113.49 eq 49"])]
    text = cfg.read_text().replace(
        'rules = ["permit tcp host 192.0.2.1 host 203.0.113.49 eq 49"]', 'rules = ["", 5]'
    )
    cfg.write_text(text)
    assert sorted(check_config(cfg)) == [
        "access_list.foo.rules[0]: expected a non-empty string, got ''",
        "access_list.foo.rules[1]: expected a non-empty string, got 5",
    ]


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[crypto_map.foo\npeer=1")
    (err,) = check_config(bad)
    assert err.startswith(f"{bad}: not valid TOML")
    (err,) = check_config(tmp_path / "absent.toml")
    assert err == f"{tmp_path / 'absent.toml'}: cannot read: No such file or directory"


def test_missing_gateway_and_required_keys(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[crypto_map.x]\n")
    assert sorted(check_config(p)) == [
        "crypto_map.x.local_psk: missing (required)",
        "crypto_map.x.match_address: missing (required: the name of an access_list)",
        "crypto_map.x.peer: missing (required)",
        "crypto_map.x.src_ip: missing: tunnel mode needs src_ip "
        "(the inner source address of the protected traffic)",
        "gateway: missing (required: local_addresses)",
    ]


def test_map_bound_twice_and_empty_transform_list(tmp_path: Path, psk_file: Path) -> None:
    text = BASE.format(psk=psk_file, extra_map="", extra="")
    text = text.replace('ike_transform_sets = ["ikesa-foo"]', "ike_transform_sets = []")
    text += '\n[[tun]]\nname = "tun-bar"\ncrypto_maps = ["foo"]\n'
    (tmp_path / "gw.toml").write_text(text)
    assert sorted(check_config(tmp_path / "gw.toml")) == [
        "crypto_map.foo.ike_transform_sets: empty: name at least one (or leave the key out)",
        "tun[1].crypto_maps[0]: 'foo' is already bound to tun 'tun-foo'",
    ]


@pytest.mark.root  # chown
def test_secret_file_owned_by_someone_else_warns(tmp_path: Path, psk_file: Path) -> None:
    os.chown(psk_file, 4242, -1)
    d = diagnose_config(write(tmp_path, psk_file))
    assert d.errors == [] and d.warnings == [
        f"crypto_map.foo.local_psk.file: {psk_file} is owned by uid 4242, "
        "neither root nor this user"
    ]


def test_unknown_top_level_section_and_immutability(tmp_path: Path, psk_file: Path) -> None:
    text = BASE.format(psk=psk_file, extra_map="", extra="") + "\n[crypto_maps.x]\npeer = 1\n"
    (tmp_path / "gw.toml").write_text(text)
    assert check_config(tmp_path / "gw.toml") == [
        "crypto_maps: unknown key (allowed: access_list, ike_transform_set, "
        "ipsec_transform_set, crypto_map, tun, gateway, metrics, tls_map)"
    ]
    cfg = load_config(write(tmp_path, psk_file))
    with pytest.raises(TypeError):
        cfg.crypto_maps["evil"] = cfg.crypto_maps["foo"]  # type: ignore[index]
