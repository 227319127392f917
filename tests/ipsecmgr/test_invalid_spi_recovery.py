"""The far end restarts: INVALID_SPI → probe → re-establish (RFC 7296 §1.5), fake clock.

Two :class:`Manager` objects on the in-memory network of test_manager_timers:
the client (initiator) sends TACACS+, gw answers. "gw restarts" = gw is
replaced by a fresh gateway with the same address and configuration and no SA.
Timers: ``dpd = {interval = 10, timeout = 2, retries = 3}``: dead-peer
detection alone would find a silent peer 10 + 2 × 4 = 18 s after the last
packet; the INVALID_SPI hint makes it 0.75 s (PROBE_TIMEOUT × (PROBE_TRIES + 1)).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

from ike.invalid_spi import build_invalid_spi
from ipsecmgr.invalid_spi import HOLD_DOWN, PROBE_TIMEOUT, PROBE_TRIES

from .test_manager_timers import (
    CREATE_CHILD_SA,
    IKE_SA_INIT,
    INFORMATIONAL,
    Net,
    Side,
    establish,
)


def wired(net: Net, side: Side) -> Side:
    """The daemon's wiring: unknown-SPI ESP from the data path goes to the manager."""
    side.datapath.on_unknown_spi = lambda spi, src, fam, udp: (
        side.manager.on_unknown_spi(spi, src, fam, udp, net.now) and None
    )
    return side


def start(net: Net) -> tuple[Side, Side]:
    wired(net, net.add("client", "client"))
    wired(net, net.add("gw", "gw"))
    return establish(net)


def restart_gw(net: Net, at: float) -> Side:
    net.run_until(at)
    return wired(net, net.add("gw", "gw"))  # same address and config, no SA


@pytest.fixture
def net(tmp_path: Path) -> Net:
    return Net(tmp_path)


def test_restarted_peer_is_found_in_under_a_second_and_the_tunnel_rebuilt(net: Net) -> None:
    client, _old_gw = start(net)
    (old_sa,) = client.ike_sas()
    gw = restart_gw(net, 5.0)
    traced: list[tuple[str, dict[str, object]]] = []
    client.manager.trace = lambda step, name, pkt, **f: traced.append((name, f))
    # Only the client sends: its ESP reaches a gw that knows no SPI
    net.call(client.send_tacacs)
    client.manager.trace = None
    (hint,) = [f for name, f in traced if name == "invalid_spi"]
    assert hint["authenticated"] is False and hint["spi_out"] == old_sa.children[1].outbound_spi
    assert gw.datapath.counters["esp_unknown_spi"] == 1
    assert gw.manager.endpoint.counters["invalid_spi_sent"] == 1
    assert net.sent("gw", INFORMATIONAL) == [5.0]  # the unprotected one-way message
    assert client.manager.endpoint.counters["invalid_spi_received"] == 1
    assert client.counter("invalid_spi_probes") == 1
    assert client.state.status == "established"  # a hint tears nothing down
    net.run_until(5.0 + PROBE_TIMEOUT * (PROBE_TRIES + 1) - 0.01)
    assert client.state.ike_sa is old_sa and client.state.status == "established"
    net.run_until(10.0)
    # The probe: sent at once, resent every 0.25 s twice; no answer (gw has no IKE
    # SA), dead 0.75 s after the hint, and a new IKE SA at once (not at 5 + 18 s)
    assert net.sent("client", INFORMATIONAL) == [5.0, 5.25, 5.5]
    assert gw.manager.endpoint.counters["unknown_spi"] == 3
    assert net.sent("client", IKE_SA_INIT) == [0.0, 5.75]
    assert client.counter("probe_peer_dead") == 1
    assert client.counter("peer_dead") == 1
    assert client.state.status == "established" and client.state.ike_sa is not old_sa
    assert gw.state.status == "established"
    # TACACS+ flows again, into gw's new inbound SA
    net.call(client.send_tacacs)
    (rec,) = gw.state.children.values()
    assert rec.inbound.counters.packets == 1


def test_forged_hints_with_a_live_peer_cost_one_liveness_exchange_never_a_teardown(
    net: Net,
) -> None:
    client, gw = start(net)
    (sa,) = client.ike_sas()
    (child,) = sa.children.values()
    net.run_until(3.0)
    rng = random.Random(4).randbytes
    forged = build_invalid_spi(child.outbound_spi, rng)
    for _ in range(10):  # an on-path attacker, with gw's address
        client.manager.on_ike_datagram(forged, (client.address, 500), (gw.address, 500), net.now)
    net.flush()
    net.run_until(3.0 + HOLD_DOWN - 0.5)
    net.call(
        lambda: client.manager.on_ike_datagram(
            forged, (client.address, 500), (gw.address, 500), net.now
        )
    )
    net.run_until(9.0)
    # exactly one liveness exchange, answered; the same SA and Child SA stay up
    assert net.sent("client", INFORMATIONAL) == [3.0]
    assert net.sent("gw", INFORMATIONAL, response=True) == [3.0]
    assert client.counter("invalid_spi_hints") == 11
    assert client.counter("invalid_spi_probes") == 1
    assert client.counter("invalid_spi_ignored") == 10
    assert client.ike_sas() == [sa] and child.child_id in sa.children
    assert client.state.status == "established" and client.counter("peer_dead") == 0
    # After the hold-down a hint is worth one more check (the peer may restart later)
    net.call(
        lambda: client.manager.on_ike_datagram(
            forged, (client.address, 500), (gw.address, 500), net.now
        )
    )
    assert net.sent("client", INFORMATIONAL) == [3.0, 9.0]
    assert client.ike_sas() == [sa]


def test_inside_an_ike_sa_invalid_spi_is_authenticated_and_the_child_sa_is_replaced(
    net: Net,
) -> None:
    """gw lost one inbound Child SA but not the IKE SA: it says so inside the IKE
    SA; the client deletes that Child SA and the next packet creates another."""
    client, gw = start(net)
    (rec,) = gw.state.children.values()
    gw.saflow.remove(rec.inbound.spi)
    net.call(client.send_tacacs)  # at 0: the Child SA is younger than INSTALL_GRACE
    assert client.counter("invalid_spi_ignored") == 1 and client.state.children
    net.run_until(2.0)
    net.call(client.send_tacacs)
    assert gw.manager.endpoint.counters["invalid_spi_sent_protected"] == 2
    assert "invalid_spi_sent" not in gw.manager.endpoint.counters
    assert client.counter("invalid_spi_authenticated") == 1
    assert not client.state.children  # deleted (INFORMATIONAL DELETE)
    net.call(client.send_tacacs)  # the next packet: CREATE_CHILD_SA on the same IKE SA
    assert net.sent("client", CREATE_CHILD_SA) == [2.0]
    assert client.counter("child_created_on_demand") == 1
    net.call(client.send_tacacs)
    (new,) = gw.state.children.values()
    assert new.inbound.counters.packets == 1


def test_unknown_spi_answers_are_rate_limited_per_source(net: Net) -> None:
    client, _gw = start(net)
    gw = restart_gw(net, 5.0)
    for _ in range(20):  # a burst of ESP into the dead SA within the same second
        client.send_tacacs()
    net.flush()
    assert gw.datapath.counters["esp_unknown_spi"] == 20
    assert gw.manager.endpoint.counters["invalid_spi_sent"] == 1
    assert gw.manager.endpoint.counters["invalid_spi_rate_limited"] == 19


def test_the_responder_side_waits_for_its_peer_after_the_probe(net: Net) -> None:
    """gw (role responder) learns that the client restarted while only gw sends:
    it drops the dead SA in 0.75 s and does not initiate (the client will)."""
    _client, gw = start(net)
    net.run_until(5.0)
    client = wired(net, net.add("client", "client"))
    net.call(gw.send_tacacs)
    assert gw.counter("invalid_spi_probes") == 1
    net.run_until(8.0)
    assert gw.counter("probe_peer_dead") == 1
    assert gw.state.ike_sa is None and net.sent("gw", IKE_SA_INIT) == []
    assert client.manager.endpoint.counters["invalid_spi_sent"] == 1


# --- a peer that sends no INVALID_SPI: only outgoing traffic (RFC 7296 §2.4) -------------


def test_restarted_peer_without_invalid_spi_is_found_by_unanswered_esp(net: Net) -> None:
    """strongSwan and kernel xfrm drop unknown-SPI ESP silently. The client samples
    its counters every interval/10 = 1 s: ESP went out (noticed at 6), nothing came
    back by the next sample (7): the same short probe, dead at 7.75, rebuilt."""
    client, _gw = start(net)
    net.run_until(5.0)
    gw = net.add("gw", "gw")  # restarted, and (like strongSwan) sends no INVALID_SPI
    net.call(client.send_tacacs)
    assert "invalid_spi_sent" not in gw.manager.endpoint.counters
    net.run_until(6.9)
    assert net.sent("client", INFORMATIONAL) == []
    net.run_until(10.0)
    assert net.sent("client", INFORMATIONAL) == [7.0, 7.25, 7.5]
    assert net.sent("client", IKE_SA_INIT) == [0.0, 7.75]
    assert client.counter("silence_probes") == 1 and client.counter("probe_peer_dead") == 1
    assert client.state.status == "established" and gw.state.status == "established"


def test_answered_traffic_never_probes_and_one_way_traffic_costs_one_exchange(
    net: Net,
) -> None:
    client, gw = start(net)
    for t in range(1, 16):  # request and answer every second: never "only outgoing"
        net.run_until(float(t))
        net.call(client.send_tacacs)
        net.call(gw.send_tacacs)
    assert client.counter("silence_probes") == 0 and gw.counter("silence_probes") == 0
    # One-way from 16 on (the peer is alive): noticed at the sample of 17, probed at
    # 18 and answered; the hold-down keeps the next one HOLD_DOWN (5 s) later
    for t in range(16, 24):
        net.run_until(float(t))
        net.call(client.send_tacacs)
    assert client.counter("silence_probes") == 2
    probes = [t for t in net.sent("client", INFORMATIONAL) if t > 15.0]
    assert probes == [18.0, 23.0]
    assert net.sent("gw", INFORMATIONAL, response=True)[-2:] == [18.0, 23.0]
    assert client.counter("peer_dead") == 0 and client.ike_sas()


def test_with_default_timers_the_second_look_comes_one_second_after_the_first(
    net: Net,
) -> None:
    """dpd interval 30 s: samples every 3 s. The sample at 6 sees ESP that went out
    (at 5) unanswered; the next look is at 7 (SILENCE later), not at 9: probe at 7."""
    default = {"dpd": {"interval": 30, "timeout": 10, "retries": 3}}
    client = wired(net, net.add("client", "client", map_options=default))
    wired(net, net.add("gw", "gw", map_options=default))
    establish(net)
    net.run_until(5.0)
    net.add("gw", "gw", map_options=default)  # restarted, no INVALID_SPI
    net.call(client.send_tacacs)
    net.run_until(10.0)
    assert net.sent("client", INFORMATIONAL) == [7.0, 7.25, 7.5]
    assert net.sent("client", IKE_SA_INIT) == [0.0, 7.75]
    assert client.state.status == "established" and client.counter("silence_probes") == 1


def test_a_peer_lost_before_the_first_sample_is_found_as_quickly(net: Net) -> None:
    """The first sample (3 s after the SA came up) compares with the SA's start:
    an answered transaction at 0.5, gw restarts at 1, the client's retransmissions
    at 1.5, 2.5 and 3.5 go unanswered: looks at 3 (answered? unknown), 4 (ESP went
    out since 3), probe at 5. Without that baseline the first look would only
    record, and the probe would wait for 7."""
    default = {"dpd": {"interval": 30, "timeout": 10, "retries": 3}}
    client = wired(net, net.add("client", "client", map_options=default))
    gw = wired(net, net.add("gw", "gw", map_options=default))
    establish(net)
    net.run_until(0.5)
    net.call(client.send_tacacs)
    net.call(gw.send_tacacs)
    net.run_until(1.0)
    net.add("gw", "gw", map_options=default)  # restarted, no INVALID_SPI
    for t in (1.5, 2.5, 3.5):
        net.run_until(t)
        net.call(client.send_tacacs)
    net.run_until(8.0)
    assert net.sent("client", INFORMATIONAL) == [5.0, 5.25, 5.5]
    assert net.sent("client", IKE_SA_INIT) == [0.0, 5.75]


def test_short_unknown_spi_esp_gets_no_answer(net: Net) -> None:
    """No reflection: ESP shorter than 48 bytes (real ESP here is >= 76) is only
    counted; the 40-byte INVALID_SPI would be larger than what triggered it."""
    _client, gw = start(net)
    src = socket.inet_aton(net.sides["client"].address)
    gw.datapath.handle_inbound(b"\x12\x34\x56\x78" + bytes(43), src, b"", socket.AF_INET)
    assert gw.datapath.counters["esp_unknown_spi"] == 1
    assert "invalid_spi_sent_protected" not in gw.manager.endpoint.counters
    gw.datapath.handle_inbound(b"\x12\x34\x56\x78" + bytes(44), src, b"", socket.AF_INET)
    assert gw.manager.endpoint.counters["invalid_spi_sent_protected"] == 1  # (an IKE SA is up)


def test_a_later_dead_peer_verdict_of_dpd_is_not_the_probes(net: Net) -> None:
    """A forged hint, an answered probe at 3; gw dies at 4: dead-peer detection
    declares it (heartbeat at 13, dead at 21), not the probe: no re-initiation of
    its own (the next packet initiates, as after any DPD verdict)."""
    client, gw = start(net)
    (sa,) = client.ike_sas()
    (child,) = sa.children.values()
    net.run_until(3.0)
    forged = build_invalid_spi(child.outbound_spi, random.Random(4).randbytes)
    net.call(
        lambda: client.manager.on_ike_datagram(
            forged, (client.address, 500), (gw.address, 500), net.now
        )
    )
    assert client.counter("invalid_spi_probes") == 1
    net.down.add("gw")
    net.run_until(30.0)
    assert client.counter("peer_dead") == 1 and client.state.status == "dead"
    assert client.counter("probe_peer_dead") == 0
    assert net.sent("client", IKE_SA_INIT) == [0.0]
