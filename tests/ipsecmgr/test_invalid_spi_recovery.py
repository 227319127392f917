"""The far end restarts: INVALID_SPI → probe → re-establish (RFC 7296 §1.5), fake clock.

Two :class:`Manager` objects on the in-memory network of memnet.py, set up as in
test_manager_timers: the client (initiator) sends TACACS+, gw answers. "gw restarts" = gw is
replaced by a fresh gateway with the same address and configuration and no SA.
Timers: ``dpd = {interval = 10, timeout = 2, retries = 3}``: dead-peer
detection alone would find a silent peer 10 + 2 × 4 = 18 s after the last
packet; the INVALID_SPI hint makes it 0.75 s (PROBE_TIMEOUT × (PROBE_TRIES + 1)).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import IPv6

from ike.invalid_spi import build_invalid_spi
from ipsecmgr.invalid_spi import (
    HOLD_DOWN,
    PROBE_TIMEOUT,
    PROBE_TRIES,
    SILENCE,
    answer_expected,
)

from .memnet import Net, Side
from .test_manager_timers import (
    CREATE_CHILD_SA,
    IKE_SA_INIT,
    INFORMATIONAL,
    add,
    establish,
    tacacs,
)


def wired(net: Net, side: Side) -> Side:
    """The daemon's wiring: unknown-SPI ESP from the data path goes to the manager."""
    side.datapath.on_unknown_spi = lambda spi, src, fam, udp: (
        side.manager.on_unknown_spi(spi, src, fam, udp, net.now) and None
    )
    return side


def start(net: Net) -> tuple[Side, Side]:
    wired(net, add(net, "client", "client"))
    wired(net, add(net, "gw", "gw"))
    return establish(net)


def restart_gw(net: Net, at: float) -> Side:
    net.run_until(at)
    return wired(net, add(net, "gw", "gw"))  # same address and config, no SA


@pytest.fixture
def net(tmp_path: Path) -> Net:
    # As in test_manager_timers: the daemon's on_esp_out wiring (the silence probes
    # below depend on it), no TUN (see memnet)
    return Net(tmp_path, tun=False, esp_out_hook=True)


def test_restarted_peer_is_found_in_under_a_second_and_the_tunnel_rebuilt(net: Net) -> None:
    client, _old_gw = start(net)
    (old_sa,) = client.ike_sas()
    gw = restart_gw(net, 5.0)
    traced: list[tuple[str, dict[str, object]]] = []
    client.manager.trace = lambda step, name, pkt, **f: traced.append((name, f))
    # Only the client sends: its ESP reaches a gw that knows no SPI
    client.send(tacacs(client))
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
    client.send(tacacs(client))
    (rec,) = gw.state.children
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
    (rec,) = gw.state.children
    gw.saflow.remove(rec.inbound.spi)
    client.send(tacacs(client))  # at 0: the Child SA is younger than INSTALL_GRACE
    assert client.counter("invalid_spi_ignored") == 1 and client.state.children
    net.run_until(2.0)
    client.send(tacacs(client))
    assert gw.manager.endpoint.counters["invalid_spi_sent_protected"] == 2
    assert "invalid_spi_sent" not in gw.manager.endpoint.counters
    assert client.counter("invalid_spi_authenticated") == 1
    assert not client.state.children  # deleted (INFORMATIONAL DELETE)
    client.send(tacacs(client))  # the next packet: CREATE_CHILD_SA on the same IKE SA
    assert net.sent("client", CREATE_CHILD_SA) == [2.0]
    assert client.counter("child_created_on_demand") == 1
    client.send(tacacs(client))
    (new,) = gw.state.children
    assert new.inbound.counters.packets == 1


def test_unknown_spi_answers_are_rate_limited_per_source(net: Net) -> None:
    client, _gw = start(net)
    gw = restart_gw(net, 5.0)
    for _ in range(20):  # a burst of ESP into the dead SA within the same second
        client.send(tacacs(client), flush=False)
    net.flush()
    assert gw.datapath.counters["esp_unknown_spi"] == 20
    assert gw.manager.endpoint.counters["invalid_spi_sent"] == 1
    assert gw.manager.endpoint.counters["invalid_spi_rate_limited"] == 19


def test_the_responder_side_waits_for_its_peer_after_the_probe(net: Net) -> None:
    """gw (role responder) learns that the client restarted while only gw sends:
    it drops the dead SA in 0.75 s and does not initiate (the client will)."""
    _client, gw = start(net)
    net.run_until(5.0)
    client = wired(net, add(net, "client", "client"))
    gw.send(tacacs(gw))
    assert gw.counter("invalid_spi_probes") == 1
    net.run_until(8.0)
    assert gw.counter("probe_peer_dead") == 1
    assert gw.state.ike_sa is None and net.sent("gw", IKE_SA_INIT) == []
    assert client.manager.endpoint.counters["invalid_spi_sent"] == 1


# --- a peer that sends no INVALID_SPI: only outgoing traffic (RFC 7296 §2.4) -------------


def bare_ack(side: Side) -> bytes:
    """A TCP segment with only ACK set and no data: nothing answers it (RFC 9293 §3.4)."""
    pkt = bytearray(tacacs(side)[:40])
    pkt[2:4] = (40).to_bytes(2, "big")  # IP total length: headers only
    pkt[10:12] = b"\0\0"
    pkt[32], pkt[33] = 0x50, 0x10  # data offset 5 words, flags ACK
    return bytes(pkt)


def test_restarted_peer_without_invalid_spi_is_found_by_unanswered_esp(net: Net) -> None:
    """strongSwan and kernel xfrm drop unknown-SPI ESP silently. The ESP the client
    sends at 5 arms a deadline SILENCE (0.5 s) later in the manager's timer heap;
    nothing came back by then: the same short probe, dead at 6.25, rebuilt."""
    client, _gw = start(net)
    net.run_until(5.0)
    gw = add(net, "gw", "gw")  # restarted, and (like strongSwan) sends no INVALID_SPI
    client.send(tacacs(client))
    assert "invalid_spi_sent" not in gw.manager.endpoint.counters
    assert client.manager.deadlines.get(("silence", "tacacs")) == 5.0 + SILENCE
    net.run_until(5.0 + SILENCE - 0.01)
    assert net.sent("client", INFORMATIONAL) == []
    net.run_until(10.0)
    assert net.sent("client", INFORMATIONAL) == [5.5, 5.75, 6.0]
    assert net.sent("client", IKE_SA_INIT) == [0.0, 6.25]
    assert client.counter("silence_probes") == 1 and client.counter("probe_peer_dead") == 1
    assert client.state.status == "established" and gw.state.status == "established"


def test_the_data_path_reports_one_packet_per_watch_and_costs_a_compare_otherwise(
    net: Net,
) -> None:
    """``OutboundBinding.watch``: the first ESP reports its map and turns the watch off;
    the packets after it only compare; the manager turns it on again."""
    client, _gw = start(net)
    seen: list[tuple[str, bytes]] = []
    client.datapath.on_esp_out = lambda name, pkt: seen.append((name, pkt))
    binding = client.datapath.outbound["tacacs"]
    assert binding.watch == "tacacs"  # a new binding watches from birth
    for _ in range(3):
        client.send(tacacs(client))
    assert seen == [("tacacs", tacacs(client))] and binding.watch is None
    client.datapath.watch_outbound("tacacs")
    client.send(tacacs(client))
    assert len(seen) == 2


def test_answered_traffic_never_probes_and_one_way_traffic_costs_one_exchange(
    net: Net,
) -> None:
    client, gw = start(net)
    for t in range(1, 16):  # request, answer, the client's bare ACK, every second
        net.run_until(float(t))
        client.send(tacacs(client))
        gw.send(tacacs(gw))
        client.send(bare_ack(client))
    assert client.counter("silence_probes") == 0 and gw.counter("silence_probes") == 0
    assert net.sent("client", INFORMATIONAL) == net.sent("gw", INFORMATIONAL) == []
    assert client.counter("silence_armed") == gw.counter("silence_armed") == 15
    net.run_until(15.9)  # traffic stopped: no deadline is left, nothing looks again
    assert ("silence", "tacacs") not in client.manager.deadlines
    assert ("silence", "tacacs") not in gw.manager.deadlines
    assert client.datapath.outbound["tacacs"].watch == "tacacs"
    # One-way from 16 on (the peer is alive): probed at 16.5 and answered; the
    # hold-down keeps the next one HOLD_DOWN (5 s) later
    for t in range(16, 24):
        net.run_until(float(t))
        client.send(tacacs(client))
    net.run_until(24.0)
    assert client.counter("silence_probes") == 2
    probes = [t for t in net.sent("client", INFORMATIONAL) if t > 15.0]
    assert probes == [16.5, 16.5 + HOLD_DOWN]
    assert net.sent("gw", INFORMATIONAL, response=True)[-2:] == probes
    assert client.counter("peer_dead") == 0 and client.ike_sas()


def test_a_bare_ack_expects_no_answer(net: Net) -> None:
    """A connection's last segment is a bare ACK: it never starts a probe (else every
    transaction would end in one); a segment with data after it does."""
    client, _gw = start(net)
    net.run_until(5.0)
    add(net, "gw", "gw")  # restarted, no INVALID_SPI
    for t in (5.0, 6.0, 7.0):
        net.run_until(t)
        client.send(bare_ack(client))
    net.run_until(8.0)
    assert net.sent("client", INFORMATIONAL) == [] and client.counter("silence_probes") == 0
    client.send(tacacs(client))
    net.run_until(10.0)
    assert net.sent("client", INFORMATIONAL) == [8.5, 8.75, 9.0]


def test_with_default_timers_the_probe_follows_the_first_unanswered_esp(
    net: Net,
) -> None:
    """dpd interval 30 s (dead-peer detection samples every 3 s): the probe does not
    wait for a sample: ESP at 5, probe at 5.5 (before: the sample at 6, then 7)."""
    default = {"dpd": {"interval": 30, "timeout": 10, "retries": 3}}
    client = wired(net, add(net, "client", "client", map_options=default))
    wired(net, add(net, "gw", "gw", map_options=default))
    establish(net)
    net.run_until(5.0)
    add(net, "gw", "gw", map_options=default)  # restarted, no INVALID_SPI
    client.send(tacacs(client))
    net.run_until(10.0)
    assert net.sent("client", INFORMATIONAL) == [5.5, 5.75, 6.0]
    assert net.sent("client", IKE_SA_INIT) == [0.0, 6.25]
    assert client.state.status == "established" and client.counter("silence_probes") == 1


def queue_pair(net: Net) -> tuple[Side, Side]:
    """``first_packet = "queue"`` on the client: the first packet waits for the SA."""
    client = wired(net, add(net, "client", "client", first_packet="queue"))
    gw = wired(net, add(net, "gw", "gw"))
    client.send(tacacs(client))
    gw.send(tacacs(gw))  # answered: no probe
    assert client.state.status == "established" and client.counter("queued_sent") == 1
    return client, gw


def test_while_the_probe_runs_packets_wait_and_go_on_the_new_sa(net: Net) -> None:
    """The client's retransmission at 6 (the probe runs from 5.5 to 6.25) is held, not
    sent into the SA gw lost, and leaves on the new SA at once (6.25): the client's
    next retransmission (3 s after the first packet, RFC 6298) is not needed."""
    client, _gw = queue_pair(net)
    net.run_until(5.0)
    gw = add(net, "gw", "gw")  # restarted, no INVALID_SPI
    client.send(tacacs(client))
    net.run_until(6.0)
    assert client.counter("probe_holds") == 1 and "tacacs" not in client.datapath.outbound
    traced: list[tuple[str, str, dict[str, object]]] = []
    client.manager.trace = lambda step, name, pkt, **f: traced.append((step, name, f))
    client.send(tacacs(client))  # the retransmission
    client.manager.trace = None
    assert client.counter("first_packet_queued") == 2 and len(client.state.queue) == 1
    ((step, what, fields),) = traced
    assert (step, what) == ("5", "first_packet_queued")
    assert "held while a liveness probe" in str(fields["reason"])
    assert gw.datapath.counters["esp_unknown_spi"] == 1  # only the packet of 5
    net.run_until(6.25)
    assert net.sent("client", IKE_SA_INIT) == [0.0, 6.25]
    (rec,) = gw.state.children
    assert rec.inbound.counters.packets == 1 and not client.state.queue
    assert client.counter("probe_released") == 0


def test_a_forged_hint_holds_packets_for_one_answer_only(net: Net) -> None:
    """A live peer answers the probe: the same SA sends the held packet, at once."""
    client, gw = queue_pair(net)
    (sa,) = client.ike_sas()
    (child,) = sa.children.values()
    net.run_until(3.0)
    net.hold.add("gw")  # gw's answer to the probe is on its way
    forged = build_invalid_spi(child.outbound_spi, random.Random(4).randbytes)
    net.call(
        lambda: client.manager.on_ike_datagram(
            forged, (client.address, 500), (gw.address, 500), net.now
        )
    )
    assert client.counter("probe_holds") == 1
    client.send(tacacs(client))
    (rec,) = gw.state.children
    before = rec.inbound.counters.packets
    assert len(client.state.queue) == 1
    net.release()
    assert client.counter("probe_released") == 1 and not client.state.queue
    assert rec.inbound.counters.packets == before + 1
    assert client.datapath.outbound["tacacs"].sa.spi == child.outbound_spi
    net.run_until(10.0)
    assert client.ike_sas() == [sa] and client.counter("peer_dead") == 0


def test_split_data_path_confirms_silence_with_fresh_inbound_counters(net: Net) -> None:
    """``SaSink.refresh_inbound`` answering later (the split data path): the control
    process's inbound counters may be a second old, so "nothing came back" is asked
    again first; an answer the INBOUND worker saw meanwhile means no probe."""
    client, gw = start(net)
    asked: list[str] = []

    def refresh_later(name: str, spis: list[int]) -> bool:
        asked.append(name)
        return False  # the counts come with Manager.on_inbound_counted

    client.datapath.refresh_inbound = refresh_later  # type: ignore[method-assign]
    net.run_until(5.0)
    client.send(tacacs(client))
    gw.send(tacacs(gw))
    (rec,) = client.state.children
    rec.inbound.counters.packets -= 1  # the control's copy has not seen the answer yet
    net.run_until(5.5)
    assert asked == ["tacacs"] and net.sent("client", INFORMATIONAL) == []
    rec.inbound.counters.packets += 1  # the INBOUND worker's fresh count
    client.manager.on_inbound_counted("tacacs", net.now)
    assert client.counter("silence_probes") == 0
    assert client.datapath.outbound["tacacs"].watch == "tacacs"
    # Unanswered, confirmed: the probe
    net.run_until(6.0)
    client.send(tacacs(client))
    net.run_until(6.5)
    assert asked == ["tacacs", "tacacs"]
    net.call(lambda: client.manager.on_inbound_counted("tacacs", net.now))
    assert client.counter("silence_probes") == 1
    assert net.sent("client", INFORMATIONAL) == [6.5]


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


def _ip(family: int) -> Any:
    """An IPv4 or IPv6 header from scapy (an independent builder, not ours)."""
    if family == socket.AF_INET:
        return IP(src="192.0.2.1", dst="203.0.113.49")
    return IPv6(src="2001:db8:1::1", dst="2001:db8:3::49")


def _tcp(family: int, flags: str, data: bytes = b"") -> bytes:
    return bytes(_ip(family) / TCP(sport=40000, dport=49, flags=flags) / data)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_answer_expected_by_tcp_flags_and_payload(family: int) -> None:
    """SYN (0x02), FIN (0x01) and data are answered; a bare ACK (0x10) and RST (0x04)
    are not (RFC 9293 §3.4, §3.5.2); anything but TCP is assumed to be a request."""
    assert answer_expected(_tcp(family, "S"))
    assert answer_expected(_tcp(family, "FA"))
    assert answer_expected(_tcp(family, "PA", b"tacacs+ body"))
    assert not answer_expected(_tcp(family, "A"))
    assert not answer_expected(_tcp(family, "RA"))
    assert not answer_expected(_tcp(family, "R"))
    assert answer_expected(bytes(_ip(family) / UDP(sport=40000, dport=49) / bytes(8)))
    # IPv4 options (a 24-byte header) move the TCP header: still read right
    opts = bytes(IP(src="192.0.2.1", dst="203.0.113.49", options=[IPOption_NOP()] * 4)
                 / TCP(sport=40000, dport=49, flags="A"))  # fmt: skip
    assert opts[0] & 0x0F == 6 and not answer_expected(opts)
