"""tools/bench/tunnel.py keeps working: a --quick --json run measures both tunnels (root)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TUNNEL_BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench" / "tunnel.py"


@pytest.mark.root
@pytest.mark.slow
def test_quick_tunnel_benchmark_measures_ours_and_strongswan() -> None:
    proc = subprocess.run(
        [sys.executable, str(TUNNEL_BENCH), "--quick", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    for who in ("ours", "strongswan"):
        r = res[who]
        assert r["esp"] == "AES-GCM-16-256"
        assert r["tun_mtu"] == {"client": 1400, "gw": 1400}
        assert r["tcp_mbps"] > 0
        assert r["rtt"]["received"] > 0 and r["rtt"]["median_us"] > 0
        assert r["rtt"]["p90_us"] >= r["rtt"]["median_us"]
        for side in ("client", "gw"):
            # the TCP run went through this gateway's ESP SAs, and it spent CPU on them
            assert r["cpu"][side]["esp_packets"] > 1000
            assert r["cpu"][side]["us_per_packet"] > 0
    assert res["clear"]["tcp_mbps"] > 0
    assert res["ratios"]["tcp"] > 0 and res["ratios"]["rtt_median"] > 0
    assert [t["met"] in (True, False) for t in res["targets"]] == [True, True, True]
    # the Python floor (tools/bench/forwarder.py) ran on the same lab, and ours in the
    # daemon's default mode, with its default offloads, over ESP-in-UDP like strongSwan's
    assert res["floor"]["tcp_mbps"] > 0 and res["ratios"]["tcp_floor"] > 0
    assert res["ours"]["datapath"] == "single"
    assert res["ours"]["encap"].startswith("ESP-in-UDP")
    assert res["floor"]["cpu"]["gw"]["esp_packets"] > 1000
    # nothing of the run is left behind: its namespaces are gone
    tag = res["config"]["lab"]
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tag not in names
