"""Ordered peers, dead marking, hold-down with backoff, preemption and fail-fast
answers (issues #20 and #15.4/#15.5), with a fake clock and no kernel.

Managers talk through an in-memory network (memnet.py) that delivers IKE and ESP by
destination address at once; a gateway in ``net.down`` neither hears nor sends.
The client is the lab's initiator (198.51.100.1) with ``peers = [A, B]``: A is
the lab's gw (198.51.100.2), B a second gateway (198.51.100.4) in front of the
same server. Answers written "into the TUN" go to a datagram socketpair, so the
test reads the exact bytes the kernel would get, and checks them with scapy.

Timers: the map's default retransmission (2 s first timeout, 3 retries: IKE
gives up 2 + 4 + 8 + 16 = 30 s after the first send).
"""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, IPerror, TCPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, IPerror6, IPv6

import ike
from ipsecmgr import config as cfg
from ipsecmgr.daemon import parse_acls, validate_acl
from ipsecmgr.failover import NOISE_INTERVAL, PREEMPT_GRACE
from ipsecmgr.lab.configs import lab_gateway_config
from ipsecmgr.lab.topology import LabAddresses
from ipsecmgr.peers import HoldDown
from ipsecmgr.reject import icmp_unreachable
from ipsecmgr.trace import Peer, Tracer
from ipsecmgr.trace.render import describe

from .memnet import Net, Side

T = LabAddresses.for_mode("tunnel")
GW_B4 = "198.51.100.4"
GW_B6 = "2001:db8:100::4"


@pytest.fixture
def net(tmp_path: Path) -> Net:
    # Answers are read from the TUN; no on_esp_out hook (see memnet)
    return Net(tmp_path, tun=True, esp_out_hook=False)


def _config(
    net: Net,
    side: str,
    *,
    family: int = 4,
    mode: str = "tunnel",
    local: str | None = None,
    psk: Path | None = None,
    map_options: dict[str, Any] | None = None,
    ike_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    a = LabAddresses.for_mode(mode)
    text = lab_gateway_config(
        a, side, psk_file=psk or net.psk(), management_interface="wan0", family=family,
        ike_options=ike_options,
    )  # fmt: skip
    data = tomllib.loads(text)
    cmap = data["crypto_map"]["tacacs"]
    for key, value in (map_options or {}).items():
        if key == "peers":
            del cmap["peer"]
        cmap[key] = value
    if local is not None:
        data["gateway"]["local_addresses"] = [local]
    return data


def syn(family: int = 4, mode: str = "tunnel", sport: int = 40000, seq: int = 1000) -> bytes:
    a = LabAddresses.for_mode(mode)
    if family == 4:
        src = a.src_ip4 if mode == "tunnel" else a.client_wan4
        pkt: Any = IP(src=src, dst=a.server4, id=7) / TCP(sport=sport, dport=49, seq=seq, flags="S")
    else:
        src = a.src_ip6 if mode == "tunnel" else a.client_wan6
        pkt = IPv6(src=src, dst=a.server6) / TCP(sport=sport, dport=49, seq=seq, flags="S")
    return bytes(pkt)


def two_peers(net: Net, **map_options: Any) -> tuple[Side, Side, Side]:
    psk = net.psk()
    client = net.add(
        "client",
        _config(net, "client", psk=psk, map_options={"peers": [T.gw_wan4, GW_B4], **map_options}),
        T.client_wan4,
    )
    gw_a = net.add("gw_a", _config(net, "gw", psk=psk), T.gw_wan4)
    gw_b = net.add("gw_b", _config(net, "gw", psk=psk, local=GW_B4), GW_B4)
    return client, gw_a, gw_b


# --- HoldDown: the one backoff mechanism ------------------------------------------------


def test_hold_down_doubles_from_one_second_to_sixty_and_resets() -> None:
    h = HoldDown()
    delays = [h.fail(100.0, "x") for _ in range(9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert h.held(159.9) and not h.held(160.0) and h.left(130.0) == 30.0
    h.reset()
    assert (h.failures, h.until, h.held(100.0)) == (0, None, False)
    assert h.fail(200.0, "x") == 1.0


# --- ordered peers, dead marking, failover ----------------------------------------------


def test_map_comes_up_on_the_second_peer_when_the_first_gives_up(net: Net) -> None:
    client, _gw_a, gw_b = two_peers(net)
    net.down.add("gw_a")
    client.send(syn())
    assert net.inits("client", T.gw_wan4) == [0.0]
    net.run_until(29.9)
    assert client.state.status == "connecting" and net.inits("client", GW_B4) == []
    net.run_until(30.0)
    # A gave up 30 s after the first send (2 + 4 + 8 + 16): B is tried at once and,
    # the network being instant, is up at the same instant (within one schedule).
    assert net.inits("client", T.gw_wan4) == [0.0, 2.0, 6.0, 14.0]
    assert net.inits("client", GW_B4) == [30.0]
    assert client.state.status == "established" and gw_b.state.status == "established"
    assert client.state.ike_sa.peer_addr[0] == GW_B4
    assert client.counter("failover") == 1 and client.counter("peer_dead") == 1
    # Traffic now goes to B, encrypted
    client.send(syn(sport=40001))
    assert client.datapath.counters.get("esp_out_packets") == 1
    assert gw_b.tun_packets()[0] == syn(sport=40001)
    rows = client.manager.failover.rows(net.now)["tacacs"]["peers"]
    assert [(r["address"], r["state"], r["active"]) for r in rows] == [
        (T.gw_wan4, "dead", False),
        (GW_B4, "active", True),
    ]
    text = client.show()
    assert "1 198.51.100.2 dead" in text and "2 198.51.100.4 active *" in text
    assert "retry in 1.0 s: dead (IKE gave up: no answer)" in text


def test_a_dpd_failure_fails_over_too(net: Net) -> None:
    client, _gw_a, gw_b = two_peers(net, dpd={"interval": 10, "timeout": 2, "retries": 3})
    client.send(syn())
    assert client.state.ike_sa.peer_addr[0] == T.gw_wan4
    net.down.add("gw_a")
    net.run_until(18.0)  # interval + timeout x (retries + 1)
    assert client.counter("peer_dead") == 1 and client.counter("failover") == 1
    assert client.state.status == "established"
    assert client.state.ike_sa.peer_addr[0] == GW_B4 and gw_b.state.status == "established"


def test_preemption_moves_new_traffic_back_make_before_break(net: Net) -> None:
    client, gw_a, gw_b = two_peers(net)
    net.down.add("gw_a")
    client.send(syn())
    net.run_until(30.0)
    assert client.state.ike_sa.peer_addr[0] == GW_B4
    net.down.discard("gw_a")  # A answers again
    net.run_until(31.0)  # A's hold-down (1 s) is over: a probe, while B carries traffic
    assert net.inits("client", T.gw_wan4)[-1] == 31.0
    assert client.counter("preempt_probes") == 1 and client.counter("preempted") == 1
    assert client.state.ike_sa.peer_addr[0] == T.gw_wan4
    # New packets go to A ...
    client.send(syn(sport=40002))
    assert gw_a.tun_packets() == [syn(sport=40002)]
    # ... while the answer of a transaction that went through B still decrypts
    # (B's IKE SA and its inbound Child SA outlive the switch by PREEMPT_GRACE).
    net.run_until(31.0 + PREEMPT_GRACE - 0.5)
    answer = bytes(IP(src=T.server4, dst=T.src_ip4) / TCP(sport=49, dport=40001, flags="SA"))
    gw_b.send(answer)
    assert client.tun_packets() == [answer]
    assert len([sa for sa in client.manager.endpoint.sas if sa.established]) == 2
    net.run_until(31.0 + PREEMPT_GRACE + 1)
    # Then B's IKE SA is deleted (DELETE sent, answered): only A's remains, both ends
    assert client.counter("backup_sa_retired") == 1
    assert [sa.peer_addr[0] for sa in client.manager.endpoint.sas] == [T.gw_wan4]
    assert gw_b.manager.endpoint.sas == [] and not gw_b.state.children
    rows = client.manager.failover.rows(net.now)["tacacs"]["peers"]
    assert [(r["state"], r["failures"]) for r in rows] == [("active", 0), ("standby", 0)]


def test_without_preempt_the_map_stays_on_the_backup(net: Net) -> None:
    client, _gw_a, _gw_b = two_peers(net, preempt=False)
    net.down.add("gw_a")
    client.send(syn())
    net.run_until(30.0)
    net.down.discard("gw_a")
    net.run_until(120.0)
    assert net.inits("client", T.gw_wan4) == [0.0, 2.0, 6.0, 14.0]
    assert client.state.ike_sa.peer_addr[0] == GW_B4


def test_a_failed_probe_doubles_the_preferred_peers_hold_down(net: Net) -> None:
    client, _gw_a, _gw_b = two_peers(net, retransmission_timeout=500, max_retransmission=1)
    net.down.add("gw_a")
    client.send(syn())
    net.run_until(1.5)  # A: 0, 0.5, gave up at 1.5 -> B
    assert client.state.ike_sa.peer_addr[0] == GW_B4
    net.run_until(20.0)
    # probes at 2.5 (hold 1 s), 2.5 + 1.5 + 2 = 6, 6 + 1.5 + 4 = 11.5, then 11.5 + 1.5 + 8
    assert net.inits("client", T.gw_wan4) == [0.0, 0.5, 2.5, 3.0, 6.0, 6.5, 11.5, 12.0]
    assert client.state.ike_sa.peer_addr[0] == GW_B4 and client.counter("preempted") == 0


# --- hold-down after a refusal (#15.5) ---------------------------------------------------


def _refusing_pair(net: Net, why: str, **client_map: Any) -> tuple[Side, Side]:
    psk = net.psk()
    client_psk = net.psk(b"another-psk-0123456789") if why == "auth" else psk
    cbc = {"encryption": "aes-cbc-256", "integrity": "sha256"}
    ike_options = cbc if why == "proposal" else None
    client = net.add(
        "client",
        _config(net, "client", psk=client_psk, ike_options=ike_options, map_options=client_map),
        T.client_wan4,
    )
    gw_map = {}
    if why == "ts":
        gw_map = {"match_address": "other"}
    gw_data = _config(net, "gw", psk=psk, map_options=gw_map)
    gw_data["access_list"]["other"] = {"rules": [f"permit ip host 203.0.113.50 host {T.src_ip4}"]}
    gw = net.add("gw", gw_data, T.gw_wan4)
    return client, gw


@pytest.mark.parametrize(
    ("why", "error"),
    [
        ("auth", "AUTHENTICATION_FAILED"),
        ("proposal", "NO_PROPOSAL_CHOSEN"),
        ("ts", "TS_UNACCEPTABLE"),
    ],
)
def test_a_refused_map_backs_off_instead_of_a_handshake_per_packet(
    net: Net, why: str, error: str
) -> None:
    client, _gw = _refusing_pair(net, why)
    # The client retransmits its SYN about once a second (and other logins come):
    # one packet every 0.5 s for 40 s.
    for i in range(81):
        net.run_until(i * 0.5)
        client.send(syn(sport=40000 + i))
    # One handshake, then 1 s, 2 s, 4 s, 8 s, 16 s hold-downs (not 81 handshakes). A
    # refused Child SA (TS_UNACCEPTABLE) leaves the IKE SA up: CREATE_CHILD_SA retries.
    assert net.inits("client", child=True) == [0.0, 1.0, 3.0, 7.0, 15.0, 31.0]
    assert client.counter("hold_down_drops") == 81 - 6
    assert client.counter("peer_hold_downs") == 6
    assert client.datapath.counters.get("esp_out_packets") is None  # never sent, in clear or not
    assert client.manager.map_status(net.now) == {"tacacs": "hold-down"}
    text = client.show()
    assert "Hold-down            : 23.0 s left (" + error in text
    assert "Status               : Hold-down" in text


def test_hold_down_is_reset_by_clear_sighup_and_success(net: Net) -> None:
    client, gw = _refusing_pair(net, "auth")
    client.send(syn())
    net.run_until(0.5)
    client.send(syn(sport=40001))
    assert net.inits("client") == [0.0] and client.counter("hold_down_drops") == 1
    client.manager.clear(net.now)  # clear crypto
    client.send(syn(sport=40002))
    assert net.inits("client") == [0.0, 0.5]
    # SIGHUP with the same map: kept, but its hold-down ends
    acls = parse_acls(client.config)
    client.manager.reconfigure(client.config, acls, {"tacacs"}, net.now)
    client.send(syn(sport=40003))
    assert net.inits("client") == [0.0, 0.5, 0.5]
    # Success resets the backoff: the gw learns the client's PSK
    gw.manager.endpoint.configs[0].local_psk = client.state.ike_config.local_psk
    gw.manager.endpoint.configs[0].remote_psk = client.state.ike_config.peer_psk
    net.run_until(20.0)
    client.send(syn(sport=40004))
    assert client.state.status == "established"
    assert client.state.peers.peers[0].hold.failures == 0
    assert client.manager.map_status(net.now) == {"tacacs": "up"}


# --- fail fast to the client --------------------------------------------------------------


def _dead_single(net: Net, family: int = 4, mode: str = "tunnel", **map_options: Any) -> Side:
    a = LabAddresses.for_mode(mode)
    local = a.client_wan6 if family == 6 else a.client_wan4
    client = net.add(
        "client",
        _config(net, "client", family=family, mode=mode, map_options=map_options),
        local,
    )
    client.send(syn(family, mode))
    net.run_until(30.0)  # the only peer gave up: hold-down 1 s
    assert client.manager.map_status(net.now) == {"tacacs": "dead"}
    assert client.manager.failover.rows(net.now)["tacacs"]["hold_down_left"] == 1.0
    assert client.tun_packets() == []  # the first SYN: IKE had not failed yet
    return client


def test_icmp_admin_prohibited_answers_a_syn_when_no_peer_is_reachable(net: Net) -> None:
    client = _dead_single(net)
    packet = syn(seq=4242)
    client.send(packet)
    (reply,) = client.tun_packets()
    ip = IP(reply)
    assert (ip.src, ip.dst, ip.proto, ip.ttl) == (T.server4, T.src_ip4, 1, 64)
    assert (ip[ICMP].type, ip[ICMP].code) == (3, 13)  # RFC 1812 §5.2.7.1
    assert bytes(ip[IPerror]) == packet  # the whole SYN quoted (under 576 bytes)
    assert ip[IPerror][TCPerror].seq == 4242
    # checksums as scapy computes them
    fresh = IP(bytes(ip))
    del fresh.chksum, fresh[ICMP].chksum
    assert bytes(IP(bytes(fresh))) == reply
    assert client.counter("unreachable_icmp_sent") == 1
    assert client.counter("hold_down_drops") == 1


def test_rst_answers_a_syn_when_configured(net: Net) -> None:
    client = _dead_single(net, on_unreachable="rst")
    client.send(syn(sport=40123, seq=0xFFFFFFFF))
    (reply,) = client.tun_packets()
    ip = IP(reply)
    tcp = ip[TCP]
    assert (ip.src, ip.dst, tcp.sport, tcp.dport) == (T.server4, T.src_ip4, 49, 40123)
    # RFC 9293 §3.10.7.1: SEQ 0, ACK = SEG.SEQ + 1 (the SYN), RST+ACK
    assert (tcp.seq, tcp.ack, str(tcp.flags)) == (0, 0, "RA")
    fresh = IP(reply)
    del fresh.chksum, fresh[TCP].chksum
    assert bytes(IP(bytes(fresh))) == reply
    assert client.counter("unreachable_rst_sent") == 1
    # An ACK (not a SYN) gets no RST
    client.send(bytes(IP(src=T.src_ip4, dst=T.server4) / TCP(sport=40123, dport=49, flags="A")))
    assert client.tun_packets() == [] and client.counter("unreachable_not_answered") == 1


def test_drop_answers_nothing_but_counts(net: Net) -> None:
    client = _dead_single(net, on_unreachable="drop")
    client.send(syn())
    assert client.tun_packets() == [] and client.counter("hold_down_drops") == 1


def test_ipv6_gets_icmpv6_admin_prohibited(net: Net) -> None:
    client = _dead_single(net, family=6)
    packet = syn(6)
    client.send(packet)
    (reply,) = client.tun_packets()
    ip6 = IPv6(reply)
    assert (ip6.src, ip6.dst, ip6.nh, ip6.hlim) == (T.server6, T.src_ip6, 58, 64)
    assert (ip6[ICMPv6DestUnreach].type, ip6[ICMPv6DestUnreach].code) == (1, 1)  # RFC 4443
    assert bytes(ip6[IPerror6]) == packet
    fresh = IPv6(reply)
    del fresh[ICMPv6DestUnreach].cksum
    assert bytes(IPv6(bytes(fresh))) == reply


def test_ipv6_rst(net: Net) -> None:
    client = _dead_single(net, family=6, on_unreachable="rst")
    client.send(syn(6, seq=77))
    (reply,) = client.tun_packets()
    ip6 = IPv6(reply)
    assert (ip6[TCP].ack, str(ip6[TCP].flags), ip6[TCP].dport) == (78, "RA", 40000)
    fresh = IPv6(reply)
    del fresh[TCP].chksum
    assert bytes(IPv6(bytes(fresh))) == reply


@pytest.mark.parametrize("family", [4, 6])
def test_transport_mode_answers_from_the_server_itself(net: Net, family: int) -> None:
    a = LabAddresses.for_mode("transport")
    client = _dead_single(net, family=family, mode="transport")
    client.send(syn(family, "transport"))
    (reply,) = client.tun_packets()
    if family == 4:
        assert (IP(reply).src, IP(reply).dst, IP(reply)[ICMP].code) == (
            a.server4, a.client_wan4, 13,
        )  # fmt: skip
    else:
        assert (IPv6(reply).src, IPv6(reply)[ICMPv6DestUnreach].code) == (a.server6, 1)


def test_answers_are_rate_limited(net: Net) -> None:
    client = _dead_single(net)
    for i in range(25):  # a burst at one instant
        client.send(syn(sport=41000 + i))
    assert len(client.tun_packets()) == 10
    assert client.counter("unreachable_rate_limited") == 15
    net.run_until(net.now + 0.5)  # 10 per second: 5 more tokens
    for i in range(10):
        client.send(syn(sport=42000 + i))
    assert len(client.tun_packets()) == 5
    assert client.counter("hold_down_drops") == 35


def test_first_packet_drop_is_answered_once_ike_has_failed(net: Net) -> None:
    client = _dead_single(net)
    net.run_until(31.5)  # hold-down over: the next SYN starts IKE again ...
    client.send(syn(sport=40077))
    assert net.inits("client")[-1] == 31.5
    # ... and, IKE having failed once, the dropped SYN is answered at once
    (reply,) = client.tun_packets()
    assert IP(reply)[ICMP].code == 13 and IP(reply)[IPerror][TCPerror].sport == 40077
    assert client.counter("first_packet_drops") == 2


def test_icmp_errors_multicast_and_fragments_are_never_answered() -> None:
    from ipsecmgr.reject import tcp_rst_for_syn

    err = bytes(IP(src=T.src_ip4, dst=T.server4) / ICMP(type=3, code=1) / IP() / TCP())
    assert icmp_unreachable(err) is None
    echo = bytes(IP(src=T.src_ip4, dst=T.server4) / ICMP(type=8))
    assert icmp_unreachable(echo) is not None
    assert icmp_unreachable(bytes(IP(src=T.src_ip4, dst="224.0.0.5") / TCP())) is None
    frag = bytes(IP(src=T.src_ip4, dst=T.server4, frag=10) / TCP(flags="S"))
    assert icmp_unreachable(frag) is None and tcp_rst_for_syn(frag) is None
    err6 = bytes(IPv6(src=T.src_ip6, dst=T.server6) / ICMPv6DestUnreach() / IPv6())
    assert icmp_unreachable(err6) is None
    assert icmp_unreachable(b"\x45\x00") is None and icmp_unreachable(b"") is None


# --- unauthenticated noise (#15.4) ------------------------------------------------------------


def _rogue_handshake(net: Net, gw: Side, config: ike.IkeConfig) -> None:
    """An initiator with ``config`` at the client's address talks to gw until done."""
    rogue = ike.IkeSA(config, True, os.urandom)
    rogue.initiate(net.now)
    answers: list[bytes] = []
    send = gw.manager.send
    gw.manager.send = lambda data, peer, local: answers.append(data)  # type: ignore[method-assign]
    try:
        for _ in range(4):
            for data, _peer in rogue.datagrams_to_send(net.now):
                gw.manager.on_ike_datagram(data, (T.gw_wan4, 500), (T.client_wan4, 500), net.now)
            for data in answers:
                rogue.receive_datagram(data, (T.gw_wan4, 500), net.now)
            answers.clear()
    finally:
        gw.manager.send = send  # type: ignore[method-assign]


def test_unauthenticated_errors_are_rate_limited_and_never_the_last_error_while_up(
    net: Net, caplog: pytest.LogCaptureFixture
) -> None:
    psk = net.psk()
    client = net.add("client", _config(net, "client", psk=psk), T.client_wan4)
    gw = net.add("gw", _config(net, "gw", psk=psk), T.gw_wan4)
    client.send(syn())  # the tunnel is up
    assert gw.state.status == "established"
    base = client.state.ike_config
    wrong_psk = ike.IkeConfig(**{**base.__dict__, "local_psk": b"guessed-psk-000000"})
    unknown = ike.IkeProposal(
        ike.EncrId.AES_CBC, 128, ike.PrfId.HMAC_SHA2_512, ike.IntegId.HMAC_SHA2_512_256,
        ike.DhGroup.ECP_256,
    )  # fmt: skip
    no_proposal = ike.IkeConfig(**{**base.__dict__, "ike_proposals": (unknown,)})
    caplog.set_level(logging.WARNING, logger="ipsecmgr.ike")
    for i in range(20):
        _rogue_handshake(net, gw, wrong_psk if i % 2 else no_proposal)
    assert gw.counter("unauthenticated_errors") == 20
    assert gw.counter("unauthenticated_log_suppressed") == 19
    assert gw.state.status == "established" and gw.manager.map_errors() == {}
    lines = [r.getMessage() for r in caplog.records if "unauthenticated" in r.getMessage()]
    assert len(lines) == 1 and "failed: we sent NO_PROPOSAL_CHOSEN (we accepted none" in lines[0]
    net.run_until(NOISE_INTERVAL + 0.1)
    lines = [r.getMessage() for r in caplog.records if "unauthenticated" in r.getMessage()]
    assert len(lines) == 2 and "19 more unauthenticated IKE errors" in lines[1]
    # The tunnel still works
    client.send(syn(sport=40999))
    assert gw.tun_packets()[-1] == syn(sport=40999)


def test_unauthenticated_error_is_the_last_error_of_a_map_that_is_down(net: Net) -> None:
    psk = net.psk()
    client = net.add("client", _config(net, "client", psk=psk), T.client_wan4)
    gw = net.add("gw", _config(net, "gw", psk=psk), T.gw_wan4)
    base = client.state.ike_config
    _rogue_handshake(net, gw, ike.IkeConfig(**{**base.__dict__, "local_psk": b"x" * 20}))
    assert gw.manager.map_errors()["tacacs"].startswith("AUTHENTICATION_FAILED")


def test_config_peers_keys(tmp_path: Path) -> None:
    net = Net(tmp_path, tun=True, esp_out_hook=False)
    data = _config(net, "client", map_options={"peers": [T.gw_wan4, GW_B4], "preempt": False})
    diag = cfg.parse_config(data, base_dir=tmp_path, validate_acl=validate_acl)
    assert diag.config is not None
    m = diag.config.crypto_maps["tacacs"]
    assert [str(p) for p in m.peers] == [T.gw_wan4, GW_B4] and str(m.peer) == T.gw_wan4
    assert (m.preempt, m.on_unreachable) == (False, "icmp")
    bad = _config(net, "client", map_options={"peers": [T.gw_wan4, T.gw_wan4, GW_B6]})
    bad["crypto_map"]["tacacs"]["peer"] = T.gw_wan4
    bad["crypto_map"]["tacacs"]["on_unreachable"] = "reject"
    errors = cfg.parse_config(bad, base_dir=tmp_path, validate_acl=validate_acl).errors
    assert "crypto_map.tacacs.peers: give either peer or peers, not both" in errors
    assert f"crypto_map.tacacs.peers[1]: {T.gw_wan4} is listed twice" in errors
    assert any(e.startswith(f"crypto_map.tacacs.peers: IPv6 peer {GW_B6} but") for e in errors)
    assert any(e.startswith("crypto_map.tacacs.on_unreachable: 'reject'") for e in errors)


# --- trace: the answer is its own step ----------------------------------------------------


def test_trace_shows_the_hold_down_drop_and_the_answer_as_step_5b(net: Net) -> None:
    client = _dead_single(net)
    peers = {str(client.state.cmap.peer): Peer(str(client.state.cmap.local_address), "tacacs")}
    tracer = Tracer([client.datapath, client.manager], peers)
    sub = tracer.subscribe({})
    packet = syn(sport=40555)
    client.send(packet)
    events = []
    while not sub.queue.empty():
        item = sub.queue.get_nowait()
        if item is not None:
            events.append(item)
    steps = [(e["step"], e["event"]) for e in events]
    assert steps == [
        ("3a", "acl_match"),
        ("5", "hold_down_dropped"),
        ("5b", "unreachable_answered"),
    ]
    answered = events[-1]
    assert answered["flow"] == events[0]["flow"]  # the SYN's flow
    assert answered["answer"] == "icmp" and bytes.fromhex(answered["reply"]) == (
        icmp_unreachable(packet)
    )
    assert describe(answered).startswith(
        "IpsecMgr: ICMP unreachable, administratively prohibited written back into the TUN"
    )
    assert "dropped, no IKE started: every peer dead or held down" in describe(events[1])
