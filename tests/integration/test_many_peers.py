"""The responder daemon with many real peers (root): all up, every probe decrypted,
all back after a restart of the daemon.

64 initiators (:mod:`ipsecmgr.lab.many_peers`: one ``ike.IkeEndpoint`` per peer
on its own UDP socket and IPv6 address, in one namespace) against ``ipsecmgr
run`` with 64 responder crypto maps. tools/bench/lab_scale.py runs the same lab
with 1,000 peers and measures it; this test only checks what must hold.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipsecmgr.lab.many_peers import ManyPeersLab, peer_address
from ipsecmgr.netns import NetnsPool

pytestmark = [pytest.mark.root, pytest.mark.slow]

N = 64
TIMEOUT = 120.0  # bound on each wait; a loaded 2-core machine brings 64 up in seconds


@pytest.fixture
def lab(netns: NetnsPool) -> Iterator[ManyPeersLab]:
    # A short directory: the control socket's path must fit sun_path (108 bytes)
    with tempfile.TemporaryDirectory(prefix="many-peers-") as tmp:
        lab = ManyPeersLab(netns, N, Path(tmp))
        try:
            yield lab
        finally:
            lab.close()


def check_all_counted(lab: ManyPeersLab) -> None:
    """The daemon's view: one established IKE SA per peer, from that peer's address; one
    Child SA per crypto map with exactly the one probe in; ``show crypto statistics``
    counts N decrypted ESP packets and no ESP error."""
    snap: dict[str, Any] = lab.wait_counted(TIMEOUT)  # fails with the counts it saw
    peers = {peer_address(i) for i in range(1, N + 1)}
    remotes = {sa["remote"].rsplit(":", 1)[0].strip("[]") for sa in snap["ike_sas"]}
    assert remotes == peers
    assert sorted(sa["crypto_map"] for sa in snap["child_sas"]) == sorted(
        f"m{i}" for i in range(1, N + 1)
    )
    assert all(sa["packets_in"] == 1 for sa in snap["child_sas"])
    stats = lab.show_statistics()
    assert stats["esp"]["esp_in_packets"] == N
    errors = {k: v for k, v in stats["esp"].items() if k.startswith("in_") or "spi" in k}
    assert errors == {}


def test_many_peers_up_probed_and_back_after_restart(lab: ManyPeersLab) -> None:
    lab.start_gateway(TIMEOUT)
    lab.start_driver(TIMEOUT)

    up = lab.bring_up(TIMEOUT)  # every peer initiates at once
    assert (up["up"], up["probes"]) == (N, N)
    check_all_counted(lab)

    # Restart: SIGTERM makes the daemon DELETE every IKE SA (RFC 7296 §1.4.1); each
    # peer's engine saw its DELETE. Then a new daemon, and every peer initiates again.
    lab.stop_gateway(TIMEOUT)
    assert lab.status()["deleted"] == N
    lab.start_gateway(TIMEOUT)
    up = lab.bring_up(TIMEOUT)
    assert (up["round"], up["up"], up["probes"]) == (2, N, N)
    check_all_counted(lab)  # the new daemon's counters: this round's probes only
