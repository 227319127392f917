"""Generated lab gateway configs are valid and mirror each other."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipsecmgr.config import diagnose_config
from ipsecmgr.lab.configs import lab_gateway_config
from ipsecmgr.lab.topology import LabAddresses


@pytest.mark.parametrize("mode", ["tunnel", "transport"])
@pytest.mark.parametrize("family", [4, 6])
def test_both_sides_valid_and_mirrored(tmp_path: Path, mode: str, family: int) -> None:
    psk = tmp_path / "psk"
    psk.write_bytes(b"lab-psk")
    psk.chmod(0o600)
    a = LabAddresses.for_mode(mode)
    maps = {}
    for side in ("client", "gw"):
        p = tmp_path / f"{side}.toml"
        p.write_text(lab_gateway_config(a, side, psk_file=psk, management_interface="v1wan",
                                        family=family, bypass_via_tun=True))  # fmt: skip
        d = diagnose_config(p)
        assert (d.errors, d.warnings) == ([], [])
        assert d.config is not None
        maps[side] = (d.config.crypto_maps["tacacs"], d.config.access_lists["tacacs"], d.config)
    (c, c_acl, c_cfg), (g, g_acl, _) = maps["client"], maps["gw"]
    assert c.peer == g.local_address and g.peer == c.local_address
    assert c.peer.version == family and c.mode == g.mode == mode
    assert (c.role, g.role) == ("initiator", "responder")
    server = a.server6 if family == 6 else a.server4
    bypass = a.bypass6 if family == 6 else a.bypass4
    assert c_acl.rules[0].endswith(f"host {server}") and g_acl.rules[0].startswith(
        f"permit ip host {server}"
    )
    routes = {str(r.network_address) for r in c_cfg.tuns[0].routes}
    assert routes == {server, bypass}
    if mode == "tunnel":
        assert str(c.src_ip) == (a.src_ip6 if family == 6 else a.src_ip4)
    else:
        assert c.src_ip is None and server == str(g.local_address)
