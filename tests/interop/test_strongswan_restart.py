"""strongSwan as the far end that restarts (root): our client finds out at once.

strongSwan (5.9.8, kernel-libipsec) drops ESP for an SPI it does not know and
sends no INVALID_SPI (checked below: our client receives none). What finds the
dead SA is RFC 7296 §2.4's "only outgoing traffic" check, event-driven: the
first ESP after a quiet spell arms a deadline SILENCE (0.5 s) later
(``silence_armed``); nothing came back by then → the short probe (0.75 s,
``silence_probes``), during which the client's packets wait in the map's queue
(``probe_holds``: first_packet = "queue") → a new IKE SA at once, which sends
them. Dead-peer detection alone: 30 s + 4 × 10 s after the last packet.
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
        armed_before = r.ike("silence_armed")
        assert armed_before >= 1, r.diagnostics()  # the first login's SYN was watched
        r.sw.stop(kill=True)
        killed = time.monotonic()
        local, remote, o = sw_options(case, r.lab, r.files)
        r.sw.start(local=local, remote=remote, psk=psk_for_addr_ids(case), options=o)
        while (res := r.tacacs()).get("status") != "PASS":
            assert time.monotonic() - killed < 45, (res, r.diagnostics())
        took = time.monotonic() - killed
        assert took <= BOUND, (took, r.diagnostics())
        assert r.counter("ike", "invalid_spi_received") == 0  # strongSwan sends none
        # The mechanism: a deadline armed by the unanswered ESP (not a DPD sample)
        # started the probe, which held the client's packets; the peer was declared
        # dead by the probe, and the new SA sent what was held
        assert r.ike("silence_armed") > armed_before, r.diagnostics()
        assert r.ike("silence_probes") == 1, r.diagnostics()
        assert r.ike("probe_holds") == 1, r.diagnostics()
        assert r.ike("probe_peer_dead") == 1
        assert r.ike("ike_initiated") == 2
        assert r.ike("queued_sent") >= 2, r.diagnostics()  # the first SYN, the held one
