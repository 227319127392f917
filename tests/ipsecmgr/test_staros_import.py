"""``ipsecmgr import-staros``: every configuration example of the reference, imported.

The examples are copied verbatim into ``staros_examples/`` (see its README).
Each test imports one, writes the TOML (and key files) to a temporary
directory, loads it through the same validation as ``check-config`` (npusim
compiles the ACLs) and checks the crypto maps, the ACL verdicts and the peers.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsecmgr.cli import main
from ipsecmgr.config import Config, ConfigDiagnosis, diagnose_config
from ipsecmgr.daemon import validate_acl
from ipsecmgr.staros import Imported, import_staros, write_import
from npusim import parse_acl
from npusim.packet import PORTS_OK

EXAMPLES = Path(__file__).parent / "staros_examples"
TUNNEL = (EXAMPLES / "tunnel-mode.cfg").read_text()
TRANSPORT = (EXAMPLES / "transport-mode.cfg").read_text()
STRAY = "permit ip 209.165.200.225 1 0.0.0.0 209.165.201.1 0.0.0.0"
# The reference's tunnel example with its stray "1" removed (as in tests/npusim).
TUNNEL_FIXED = TUNNEL.replace(STRAY, STRAY.replace(" 1 ", " "))
TCP, UDP = 6, 17


def _load(result: Imported, tmp: Path, *, keys: dict[str, bytes] | None = None) -> ConfigDiagnosis:
    out = tmp / "ipsecmgr.toml"
    write_import(result, out)
    for name in result.missing_keys:  # what the operator does after an encrypted key
        f = tmp / name
        f.write_bytes((keys or {}).get(name, f"key-{name}".encode()) + b"\n")
        f.chmod(0o600)
    return diagnose_config(out, validate_acl=validate_acl)


def _verdict(cfg: Config, acl: str, proto: int, src: str, dst: str, dport: int) -> bool | None:
    """The ACL's first-match verdict for one flow: True protect, False deny, None no match."""
    compiled = parse_acl(acl, list(cfg.access_lists[acl].rules))
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    rule = compiled.first_match(s.version, proto, int(s), int(d), 40000, dport, PORTS_OK)
    return None if rule is None else rule.permit


def _notes(result: Imported, line: int) -> list[tuple[str, str]]:
    return [(n.kind, n.message) for n in result.notes if n.line == line]


def test_examples_are_the_reference_verbatim() -> None:
    ref = Path(__file__).parents[3] / "shared" / "reference" / "tacacs-over-ipsec.md"
    if not ref.exists():  # CI has shared/ beside the clone; the copies must still match
        ref = Path("/work/shared/reference/tacacs-over-ipsec.md")
    if not ref.exists():
        pytest.skip("reference document not beside the clone")
    text = ref.read_text()
    for name in ("tacacs-mode.cfg", "require-crypto.cfg", "transport-mode.cfg"):
        assert (EXAMPLES / name).read_text() in text
    assert STRAY in text and STRAY in TUNNEL


def test_tunnel_example_verbatim_reports_the_stray_1_and_fails_closed(tmp_path: Path) -> None:
    result = import_staros(TUNNEL)
    ((kind, msg),) = _notes(result, 4)
    assert kind == "error"
    assert "unexpected '1'" in msg and "wildcard mask" in msg and "209.165.200.225" in msg
    # Written as is, not guessed: check-config rejects it with npusim's message.
    assert f'"{STRAY}"' in result.toml
    d = _load(result, tmp_path)
    assert d.config is None
    assert any(
        e.startswith("access_list.foo.rules: ACL foo line 1: unexpected '1'") for e in d.errors
    )
    # Nothing was derived from the broken line: no route into the TUN, no src_ip.
    assert "routes = []" in result.toml and "src_ip" not in result.toml


def test_tunnel_example_corrected(tmp_path: Path) -> None:
    result = import_staros(TUNNEL_FIXED)
    assert result.count("error") == 0
    # Encrypted keys cannot be decrypted: two key files for the operator to provide.
    assert result.missing_keys == ("psk-foo-local", "psk-foo-remote")
    assert [k for k, _ in _notes(result, 15)] == ["action"]
    assert "psk-foo-local" in _notes(result, 15)[0][1]
    assert result.keys == {}
    d = _load(result, tmp_path, keys={"psk-foo-local": b"L", "psk-foo-remote": b"R"})
    assert d.errors == [] and d.config is not None
    cfg = d.config
    m = cfg.crypto_maps["foo"]
    # "peer 209.165.200.226" comes after a "#exit" that closes the payload, with the
    # indentation of the context: it still belongs to the crypto map.
    assert m.peer == ipaddress.ip_address("209.165.200.226")
    assert m.local_address == ipaddress.ip_address("209.165.200.227")
    assert (m.mode, m.role) == ("tunnel", "initiator")
    assert m.src_ip == ipaddress.ip_address("209.165.200.225")
    assert m.local_psk.reveal() == b"L" and m.remote_psk.reveal() == b"R"
    assert (m.max_retransmission, m.retransmission_timeout_ms) == (3, 2000)
    assert m.ike_transform_sets == ("ikesa-foo",) and m.ipsec_transform_sets == ("B-foo",)
    ike, esp = cfg.ike_transform_sets["ikesa-foo"], cfg.ipsec_transform_sets["B-foo"]
    assert (ike.dh_group, ike.encryption, ike.prf) == (14, "aes-gcm-256", "sha256")
    assert (esp.pfs_group, esp.mode, esp.rekey) == (14, "tunnel", "keepalive")
    (tun,) = cfg.tuns
    assert tun.crypto_maps == ("foo",)
    assert [str(a) for a in tun.addresses] == ["209.165.200.225/32"]
    assert [str(r) for r in tun.routes] == ["209.165.201.1/32"]
    assert set(map(str, cfg.gateway.local_addresses)) == {
        "209.165.200.227", "2001:420:2c7f:f620::83",
    }  # fmt: skip
    # ACL verdicts: the TACACS+ flow is protected; anything else is not this map's.
    assert _verdict(cfg, "foo", TCP, "209.165.200.225", "209.165.201.1", 49) is True
    assert _verdict(cfg, "foo", UDP, "209.165.200.225", "209.165.201.1", 53) is True  # "ip"
    assert _verdict(cfg, "foo", TCP, "209.165.200.227", "209.165.201.1", 49) is None
    assert _verdict(cfg, "foo", TCP, "209.165.201.1", "209.165.200.225", 49) is None
    # Lines with no equivalent are reported, not dropped silently.
    assert _notes(result, 20)[0][0] == "ignored"  # ikev2-ikesa rekey
    assert _notes(result, 26)[0][0] == "ignored"  # ikev2-ikesa policy error-notification


def test_transport_example_ikev1_becomes_ikev2(tmp_path: Path) -> None:
    result = import_staros(TRANSPORT)
    assert result.count("error") == 0
    assert result.missing_keys == ("psk-foo-local",)
    kinds = {n.line: n.kind for n in result.notes}
    assert kinds[14] == "decision"  # crypto map foo ipsec-ikev1
    assert kinds[9] == "decision"  # esp hmac sha1-96 cipher aes-cbc-128
    assert kinds[18] == "decision"  # set pfs group2
    assert kinds[7] == "ignored"  # ip routing shared-subnet
    assert "***" in next(n.text for n in result.notes if n.line == 17)
    assert "EncryptedKey1" not in "".join(n.text + n.message for n in result.notes)
    d = _load(result, tmp_path)
    assert d.errors == [] and d.config is not None
    cfg = d.config
    m = cfg.crypto_maps["foo"]
    assert m.peer == ipaddress.ip_address("209.165.200.229")
    assert m.local_address == ipaddress.ip_address("209.165.200.228")
    assert (m.mode, m.src_ip) == ("transport", None)
    assert m.remote_psk == m.local_psk  # one IKEv1 key, both directions
    assert (m.dpd.interval, m.dpd.timeout, m.dpd.retries) == (3600.0, 10.0, 3)
    (ipsec,) = m.ipsec_transform_sets
    esp = cfg.ipsec_transform_sets[ipsec]
    assert (esp.esp, esp.pfs_group, esp.mode) == ("aes-gcm-128", 14, "transport")
    (ike,) = m.ike_transform_sets
    assert cfg.ike_transform_sets[ike].dh_group == 14
    (tun,) = cfg.tuns
    assert [str(r) for r in tun.routes] == ["209.165.200.229/32"] and tun.addresses == ()
    assert _verdict(cfg, "foo", TCP, "209.165.200.228", "209.165.200.229", 49) is True
    assert _verdict(cfg, "foo", UDP, "209.165.200.228", "209.165.200.229", 49) is None


def test_tacacs_template_and_require_crypto_are_reported_without_a_crash() -> None:
    tacacs = import_staros((EXAMPLES / "tacacs-mode.cfg").read_text())
    # The reference's template has placeholders where numbers and addresses belong.
    assert ("error", "priority: expected an integer >= 1, got 'priority_number'") in _notes(
        tacacs, 4
    )
    assert any("shared secret" in msg for _, msg in _notes(tacacs, 4))
    assert [k for k, _ in _notes(tacacs, 6)] == ["ignored"]  # accounting command
    assert [k for k, _ in _notes(tacacs, 9)] == ["ignored"]  # aaa tacacs+
    require = import_staros((EXAMPLES / "require-crypto.cfg").read_text())
    assert [(n.line, n.kind) for n in require.notes] == [(2, "ignored"), (3, "ignored")]
    assert "[crypto_map" not in require.toml


TACACS_SERVER = """\
configure
  context local
    tacacs mode
      server priority 1 ip-address 209.165.201.1 password tac-secret-9 nas-source-address 209.165.200.225
    #exit
"""  # noqa: E501


def test_src_ip_from_tacacs_server_and_plain_keys_in_0600_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = TACACS_SERVER + TUNNEL_FIXED.replace(
        "encrypted key EncryptedKey1", "key local-secret-1"
    ).replace("encrypted key EncryptedKey2", "key remote-secret-2")
    src = tmp_path / "staros.cfg"
    src.write_text(text)
    out = tmp_path / "etc" / "ipsecmgr.toml"
    assert main(["import-staros", str(src), "-o", str(out)]) == 0
    printed = capsys.readouterr()
    for secret in ("local-secret-1", "remote-secret-2", "tac-secret-9"):
        assert secret not in printed.out + printed.err
        assert secret not in out.read_text()
    assert "check-config" in printed.out and "OK" in printed.out
    for name, value in (("psk-foo-local", b"local-secret-1\n"), ("psk-foo-remote", None)):
        f = out.parent / name
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
        if value is not None:
            assert f.read_bytes() == value
    d = diagnose_config(out, validate_acl=validate_acl)
    assert d.errors == [] and d.warnings == [] and d.config is not None
    m = d.config.crypto_maps["foo"]
    assert m.src_ip == ipaddress.ip_address("209.165.200.225")
    assert m.remote_psk.reveal() == b"remote-secret-2"
    # src_ip came from the tacacs server, so no decision about the ACL's source.
    assert not any("src_ip" in n.message for n in import_staros(text).notes)
    # A second run does not overwrite the operator's files.
    assert main(["import-staros", str(src), "-o", str(out)]) == 2
    assert main(["import-staros", str(src), "-o", str(out), "--force"]) == 0


def test_plain_keys_never_go_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "staros.cfg"
    src.write_text(TUNNEL_FIXED.replace("encrypted key EncryptedKey1", "key s3cr3t-k3y"))
    assert main(["import-staros", str(src)]) == 2
    printed = capsys.readouterr()
    assert "s3cr3t-k3y" not in printed.out + printed.err and "-o" in printed.err
    # Without plain keys, the TOML goes to stdout and the report to stderr.
    src.write_text(TRANSPORT)
    assert main(["import-staros", str(src)]) == 1  # the encrypted key needs an action
    printed = capsys.readouterr()
    assert printed.out.startswith("# Imported") and "[action]" in printed.err


def test_missing_exits_and_indentation_do_not_matter(tmp_path: Path) -> None:
    flat = "\n".join(line.strip() for line in TUNNEL_FIXED.splitlines() if line.strip() != "#exit")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _load(import_staros(TUNNEL_FIXED), tmp_path / "a")
    b = _load(import_staros(flat), tmp_path / "b")
    assert a.config is not None and b.config is not None
    assert a.config.crypto_maps == b.config.crypto_maps
    assert a.config.tuns == b.config.tuns and a.config.gateway == b.config.gateway


def test_acl_without_a_routable_destination_asks_for_routes() -> None:
    text = TUNNEL_FIXED.replace(STRAY.replace(" 1 ", " "), "permit tcp host 209.165.200.225 any")
    result = import_staros(text)
    assert any(n.kind == "action" and "add the routes" in n.message for n in result.notes)


_WORDS = [
    "configure", "context", "local", "ip", "access-list", "foo", "permit", "deny", "tcp",
    "any", "host", "0.0.0.0", "209.165.200.225", "#exit", "end", "crypto", "map",
    "ikev2-ipv4", "ipsec-ikev1", "payload", "match", "ipv4", "ipsec", "transform-set",
    "list", "group", "14", "2", "cipher", "aes-cbc-128", "lifetime", "rekey", "keepalive",
    "interface", "crypto-map", "peer", "set", "authentication", "local", "pre-shared-key",
    "key", "encrypted", "ikev2-ikesa", "max-retransmission", "tacacs", "mode", "server",
    "priority", "ip-address", "\"", "exit", "/", "::1", "kilo-bytes", "99999999999", "²",
    "encryption", "aes-gcm-128", "none", "port", "nas-source-address", "keepalive", "dpd",
    "a\x01b", "x\x7f", "ikev2-ipv6", "2001:db8::1", "::/16", "ipv6", "ip-address",
]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_WORDS), max_size=7), max_size=30))
def test_any_input_gives_a_report_not_a_crash(lines: list[list[str]]) -> None:
    result = import_staros("\n".join(" ".join(words) for words in lines))
    assert all(n.kind in ("ignored", "decision", "action", "error") for n in result.notes)
    tomllib.loads(result.toml)  # whatever came in, the output is TOML


def test_cli_exit_status_follows_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = tmp_path / "staros.cfg", tmp_path / "etc" / "ipsecmgr.toml"
    src.write_text(TUNNEL)
    assert main(["import-staros", str(src), "-o", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "line 4 [error]" in printed and "unexpected '1'" in printed
    assert f"to do: write {out.parent / 'psk-foo-local'} (mode 0600)" in printed
    assert "check-config: error: access_list.foo.rules: ACL foo line 1: unexpected '1'" in printed
    # The operator corrects the line and writes the two keys: the same import passes.
    src.write_text(TUNNEL_FIXED)
    for name in ("psk-foo-local", "psk-foo-remote"):
        (out.parent / name).write_text(f"{name}\n")
        (out.parent / name).chmod(0o600)
    assert main(["import-staros", str(src), "-o", str(out), "--force"]) == 0
    printed = capsys.readouterr().out
    assert "to do" not in printed and printed.rstrip().endswith(f"check-config {out}: OK")
    # --force rewrote the TOML but left the operator's key files alone.
    assert (out.parent / "psk-foo-local").read_text() == "psk-foo-local\n"


def test_two_maps_share_an_interface_and_a_transform_set(tmp_path: Path) -> None:
    result = import_staros((EXAMPLES / "two-maps.cfg").read_text())
    assert result.count("error") == 0 and result.missing_keys == ()
    assert set(result.keys) == {
        "psk-tacacs-primary-local", "psk-tacacs-primary-remote",
        "psk-tacacs-secondary-local", "psk-tacacs-secondary-remote",
    }  # fmt: skip
    # One lifetime per transform set: the conflict is reported at the second payload's line.
    ((kind, msg),) = _notes(result, 27)
    assert kind == "decision" and "7200 from line 17 and 3600 here" in msg
    # src_ip: the primary's from tacacs mode (its ACL permits the server's flow on
    # port 49), the secondary's only from its ACL's source host (a decision).
    assert not any("src_ip" in m for _, m in _notes(result, 10))
    assert any("src_ip 192.0.2.10 is the source host" in m for _, m in _notes(result, 20))
    assert "X1" not in "".join(n.text for n in result.notes)
    d = _load(result, tmp_path)
    assert d.errors == [] and d.config is not None
    cfg = d.config
    assert cfg.ipsec_transform_sets["X"].lifetime_seconds == 7200
    assert cfg.ipsec_transform_sets["X"].esp == "aes-gcm-128"
    names = [t.name for t in cfg.tuns]
    assert len(set(names)) == 2 and all(len(n) <= 15 for n in names)
    assert {t.crypto_maps for t in cfg.tuns} == {("tacacs-primary",), ("tacacs-secondary",)}
    for name in result.keys:
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
    primary = cfg.crypto_maps["tacacs-primary"]
    assert primary.local_psk.reveal() == b"abc" and primary.remote_psk.reveal() == b"def"
    assert _verdict(cfg, "tacacs-primary", TCP, "192.0.2.10", "203.0.113.49", 49) is True
    assert _verdict(cfg, "tacacs-primary", TCP, "192.0.2.10", "203.0.113.49", 22) is None


@pytest.mark.parametrize(
    "line",
    ["ikev2-ikesa max-retransmission ²", "ikev2-ikesa retransmission-timeout 1e3",
     "keepalive interval ² timeout 10", "payload p match ipv4\nlifetime ³"],
)  # fmt: skip
def test_bad_numbers_are_reported_errors(line: str) -> None:
    text = f"context local\ncrypto map foo ikev2-ipv4\n{line}\n"
    result = import_staros(text)
    assert any(n.kind == "error" and "expected an integer" in n.message for n in result.notes)


PARAMETERS = """\
configure
  context local
    ip access-list acl1
      permit tcp host 192.0.2.1 host 203.0.113.49 eq 49
    #exit
    ikev2-ikesa transform-set ike1
      encryption aes-cbc-256
      hmac sha2-256-128
      prf sha2-384
      group 20
      lifetime 28800
    #exit
    ipsec transform-set esp1
      cipher aes-gcm-128
      group none
    #exit
    crypto map m1 ikev2-ipv4
      match address acl1
      peer 198.51.100.7
      authentication local pre-shared-key key k-local
      ikev2-ikesa transform-set list ike1
      keepalive interval 20 timeout 5 num-retry 4
      payload p1 match ipv4
        ipsec transform-set list esp1
        lifetime 1800 kilo-bytes 4000
        rekey
      #exit
    #exit
    interface eth0
      ip address 198.51.100.8 255.255.255.0
      crypto-map m1
    #exit
end
"""


def test_each_parameter_lands_in_its_key(tmp_path: Path) -> None:
    result = import_staros(PARAMETERS)
    assert result.count("error") == 0
    d = _load(result, tmp_path)
    assert d.errors == [] and d.config is not None
    ike = d.config.ike_transform_sets["ike1"]
    assert (ike.encryption, ike.integrity, ike.prf) == ("aes-cbc-256", "sha256", "sha384")
    assert (ike.dh_group, ike.lifetime) == (20, 28800)
    esp = d.config.ipsec_transform_sets["esp1"]
    assert (esp.esp, esp.pfs_group, esp.rekey) == ("aes-gcm-128", None, "lazy")
    assert (esp.lifetime_seconds, esp.lifetime_bytes) == (1800, 4000 * 1024)
    m = d.config.crypto_maps["m1"]
    assert (m.dpd.interval, m.dpd.timeout, m.dpd.retries) == (20.0, 5.0, 4)
    assert m.local_psk.reveal() == b"k-local" and m.remote_psk == m.local_psk
    assert m.src_ip == ipaddress.ip_address("192.0.2.1")
    assert any("no remote key" in msg for _, msg in _notes(result, 17))


def test_ipv6_flows_route_as_ipv6(tmp_path: Path) -> None:
    text = (
        "context local\nip access-list v6\n"
        "permit tcp host 2001:db8::225 ::/16 eq 49\n#exit\n"
        "crypto map m6 ikev2-ipv6\nmatch address v6\npeer 2001:db8::226\n"
        "authentication local pre-shared-key key k\n#exit\n"
        "interface eth0\nipv6 address 2001:db8::227/64\ncrypto-map m6\n"
    )
    result = import_staros(text)
    d = _load(result, tmp_path)
    assert d.errors == [] and d.config is not None
    (tun,) = d.config.tuns
    # The integer of ::/16 is also 0.0.0.0: the family comes from the rule.
    assert [str(r) for r in tun.routes] == ["::/16"]
    assert [str(a) for a in tun.addresses] == ["2001:db8::225/128"]


def test_control_characters_in_names_keep_the_toml_valid() -> None:
    result = import_staros("context local\nip access-list a\x01b\npermit ip any any\n")
    assert "a\x01b" in tomllib.loads(result.toml)["access_list"]


# examples/README.md: the documentation addresses the hand-written examples use.
_TO_DOC = [
    ("209.165.200.", "198.51.100."), ("209.165.201.1 ", "203.0.113.49 "),
    ("2001:420:", "2001:db8:"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("staros", "example", "keys"),
    [
        (TUNNEL_FIXED, "tunnel-mode.toml", {"psk-foo-local": "psk-foo-local",
                                            "psk-foo-remote": "psk-foo-remote"}),
        (TRANSPORT, "transport-mode.toml", {"psk-foo-local": "psk-foo-transport"}),
    ],
)  # fmt: skip
def test_import_agrees_with_the_hand_written_example(
    tmp_path: Path, staros: str, example: str, keys: dict[str, str]
) -> None:
    """The importer and examples/ (written from the reference by hand) give the same gateway."""
    for old, new in _TO_DOC:
        staros = staros.replace(old, new)
    (tmp_path / "a").mkdir()
    imported = _load(
        import_staros(staros), tmp_path / "a", keys={k: v.encode() for k, v in keys.items()}
    )
    text = (Path(__file__).parents[2] / "examples" / example).read_text()
    for name in keys.values():
        (tmp_path / name).write_bytes(name.encode())
        (tmp_path / name).chmod(0o600)
    (tmp_path / example).write_text(text.replace('"/etc/ipsecmgr/', f'"{tmp_path}/'))
    written = diagnose_config(tmp_path / example, validate_acl=validate_acl)
    a, b = imported.config, written.config
    assert a is not None and b is not None
    (ma,), (mb,) = a.crypto_maps.values(), b.crypto_maps.values()
    # Transform-set names differ where StarOS has none ("ikev1 policy 1" here).
    assert [replace(a.ike_transform_sets[n], name="") for n in ma.ike_transform_sets] == [
        replace(b.ike_transform_sets[n], name="") for n in mb.ike_transform_sets
    ]
    assert [a.ipsec_transform_sets[n] for n in ma.ipsec_transform_sets] == [
        b.ipsec_transform_sets[n] for n in mb.ipsec_transform_sets
    ]
    assert replace(ma, ike_transform_sets=()) == replace(mb, ike_transform_sets=())
    assert a.tuns == b.tuns and a.gateway == b.gateway
    assert [acl.rules for acl in a.access_lists.values()] == [
        acl.rules for acl in b.access_lists.values()
    ]


SHOW_CONFIGURATION = """\
config
  system hostname vnf-1
  context local
    administrator admin encrypted password S3cr3tHash ecs
    subscriber default
      ip access-group foo in
    #exit
    aaa group default
    #exit
    ip access-list foo
      permit tcp host 192.0.2.1 host 203.0.113.49 eq tacacs
    #exit
    ipsec transform-set ts1
      cipher aes-gcm-256
    #exit
    crypto map foo ikev2-ipv4
      match address foo
      peer 198.51.100.7
      authentication local pre-shared-key key k1
      natt-keepalive 20
      payload p match ipv4
        ipsec transform-set list ts1
        rekey keepalive
      #exit
    #exit
    interface eth0
      ip address 198.51.100.8 255.255.255.0
      crypto-map foo
    #exit
  #exit
end
"""


def test_unknown_modes_with_their_own_exit_do_not_close_known_ones(tmp_path: Path) -> None:
    """A ``show configuration`` holds modes this importer does not know; their ``#exit``
    must close them, not the context around them."""
    result = import_staros(SHOW_CONFIGURATION)
    assert result.count("error") == 0
    ignored = {n.line for n in result.notes if n.kind == "ignored"}
    assert {2, 4, 5, 6, 8, 20} <= ignored
    assert "S3cr3tHash" not in "".join(n.text + n.message for n in result.notes)
    d = _load(result, tmp_path)
    assert d.errors == [] and d.config is not None
    m = d.config.crypto_maps["foo"]
    assert m.peer == ipaddress.ip_address("198.51.100.7")
    assert d.config.ipsec_transform_sets["ts1"].rekey == "keepalive"
    assert [str(r) for (t,) in [d.config.tuns] for r in t.routes] == ["203.0.113.49/32"]


def test_plain_keys_are_not_in_any_repr() -> None:
    from ipsecmgr.staros import _Reader

    r = _Reader()
    r.read(TUNNEL_FIXED.replace("encrypted key EncryptedKey1", "key s3cr3t-k3y"))
    assert "s3cr3t-k3y" not in repr(r.maps)
    result = import_staros(TUNNEL_FIXED.replace("encrypted key EncryptedKey1", "key s3cr3t-k3y"))
    assert result.keys == {"psk-foo-local": b"s3cr3t-k3y"} and "s3cr3t-k3y" not in repr(result)


def test_key_file_names_stay_beside_the_output(tmp_path: Path) -> None:
    text = (
        "context local\nip access-list a\npermit ip host 192.0.2.1 host 203.0.113.49\n#exit\n"
        "crypto map ../x ikev2-ipv4\nmatch address a\npeer 198.51.100.7\n"
        "authentication local pre-shared-key key k1\n#exit\n"
        "crypto map ..%x ikev2-ipv4\nmatch address a\npeer 198.51.100.9\n"
        "authentication local pre-shared-key key k2\n#exit\n"
    )
    text += "interface eth0\nip address 198.51.100.8 255.255.255.0\ncrypto-map ../x\n"
    result = import_staros(text)
    assert set(result.keys) == {"psk-___x-local", "psk-___x-local-2"}
    assert "[tun.tun-___x]" in result.toml
    out = tmp_path / "out" / "ipsecmgr.toml"
    written = write_import(result, out)
    assert all(p.parent == out.parent for p in written)
