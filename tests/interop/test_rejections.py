"""What strongSwan refuses, and what we refuse, is named in our log (root).

Each row is a failure met while building the matrix, or a classic
misconfiguration; the log line must carry the NOTIFY type and what it means.
"""

from __future__ import annotations

import pytest

from ipsecmgr.lab.strongswan import StrongSwanError

from .harness import Case, InteropLab, wait_for

REJECTIONS = [
    # strongSwan's libipsec finds no local address in a /32 selector for the
    # server behind it and refuses the Child SA (the first failure of the matrix)
    (Case("ts-server-only", ours="client", protect_lan=False),
     "IKE_AUTH failed: peer sent TS_UNACCEPTABLE (the peer refused the traffic selectors"),
    (Case("ike-proposal", ours="client", sw={"ike": "aes128gcm16-prfsha384-ecp384"}),
     "IKE_SA_INIT failed: peer sent NO_PROPOSAL_CHOSEN (the peer accepted none of the offered"),
    (Case("wrong-psk", ours="client", sw_psk=b"not-the-psk-we-have"),
     "authentication failed: peer sent AUTHENTICATION_FAILED"),
    (Case("esp-proposal-we-refuse", ours="gw", sw={"esp": "aes128gcm16"}),
     "IKE_AUTH failed: we sent NO_PROPOSAL_CHOSEN (we accepted none of the offered"),
    (Case("wrong-psk-we-refuse", ours="gw", sw_psk=b"not-the-psk-we-have"),
     "authentication failed"),
]  # fmt: skip


@pytest.mark.root
@pytest.mark.parametrize(("case", "logged"), REJECTIONS, ids=[c.name for c, _ in REJECTIONS])
def test_rejection_is_logged_in_plain_words(
    labs: dict[str, InteropLab], case: Case, logged: str
) -> None:
    with labs["tunnel"].run(case, initiate=False) as r:
        if case.ours == "client":
            assert not r.tacacs(timeout=2.0)["ok"]
        else:
            with pytest.raises(StrongSwanError):
                r.sw.initiate(timeout=5)
        wait_for(f"{logged!r} in our log", lambda: logged in r.ours.log, timeout=5)
        snap = r.ours.snapshot()
        assert not snap["child_sas"]
