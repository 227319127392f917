"""Heartbeats, dead-peer detection, rekeys and takeovers with a fake clock.

Two (or three) :class:`Manager` objects talk through an in-memory network (memnet.py):
IKE datagrams and ESP packets are delivered at once, nothing reads a clock,
and every assertion names the exact time at which something went on the wire.
The client is the lab's initiator (198.51.100.1), gw its responder
(198.51.100.2); a "standby" client has the same address and configuration.

Timers used below (unless a test says otherwise): ``dpd = {interval = 10,
timeout = 2, retries = 3}``, the engine's rekey jitter fixed at half its range
(``Manager(jitter=lambda: 0.5)`` puts that source into every IKE config: a soft
lifetime 2.5 % of the lifetime earlier than the engine's share).
"""

from __future__ import annotations

import logging
import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ike import IkeSA
from ike.constants import ExchangeType
from ipsecmgr.lab.configs import lab_gateway_config
from ipsecmgr.lab.topology import LabAddresses
from ipsecmgr.packets import build_ip_header

from .memnet import Net, Side

A = LabAddresses.for_mode("tunnel")
DPD = {"interval": 10, "timeout": 2, "retries": 3}
INFORMATIONAL = ExchangeType.INFORMATIONAL
CREATE_CHILD_SA = ExchangeType.CREATE_CHILD_SA
IKE_SA_INIT = ExchangeType.IKE_SA_INIT


def add(net: Net, name: str, role: str, **options: Any) -> Side:
    """A lab gateway: ``role`` "client" (the initiator) or "gw"; ``options`` go to
    :func:`lab_gateway_config`, the map's ``dpd`` being :data:`DPD` unless given."""
    options.setdefault("map_options", {})
    options["map_options"] = {"dpd": DPD, **options["map_options"]}
    text = lab_gateway_config(
        A, "client" if role == "client" else "gw", psk_file=net.psk(),
        management_interface="wan0", **options,
    )  # fmt: skip
    address = A.client_wan4 if role == "client" else A.gw_wan4
    return net.add(name, tomllib.loads(text), address)


def tacacs(side: Side) -> bytes:
    """A TACACS+ segment in the protected direction of ``side``."""
    client = side.address == A.client_wan4
    src, dst = (A.src_ip4, A.server4) if client else (A.server4, A.src_ip4)
    assert src is not None
    ports = (40000, 49) if client else (49, 40000)
    tcp = ports[0].to_bytes(2, "big") + ports[1].to_bytes(2, "big") + bytes(16)
    return (
        build_ip_header(socket.AF_INET, socket.inet_aton(src), socket.inet_aton(dst), 6, len(tcp))
        + tcp
    )


def establish(net: Net) -> tuple[Side, Side]:
    """The first TACACS+ packet at t = 0 brings the tunnel up (reference steps 4-5)."""
    client, gw = net.sides["client"], net.sides["gw"]
    client.send(tacacs(client))
    assert client.state.status == "established" and gw.state.status == "established"
    assert client.counter("first_packet_drops") == 1
    return client, gw


@pytest.fixture
def net(tmp_path: Path) -> Net:
    # The daemon's on_esp_out wiring; no TUN (see memnet)
    return Net(tmp_path, tun=False, esp_out_hook=True)


def pair(net: Net, **options: Any) -> tuple[Side, Side]:
    add(net, "client", "client", **options)
    add(net, "gw", "gw", **options)
    return establish(net)


# --- heartbeat (RFC 7296 §2.4) --------------------------------------------------------


def test_heartbeat_every_interval_when_nothing_arrives(net: Net) -> None:
    client, _gw = pair(net)
    net.run_until(35.0)
    # Both sides are idle: each sends an empty INFORMATIONAL every interval, and
    # each request (and answer) counts as "heard" for the other side.
    assert net.sent("client", INFORMATIONAL) == [10.0, 20.0, 30.0]
    assert net.sent("gw", INFORMATIONAL) == [10.0, 20.0, 30.0]
    assert net.sent("client", INFORMATIONAL, response=True) == [10.0, 20.0, 30.0]
    assert client.counter("liveness_checks") == 3
    assert client.state.status == "established"


def test_inbound_esp_suppresses_the_heartbeat(net: Net) -> None:
    client, gw = pair(net)
    gw.manager.liveness.clear()  # only the client's heartbeats are looked at here
    # The server side answers every second until t = 20: the client hears ESP.
    for t in range(1, 21):
        net.run_until(float(t))
        gw.send(tacacs(gw))
    net.run_until(45.0)
    # The client looks at its inbound counters every interval/10 = 1 s (the timer
    # at t fires before that second's packet): the last look that saw a new packet
    # is t = 21, so the heartbeat leaves at 21 + 10 = 31 (the last packet +
    # interval + at most interval/10), then 41.
    assert net.sent("client", INFORMATIONAL) == [31.0, 41.0]
    assert client.state.children and client.counter("liveness_checks") == 2


def test_the_peers_requests_count_as_heard(net: Net) -> None:
    add(net, "client", "client", map_options={"dpd": {**DPD, "interval": 15}})
    add(net, "gw", "gw")
    establish(net)
    net.run_until(44.0)
    # gw (interval 10) asks at 10, 20, 30, 40; each request is an authenticated
    # message from the peer, so the client (interval 15) never needs to ask.
    assert net.sent("gw", INFORMATIONAL) == [10.0, 20.0, 30.0, 40.0]
    assert net.sent("client", INFORMATIONAL) == []
    net.sides["gw"].manager.liveness.clear()  # gw stops asking: the client asks 15 s later
    net.run_until(60.0)
    assert net.sent("client", INFORMATIONAL) == [55.0]


def test_one_deadline_per_map_the_first_of_its_looks(net: Net) -> None:
    """A map's liveness looks (interval/10 = 1 s) and volume looks (5 s: no volume
    lifetimes, the sequence number only) share one deadline, the earlier of the two."""
    client, _gw = pair(net)
    m, state = client.manager, client.state
    assert list(m.looks) == [state] and m.looks.get(state) == 1.0
    assert not m.deadlines  # (no NAT keepalive, lingering SPI or silence check)
    assert state.volume_at == 5.0
    m.liveness.clear()  # no liveness looks any more: the volume look is next
    net.run_until(1.0)
    assert m.looks.get(state) == 5.0
    net.run_until(5.0)
    assert m.looks.get(state) == 10.0 and state.volume_at == 10.0


# --- dead peer ----------------------------------------------------------------------------


def test_dead_peer_declared_after_interval_plus_timeout_times_retries_plus_one(
    net: Net,
) -> None:
    client, _gw = pair(net)
    net.down.add("gw")  # SIGKILL: gw never answers again
    net.run_until(17.9)
    assert client.state.status == "established"
    net.run_until(18.0)
    assert client.state.status == "dead"
    net.run_until(30.0)
    # Heartbeat at 10, resent every timeout (2 s) 3 times, dead 2 s after the last:
    # interval + timeout × (retries + 1) = 18
    assert net.sent("client", INFORMATIONAL) == [10.0, 12.0, 14.0, 16.0]
    assert client.counter("peer_dead") == 1
    assert client.state.status == "dead"
    assert client.manager.map_status() == {"tacacs": "dead"}
    assert client.state.ike_sa is None and not client.state.children
    assert not client.datapath.outbound and not client.manager.liveness
    assert client.manager.endpoint.sas == []
    # The next TACACS+ packet starts a new IKE SA (first packet policy: dropped).
    net.down.discard("gw")
    net.run_until(40.0)
    client.send(tacacs(client))
    assert net.sent("client", IKE_SA_INIT) == [0.0, 40.0]
    assert client.counter("first_packet_drops") == 2
    assert client.state.status == "established"
    client.send(tacacs(client))
    assert client.datapath.counters.get("esp_out_packets") == 1


def test_dead_time_is_exact_when_the_peer_dies_mid_interval(net: Net) -> None:
    client, _gw = pair(net, map_options={"dpd": {"interval": 5, "timeout": 1, "retries": 2}})
    net.run_until(7.0)  # heartbeats at 5 both ways
    net.down.add("gw")
    net.run_until(20.0)
    assert net.sent("client", INFORMATIONAL) == [5.0, 10.0, 11.0, 12.0]
    dead = [s for s in net.log if s.side == "client" and s.time > 12.0]
    assert dead == [] and client.state.status == "dead"  # dead at 13 = 10 + 1 × (2 + 1)


# --- rekeying -------------------------------------------------------------------------------


def test_child_rekey_once_at_the_engines_soft_lifetime_minus_jitter(net: Net) -> None:
    client, gw = pair(net, ipsec_options={"lifetime_seconds": 100})
    client.send(tacacs(client))
    net.run_until(99.0)
    # The engine's share for the original initiator is 90 %; jitter takes 2.5 %
    # (0.5 × 5 %) of 100 s off: 87.5. gw (93 % - 2.5 % = 90.5) has nothing left to do.
    assert net.sent("client", CREATE_CHILD_SA) == [87.5]
    assert net.sent("gw", CREATE_CHILD_SA) == []
    assert client.counter("child_rekeyed") == 1 and gw.counter("child_rekeyed") == 1
    # Make-before-break done: one Child SA each side, traffic on the new one.
    assert len(client.state.children) == 1 and len(gw.state.children) == 1
    (rec,) = client.state.children
    assert client.datapath.outbound["tacacs"].sa is rec.outbound
    client.send(tacacs(client))
    (gw_rec,) = gw.state.children
    assert gw_rec.inbound.counters.packets == 1


def test_make_before_break_old_inbound_sa_decrypts_until_the_peer_switches(
    net: Net,
) -> None:
    client, gw = pair(net, ipsec_options={"lifetime_seconds": 100})
    (old,) = client.state.children
    (gw_old,) = gw.state.children
    net.run_until(87.0)
    net.hold.add("gw")  # gw's IKE answers are late
    net.run_until(87.5)
    #   CREATE_CHILD_SA { N(REKEY_SA), SA, Ni, [KEi,] TSi, TSr } -->  (client, 87.5)
    #   <-- CREATE_CHILD_SA { SA, Nr, TSi, TSr }                      (held)
    assert net.sent("client", CREATE_CHILD_SA) == [87.5] and len(gw.state.children) == 2
    # Oldest first: the new Child SA is the last one; each is found by its IKE SA and id
    first, second = gw.state.children
    assert first is gw_old and second.ike_name == gw_old.ike_name
    assert second.child_id != gw_old.child_id
    assert gw.state.child(second.ike_name, second.child_id) is second
    assert gw.state.child(gw_old.ike_name, gw_old.child_id) is gw_old
    # gw answered but the client has not seen the new SA: gw keeps sending on the
    # old one, which the client still decrypts; the client also still sends on its old one.
    gw.send(tacacs(gw))
    client.send(tacacs(client))
    assert old.inbound.counters.packets == 1 and gw_old.inbound.counters.packets == 1
    assert gw.counter("rekey_send_deferred") == 1
    #   <-- answer;  INFORMATIONAL { D(ESP, old) } -->  <-- { D(ESP, old) }
    net.release()
    (new,) = client.state.children
    (gw_new,) = gw.state.children
    assert new is not old and gw_new is not gw_old
    assert gw.datapath.outbound["tacacs"].sa is gw_new.outbound
    gw.send(tacacs(gw))
    client.send(tacacs(client))
    assert new.inbound.counters.packets == 1 and gw_new.inbound.counters.packets == 1
    assert client.datapath.counters.get("esp_unknown_spi") is None
    assert gw.datapath.counters.get("esp_unknown_spi") is None
    # A packet gw sent on the old SA just before it saw the DELETE, read by the
    # client after the DELETE's answer (another socket): still decrypted, for 1 s.
    late = gw_old.outbound.encapsulate(tacacs(gw), 4)
    src = socket.inet_aton(gw.address)
    client.datapath.handle_inbound(late, src, b"", socket.AF_INET)
    assert old.inbound.counters.packets == 2
    net.run_until(net.now + 1.0)
    client.datapath.handle_inbound(
        gw_old.outbound.encapsulate(tacacs(gw), 4), src, b"", socket.AF_INET
    )
    assert old.inbound.counters.packets == 2
    assert client.datapath.counters.get("esp_unknown_spi") == 1


def test_ike_rekey_moves_the_child_sas(net: Net) -> None:
    client, _gw = pair(net, ike_options={"lifetime": 200})
    (child_before,) = client.state.children
    spi_before = client.state.ike_sa.spi_i
    net.run_until(199.0)
    # 90 % of 200 s minus 2.5 % jitter: 175
    assert net.sent("client", CREATE_CHILD_SA) == [175.0]
    assert client.counter("ike_rekeyed") == 1
    assert client.state.ike_sa.spi_i != spi_before
    (child_after,) = client.state.children
    assert child_after is child_before  # the Child SA lives on under the new IKE SA
    client.send(tacacs(client))
    assert child_before.outbound.counters.packets == 1


def test_rekey_lazy_lets_an_idle_child_expire_and_the_next_packet_recreates_it(
    net: Net,
) -> None:
    client, _gw = pair(net, ipsec_options={"lifetime_seconds": 100, "rekey": "lazy"})
    net.run_until(99.0)
    assert net.sent("client", CREATE_CHILD_SA) == []
    assert client.counter("child_lazy_expiry") == 1
    net.run_until(101.0)
    # Hard lifetime 100 s: the engine deletes it (both sides have the same lifetime).
    assert not client.state.children and client.state.status == "established"
    client.send(tacacs(client))
    assert net.sent("client", CREATE_CHILD_SA) == [101.0]
    assert net.sent("client", IKE_SA_INIT) == [0.0]  # the IKE SA stayed
    assert client.counter("child_created_on_demand") == 1 and client.state.children


def test_rekey_lazy_still_rekeys_an_sa_that_carried_traffic(net: Net) -> None:
    client, _gw = pair(net, ipsec_options={"lifetime_seconds": 100, "rekey": "lazy"})
    client.send(tacacs(client))
    net.run_until(99.0)
    assert net.sent("client", CREATE_CHILD_SA) == [87.5]


def test_packet_soft_limit_rekeys_before_the_hard_one(net: Net) -> None:
    client, _gw = pair(net, ipsec_options={"lifetime_packets": 100})
    # soft = 100 × (90 % - 2.5 %) = 87 packets; checked once a second
    for _ in range(86):
        client.send(tacacs(client))
    net.run_until(5.0)
    assert net.sent("client", CREATE_CHILD_SA) == []
    client.send(tacacs(client))
    net.run_until(5.5)
    assert net.sent("client", CREATE_CHILD_SA) == []
    net.run_until(6.0)
    assert net.sent("client", CREATE_CHILD_SA) == [6.0]
    assert client.counter("child_rekey_volume") == 1
    (rec,) = client.state.children
    assert rec.outbound.counters.packets == 0  # the new SA


def test_byte_hard_limit_deletes_the_child(net: Net) -> None:
    client, _gw = pair(net, ipsec_options={"lifetime_bytes": 400})
    for _ in range(10):  # 40 bytes each: the hard limit is reached between two looks
        client.send(tacacs(client))
    # soft (348 bytes) and hard (400) are both reached before the first look: hard wins
    net.run_until(1.0)
    assert client.counter("child_hard_expired") == 1
    assert not client.state.children and not client.datapath.outbound


def test_sequence_number_soft_limit_triggers_a_rekey(net: Net) -> None:
    client, _gw = pair(net)
    (rec,) = client.state.children
    # RFC 4303 §3.3.3: never wrap; the SA reports soft expiry at soft_seq
    rec.outbound.next_seq = rec.outbound.soft_seq
    client.send(tacacs(client))
    net.run_until(4.9)
    assert net.sent("client", CREATE_CHILD_SA) == []
    net.run_until(5.0)  # the sequence number is looked at every 5 s
    assert net.sent("client", CREATE_CHILD_SA) == [5.0]
    assert client.counter("child_rekey_volume") == 1


# --- clear, SIGTERM, INITIAL_CONTACT ---------------------------------------------------------


def test_clear_sends_delete_and_the_peer_cleans_up_at_once(net: Net) -> None:
    client, gw = pair(net)
    assert client.manager.clear(net.now) == 1
    net.flush()
    assert net.sent("client", INFORMATIONAL) == [0.0]
    assert gw.state.ike_sa is None and not gw.state.children and not gw.datapath.outbound
    assert gw.manager.endpoint.sas == [] and gw.state.status == "idle"


def standby_takeover(net: Net, at: float, **options: Any) -> Side:
    net.run_until(at)
    net.down.add("client")  # the Active is killed
    standby = add(net, "standby", "client", **options)
    net.takeover("standby")  # it answers on the client's address
    standby.send(tacacs(standby))
    assert standby.state.status == "established"
    return standby


def test_takeover_with_initial_contact_replaces_the_stale_sa_at_once(net: Net) -> None:
    _client, gw = pair(net)
    (old,) = gw.ike_sas()
    standby = standby_takeover(net, 5.0)
    assert gw.ike_sas() != [old] and len(gw.ike_sas()) == 1
    assert gw.manager.endpoint.counters.get("replaced_by_initial_contact") == 1
    assert len(gw.state.children) == 1
    standby.send(tacacs(standby))
    (rec,) = gw.state.children
    assert rec.inbound.counters.packets == 1


def test_takeover_without_initial_contact_is_cleared_by_dead_peer_detection(net: Net) -> None:
    _client, gw = pair(net, map_options={"initial_contact": False})
    (old,) = gw.ike_sas()
    standby = standby_takeover(net, 5.0, map_options={"initial_contact": False})
    assert old in gw.ike_sas() and len(gw.ike_sas()) == 2
    # New traffic flows on the new SA already (its Child SA is the outbound one).
    standby.send(tacacs(standby))
    net.run_until(17.9)
    assert old in gw.ike_sas()
    # The stale SA was last heard at 0: heartbeat at 10, resent at 12, 14, 16 (the
    # standby does not know its SPIs), dead at 18. The new one is not disturbed.
    net.run_until(18.0)
    assert old not in gw.ike_sas() and len(gw.ike_sas()) == 1
    assert gw.counter("peer_dead") == 1
    assert gw.state.children and gw.state.ike_sa is gw.ike_sas()[0]
    assert gw.manager.map_status() == {"tacacs": "up"}


def test_initial_contact_spares_the_peers_other_handshakes_in_flight(net: Net) -> None:
    """Two IKE SAs of the same peer are set up at once, both with INITIAL_CONTACT
    (RFC 7296 §2.4; a load generator, or a peer with several connections):

        A: IKE_SA_INIT -->   <-- IKE_SA_INIT
        B: IKE_SA_INIT -->   <-- IKE_SA_INIT    (B half-open at gw)
        A: IKE_AUTH { N(INITIAL_CONTACT) ... } -->   <-- IKE_AUTH
        B: IKE_AUTH { N(INITIAL_CONTACT) ... } -->   <-- IKE_AUTH   (B was not authenticated
                                                                     when A's arrived: kept)
    """
    client = add(net, "client", "client")  # only for its configuration
    gw = add(net, "gw", "gw")
    a, b = (IkeSA(client.state.ike_config, True) for _ in range(2))

    def exchange(sa: IkeSA) -> None:
        for data, _ in sa.datagrams_to_send(net.now):
            gw.manager.on_ike_datagram(data, (gw.address, 500), (client.address, 500), net.now)
        answers, net.queue = net.queue, []
        for _, sender, _, data in answers:
            assert sender == "gw"
            sa.receive_datagram(data, (gw.address, 500), net.now)

    for sa in (a, b):
        sa.initiate(net.now)
        exchange(sa)  # IKE_SA_INIT
    exchange(a)  # IKE_AUTH with INITIAL_CONTACT
    assert a.established
    exchange(b)  # B's IKE_AUTH finds its SA and is answered
    assert b.established
    assert gw.manager.endpoint.counters.get("unknown_spi") is None
    # Now B's INITIAL_CONTACT replaced A (established): one IKE SA, one Child SA, B's.
    assert [sa.spi_i for sa in gw.ike_sas()] == [b.spi_i]
    assert gw.manager.endpoint.counters["replaced_by_initial_contact"] == 1
    (rec,) = gw.state.children
    assert rec.ike_name == gw.ike_sas()[0].name and gw.state.ike_sa is gw.ike_sas()[0]


@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING])
def test_one_line_per_ike_message_only_when_the_log_shows_it(
    net: Net, caplog: pytest.LogCaptureFixture, level: int
) -> None:
    """-v (INFO): a line per IKE message, as pyikev2/strongSwan log them. Without -v the
    engine is given no log hook, so it does not even build those lines."""
    with caplog.at_level(level, logger="ipsecmgr.ike"):
        pair(net)
    lines = [r.getMessage() for r in caplog.records if r.name == "ipsecmgr.ike"]
    sent = [x for x in lines if ": sending IKE_" in x]
    if level == logging.INFO:
        assert net.sides["gw"].manager.endpoint.log is not None
        assert any("sending IKE_AUTH response 1 [ IDr AUTH SA TSi TSr ]" in x for x in sent)
        assert len(sent) == 4  # both sides: IKE_SA_INIT and IKE_AUTH, request or response
    else:
        assert net.sides["gw"].manager.endpoint.log is None and not lines
