"""show formatters: StarOS-like tables from a sample snapshot; --json dumps the data."""

# ruff: noqa: E501  (expected tables are wider than a code line)

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ipsecmgr.config import diagnose_config, format_diagnosis, load_config
from ipsecmgr.control import ControlError, ControlServer
from ipsecmgr.show import SHOW_COMMANDS, Snapshot, empty_snapshot, render, show, table

NOW = 1_700_000_000.0

SNAP: Snapshot = {
    "time": NOW,
    "hostname": "client",
    "uptime": 3725.0,
    "crypto_maps": [
        {
            "name": "foo", "type": "ikev2-ipv4", "peer": "198.51.100.226",
            "local_address": "198.51.100.227", "match_address": "foo",
            "acl_rules": ["permit ip 198.51.100.225 0.0.0.0 203.0.113.49 0.0.0.0"],
            "mode": "tunnel", "role": "initiator", "ike_transform_sets": ["ikesa-foo"],
            "ipsec_transform_sets": ["B-foo"], "tun": "tun-foo", "src_ip": "198.51.100.225",
            "status": "up", "local_id": "ipv4:198.51.100.227", "remote_id": "ipv4:198.51.100.226",
        }
    ],
    "ike_sas": [
        {
            "crypto_map": "foo", "local": "198.51.100.227:500", "remote": "198.51.100.226:500",
            "spi_i": "0123456789abcdef", "spi_r": "fedcba9876543210", "role": "initiator",
            "state": "ESTABLISHED", "encryption": "aes-gcm-256", "prf": "sha256",
            "integrity": None, "dh_group": 14, "nat_t": False, "established_at": NOW - 62,
            "expires_at": NOW + 86000, "child_sas": 1, "local_id": "ipv4:198.51.100.227",
            "remote_id": "ipv4:198.51.100.226", "messages_in": 4, "messages_out": 4,
        },
        {
            "crypto_map": "bar", "local": "198.51.100.227:500", "remote": "198.51.100.9:500",
            "spi_i": "1111111111111111", "spi_r": "0000000000000000", "role": "initiator",
            "state": "CONNECTING", "encryption": "aes-cbc-256", "prf": "sha384",
            "integrity": "sha384", "dh_group": 19, "nat_t": True, "established_at": None,
            "expires_at": None, "child_sas": 0, "local_id": "fqdn:gw", "remote_id": "fqdn:peer",
        },
    ],
    "child_sas": [
        {
            "crypto_map": "foo", "ike_spi_i": "0123456789abcdef", "mode": "tunnel",
            "state": "INSTALLED", "spi_in": "c0ffee01", "spi_out": "deadbeef",
            "local_ts": ["198.51.100.225/32"], "remote_ts": ["203.0.113.49/32"],
            "encryption": "aes-gcm-256", "esn": True, "encap": False, "pfs_group": 14,
            "bytes_in": 1200, "bytes_out": 900, "packets_in": 10, "packets_out": 9,
            "replay_window": 128, "established_at": NOW - 61, "expires_at": NOW + 3500,
        }
    ],
    "statistics": {
        "ike": {"ike_sa_established": 1, "retransmissions": 0},
        "esp": {"packets_encrypted": 9, "replay_drops": 2},
        "classifier": {"bypass": 5, "protect": 10},
        "tun": {},
    },
}  # fmt: skip


def test_ike_summary_table() -> None:
    assert render("crypto ikev2-ikesa security-associations summary", SNAP) == "\n".join(
        [
            "Crypto Map Local              Remote             State       Role      Child SAs Age",
            "---------- ------------------ ------------------ ----------- --------- --------- --------",
            "foo        198.51.100.227:500 198.51.100.226:500 ESTABLISHED initiator 1         00:01:02",
            "bar        198.51.100.227:500 198.51.100.9:500   CONNECTING  initiator 0         -",
            "",
            "Total IKEv2 SAs: 2  Established: 1",
        ]
    )


def test_ike_detail_shows_algorithms_and_timers() -> None:
    text = render("crypto ikev2-ikesa security-associations", SNAP)
    assert "  Algorithms           : aes-gcm-256, prf-sha256, group 14" in text
    assert "  Algorithms           : aes-cbc-256, prf-sha384, hmac-sha384, group 19" in text
    assert "  Rekey in             : 23:53:20" in text
    assert "  NAT-T                : yes (UDP 4500)" in text
    assert "  Messages in / out    : 4 / 4" in text


def test_ipsec_summary_and_detail() -> None:
    summary = render("crypto  ipsec security-associations   summary", SNAP)
    assert summary.splitlines()[2] == (
        "foo        tunnel INSTALLED c0ffee01 deadbeef 10/9        00:01:01"
    )
    detail = render("crypto ipsec security-associations", SNAP)
    assert "  Cipher           : aes-gcm-256, ESN" in detail
    assert "  Remote TS        : 203.0.113.49/32" in detail
    assert "  PFS              : group 14" in detail


def test_crypto_map_and_statistics() -> None:
    text = render("crypto map", SNAP)
    assert text.startswith("Map Name : foo\n  Map Type             : ikev2-ipv4\n")
    assert "      permit ip 198.51.100.225 0.0.0.0 203.0.113.49 0.0.0.0" in text
    stats = render("crypto statistics", SNAP)
    assert "Uptime: 01:02:05" in stats
    assert "ESP statistics:\n  packets_encrypted : 9\n  replay_drops      : 2" in stats
    assert "TUN statistics:\n  (none)" in stats


def test_json_is_the_snapshot_part() -> None:
    for cmd in SHOW_COMMANDS:
        data = json.loads(render(cmd, SNAP, as_json=True))
        assert data in (SNAP["crypto_maps"], SNAP["ike_sas"], SNAP["child_sas"], SNAP["statistics"])
    with pytest.raises(ValueError, match="unknown show command"):
        render("crypto ikev1 security-associations", SNAP)


def test_table_helper() -> None:
    assert table(("a", "bb"), [("xyz", None)]) == "a   bb\n--- --\nxyz -"


def test_snapshot_from_config_and_show_over_the_socket(tmp_path: Path) -> None:
    psk = tmp_path / "psk"
    psk.write_bytes(b"k")
    psk.chmod(0o600)
    example = Path(__file__).parent.parent.parent / "examples" / "tunnel-mode.toml"
    text = example.read_text().replace('"/etc/ipsecmgr/psk-foo-local"', f'"{psk}"')
    (tmp_path / "c.toml").write_text(text.replace('"/etc/ipsecmgr/psk-foo-remote"', f'"{psk}"'))
    cfg = load_config(tmp_path / "c.toml")
    snap = empty_snapshot(cfg, now=NOW, hostname="h", uptime=5)
    (m,) = snap["crypto_maps"]
    assert (m["tun"], m["src_ip"], m["type"], m["status"]) == (
        "tun-foo", "198.51.100.225", "ikev2-ipv4", "down",
    )  # fmt: skip
    assert m["acl_rules"] == ["permit ip 198.51.100.225 0.0.0.0 203.0.113.49 0.0.0.0"]
    sock = tmp_path / "ctl" / "c.sock"

    async def main() -> tuple[str, str]:
        async with ControlServer(sock, {"snapshot": lambda req: snap}):
            text = await asyncio.to_thread(show, sock, "crypto map")
            js = await asyncio.to_thread(show, sock, "crypto statistics", as_json=True)
            return text, js

    text_out, json_out = asyncio.run(main())
    assert text_out == render("crypto map", snap) and "Status               : Down" in text_out
    assert json.loads(json_out) == snap["statistics"]
    with pytest.raises(ControlError, match="is the daemon running"):
        show(sock, "crypto map")


def test_check_config_output(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(
        '[gateway]\nlocal_addresses = ["198.51.100.1"]\n[access_list.a]\nrules = ["permit ip any any"]\n'
    )
    assert format_diagnosis(p, diagnose_config(p)) == (
        f"warning: access_list.a: not used by any crypto map\n{p}: OK (1 warning(s))"
    )
    p.write_text("[gateway]\nlocal_addresses = []\n")
    assert format_diagnosis(p, diagnose_config(p)) == (
        "error: gateway.local_addresses: empty: at least one address is needed\n"
        f"{p}: 1 error(s), 0 warning(s)"
    )
