"""``ipsecmgr esp-demo``: the no-root look at steps 7 and 10 keeps working."""

from __future__ import annotations

import subprocess
import sys


def test_esp_demo_round_trips_a_syn_and_scapy_agrees() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ipsecmgr.cli", "esp-demo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    # scapy's own SecurityAssociation decrypted our packet back to the SYN ...
    assert "IP / TCP 192.0.2.1:40000 > 203.0.113.49:tacacs S" in out.stdout
    # ... and our InboundSA did too.
    assert "round trip OK" in out.stdout
