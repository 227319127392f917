"""Every example config is valid (with its PSK files substituted by temporary ones)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ipsecmgr.config import diagnose_config

EXAMPLES = sorted((Path(__file__).parent.parent.parent / "examples").glob("*.toml"))


def test_all_four_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "tunnel-mode.toml", "tunnel-mode-responder.toml",
        "transport-mode.toml", "transport-mode-responder.toml",
    }  # fmt: skip


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_valid(example: Path, tmp_path: Path) -> None:
    text = example.read_text()
    for name in set(re.findall(r'"/etc/ipsecmgr/([\w-]+)"', text)):
        f = tmp_path / name
        f.write_bytes(f"key-{name}\n".encode())
        f.chmod(0o600)
    cfg_path = tmp_path / example.name
    cfg_path.write_text(text.replace('"/etc/ipsecmgr/', f'"{tmp_path}/'))
    d = diagnose_config(cfg_path)
    assert d.errors == [] and d.warnings == []
    assert d.config is not None
    (cm,) = d.config.crypto_maps.values()
    assert cm.mode == ("transport" if "transport" in example.name else "tunnel")
    assert cm.role == ("responder" if "responder" in example.name else "initiator")


def test_initiator_and_responder_keys_pair_up(tmp_path: Path) -> None:
    maps = {}
    for name in ("tunnel-mode.toml", "tunnel-mode-responder.toml"):
        text = (EXAMPLES[0].parent / name).read_text()
        for key in ("psk-foo-local", "psk-foo-remote"):
            (tmp_path / key).write_bytes(key.encode())
            (tmp_path / key).chmod(0o600)
        (tmp_path / name).write_text(text.replace('"/etc/ipsecmgr/', f'"{tmp_path}/'))
        d = diagnose_config(tmp_path / name)
        assert d.config is not None
        maps[name] = d.config.crypto_maps["foo"]
    i, r = maps["tunnel-mode.toml"], maps["tunnel-mode-responder.toml"]
    assert i.local_psk == r.remote_psk and i.remote_psk == r.local_psk
    assert i.peer == r.local_address and r.peer == i.local_address
