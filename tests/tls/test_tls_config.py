"""``[tls_map.NAME]``: parsing, defaults, and the refusals (each names its key)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest

from ipsecmgr.config import parse_config
from ipsecmgr.daemon import validate_acl
from tests.tls.rig import Pki


def _doc(pki: Pki, tmp_path: Path, **tls: Any) -> dict[str, Any]:
    secret = tmp_path / "tacacs-secret"
    secret.write_bytes(b"downstream\n")
    os.chmod(secret, 0o600)
    m: dict[str, Any] = {
        "match_address": "tls-b",
        "servers": [{"address": "203.0.113.49", "name": "tacacs.example"},
                    {"address": "203.0.113.50", "port": 4949}],
        "ca_file": str(pki.ca), "client_cert": str(pki.client_crt),
        "client_key": str(pki.client_key),
        "downstream_secret": {"file": str(secret)},
    }  # fmt: skip
    m.update(tls)
    return {
        "access_list": {"tls-b": {"rules": ["permit tcp any host 203.0.113.49 eq 49"]}},
        "gateway": {"local_addresses": ["198.51.100.1"]},
        "tls_map": {"b": m},
    }


def _parse(doc: dict[str, Any]) -> tuple[Any, list[str]]:
    d = parse_config(doc, validate_acl=validate_acl)
    return d.config, d.errors


def test_defaults_priority_order_and_capture(pki: Pki, tmp_path: Path) -> None:
    cfg, errors = _parse(_doc(pki, tmp_path, listen="127.0.0.1:9049"))
    assert errors == []
    m = cfg.tls_maps["b"]
    assert [(str(s.address), s.port, s.identity) for s in m.servers] == [
        ("203.0.113.49", 300, "tacacs.example"),  # RFC 9887: port 300 by default
        ("203.0.113.50", 4949, "203.0.113.50"),
    ]
    assert m.capture == ((ipaddress.ip_address("203.0.113.49"), 49),)
    assert m.listen == (ipaddress.ip_address("127.0.0.1"), 9049)
    assert m.transparent and m.keylog_file is None
    assert "downstream" not in repr(m)  # the secret never prints
    assert m.downstream_secret.reveal() == b"downstream"


@pytest.mark.parametrize(
    "override, key, message",
    [
        ({"psk_file": "/x"}, "tls_map.b.psk_file", "TLS external PSK is not supported"),
        ({"servers": []}, "tls_map.b.servers", "non-empty list"),
        ({"servers": [{"address": "nope"}]}, "tls_map.b.servers[0].address", "not an IP"),
        ({"servers": [{"address": "203.0.113.49", "port": 0}]}, "tls_map.b.servers[0].port",
         "port number"),
        ({"match_address": "missing"}, "tls_map.b.match_address", "no access_list"),
        ({"listen": "localhost"}, "tls_map.b.listen", "ADDRESS:PORT"),
        ({"transparent": False}, "tls_map.b", "needs a listen address"),
        ({"ca_file": "/nonexistent/ca.crt"}, "tls_map.b.ca_file", "cannot read"),
        ({"downstream_secret": "inline"}, "tls_map.b.downstream_secret", "inline keys"),
        ({"bogus": 1}, "tls_map.b.bogus", "unknown key"),
    ],
)  # fmt: skip
def test_refusals_name_the_key(
    pki: Pki, tmp_path: Path, override: dict[str, Any], key: str, message: str
) -> None:
    cfg, errors = _parse(_doc(pki, tmp_path, **override))
    assert cfg is None
    assert any(e.startswith(key + ":") and message in e for e in errors), errors


def test_client_key_readable_by_others_is_refused(pki: Pki, tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_bytes(pki.client_key.read_bytes())
    os.chmod(key, 0o644)
    cfg, errors = _parse(_doc(pki, tmp_path, client_key=str(key)))
    assert cfg is None
    assert any("tls_map.b.client_key" in e and "mode 0644" in e for e in errors), errors
    os.chmod(key, 0o400)
    assert _parse(_doc(pki, tmp_path, client_key=str(key)))[1] == []


@pytest.mark.parametrize(
    "rule, message",
    [
        ("permit tcp any 203.0.113.0 0.0.0.255 eq 49", "single hosts"),
        ("permit udp any host 203.0.113.49 eq 49", "TACACS+ is TCP"),
        ("permit tcp any host 203.0.113.49 range 49 50", "at most one destination port"),
    ],
)
def test_acl_must_name_single_tcp_destinations(
    pki: Pki, tmp_path: Path, rule: str, message: str
) -> None:
    doc = _doc(pki, tmp_path)
    doc["access_list"]["tls-b"]["rules"] = [rule]
    cfg, errors = _parse(doc)
    assert cfg is None
    assert any(e.startswith("tls_map.b.match_address:") and message in e for e in errors), errors


def test_acl_used_only_by_a_tls_map_is_not_reported_unused(pki: Pki, tmp_path: Path) -> None:
    d = parse_config(_doc(pki, tmp_path), validate_acl=validate_acl)
    assert not any("not used" in w for w in d.warnings)


def test_unloadable_certificate_or_mismatched_key_is_a_config_error(
    pki: Pki, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")
    cfg, errors = _parse(_doc(pki, tmp_path, ca_file=str(junk)))
    assert cfg is None
    assert any(e.startswith("tls_map.b.ca_file: not a usable CA") for e in errors), errors
    # The server's key with the client's certificate: they do not match.
    cfg, errors = _parse(_doc(pki, tmp_path, client_key=str(pki.server_key)))
    assert cfg is None
    assert any(e.startswith("tls_map.b.client_cert: certificate and key do not load together")
               for e in errors), errors  # fmt: skip


def test_two_maps_capturing_the_same_server_is_an_error(pki: Pki, tmp_path: Path) -> None:
    doc = _doc(pki, tmp_path)
    doc["tls_map"]["c"] = dict(doc["tls_map"]["b"])
    cfg, errors = _parse(doc)
    assert cfg is None
    assert errors == ["tls_map.c: capture 203.0.113.49:49 is already tls_map.b's"]
