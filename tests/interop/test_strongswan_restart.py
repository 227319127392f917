"""strongSwan as the far end that restarts (root): our client finds out in seconds.

strongSwan (5.9.8, kernel-libipsec) drops ESP for an SPI it does not know and
sends no INVALID_SPI (checked below: our client receives none). What finds the
dead SA is RFC 7296 §2.4's "only outgoing traffic" check: ESP went out and
nothing came back for 1 s at a dead-peer-detection sample (every interval/10
= 3 s with the default interval of 30 s) → the short probe (0.75 s) → a new IKE
SA at once. Dead-peer detection alone: 30 s + 4 × 10 s after the last packet.
"""

from __future__ import annotations

import time

import pytest

from .harness import Case, InteropLab, psk_for_addr_ids, sw_options

BOUND = 20.0  # s from strongSwan's SIGKILL to the first successful login (DPD alone: > 30 s)


@pytest.mark.root
@pytest.mark.slow
def test_restarted_strongswan_responder_is_found_by_unanswered_esp(
    labs: dict[str, InteropLab],
) -> None:
    case = Case("sw-restart", ours="client")
    with labs["tunnel"].run(case) as r:
        assert r.tacacs()["status"] == "PASS", r.diagnostics()
        r.sw.stop(kill=True)
        killed = time.monotonic()
        local, remote, o = sw_options(case, r.lab, r.files)
        r.sw.start(local=local, remote=remote, psk=psk_for_addr_ids(case), options=o)
        while (res := r.tacacs()).get("status") != "PASS":
            assert time.monotonic() - killed < 45, (res, r.diagnostics())
        took = time.monotonic() - killed
        assert took <= BOUND, (took, r.diagnostics())
        assert r.counter("ike", "invalid_spi_received") == 0  # strongSwan sends none
        assert r.ike("silence_probes") >= 1, r.diagnostics()
        assert r.ike("probe_peer_dead") == 1
        assert r.ike("ike_initiated") == 2
