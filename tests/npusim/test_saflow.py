"""SA-flow table: SPI lookup (step 9) and the inbound policy check (step 10,
RFC 4301 §5.2)."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.layers.ipsec import ESP
from scapy.packet import Raw

from npusim import GLOBAL, Classifier, CryptoMap, SaFlow, SaFlowTable, TrafficSelector, parse_acl
from npusim.packet import PORTS_OK, PORTS_TRUNCATED

SERVER = "209.165.201.1"
CLIENT = "209.165.200.225"


class FakeSA:
    """Stands in for esp.InboundSA: the table must not care what it holds."""


def tunnel_table() -> tuple[SaFlowTable, FakeSA]:
    table = SaFlowTable()
    sa = FakeSA()
    # Inbound: the server (remote) talks to the client (local), TACACS+ only.
    table.add(
        0x1000,
        sa,
        src_selectors=[TrafficSelector.from_prefix(SERVER, protocol=6, ports=(49, 49))],
        dst_selectors=[TrafficSelector.from_prefix(CLIENT, protocol=6)],
        crypto_map="foo",
    )
    return table, sa


def test_lookup_known_and_unknown_spi() -> None:
    table, sa = tunnel_table()
    flow = table.lookup(0x1000)
    assert flow is not None and flow.sa is sa and flow.crypto_map == "foo" and flow.spi == 0x1000
    assert table.lookup(0x1001) is None
    assert table.lookup(0x1002) is None
    assert table.counters[GLOBAL]["unknown_spi"] == 2
    assert 0x1000 in table and len(table) == 1 and [f.spi for f in table] == [0x1000]


def test_lookup_esp_reads_the_spi_from_the_wire() -> None:
    table, sa = tunnel_table()
    esp = bytes(ESP(spi=0x1000, seq=7) / Raw(b"x" * 24))
    flow = table.lookup_esp(esp)
    assert flow is not None and flow.sa is sa
    assert table.lookup_esp(bytes(ESP(spi=0x2000, seq=1) / Raw(b"x" * 24))) is None
    assert table.lookup_esp(esp[:7]) is None
    assert table.counters[GLOBAL] == {"unknown_spi": 1, "malformed_esp": 1}


def test_clear_counters_keeps_counting() -> None:
    table, _ = tunnel_table()
    flow = table.lookup(0x1000)
    assert flow is not None and table.lookup(0x9999) is None
    table.check_inbound(flow, b"")
    table.clear_counters()
    assert table.counters[GLOBAL]["unknown_spi"] == 0
    assert table.counters["foo"]["inner_malformed"] == 0
    table.check_inbound(flow, b"")
    assert table.counters["foo"]["inner_malformed"] == 1


def test_remove() -> None:
    table, _ = tunnel_table()
    removed = table.remove(0x1000)
    assert removed is not None and removed.spi == 0x1000
    assert table.remove(0x1000) is None
    assert table.lookup(0x1000) is None
    assert table.counters[GLOBAL]["unknown_spi"] == 1


@pytest.mark.parametrize(
    ("inner", "reason"),
    [
        (IP(src=SERVER, dst=CLIENT) / TCP(sport=49, dport=40000, flags="SA"), None),
        (IP(src=SERVER, dst=CLIENT) / TCP(sport=50, dport=40000), "port"),
        (IP(src=SERVER, dst=CLIENT) / UDP(sport=49, dport=40000), "protocol"),
        (IP(src="209.165.201.2", dst=CLIENT) / TCP(sport=49), "address"),  # spoofed source
        (IP(src=SERVER, dst="209.165.200.224") / TCP(sport=49), "address"),  # not for us
        (IP(src=CLIENT, dst=SERVER) / TCP(dport=49), "address"),  # wrong orientation
        # A non-first fragment shows no port; the source selector needs one.
        (IP(src=SERVER, dst=CLIENT, proto=6, frag=10) / Raw(b"\x00\x31" * 8), "port"),
    ],
)
def test_tunnel_policy_check(inner: IP, reason: str | None) -> None:
    table, _ = tunnel_table()
    flow = table.lookup(0x1000)
    assert flow is not None
    assert table.inbound_drop(flow, bytes(inner)) == reason
    assert table.check_inbound(flow, bytes(inner)) is (reason is None)
    ok = reason is None
    assert table.counters["foo"] == {
        "policy_ok": 2 * int(ok),
        "policy_violation": 2 * int(not ok),
        "inner_malformed": 0,
    } | ({} if ok else {f"policy_{reason}": 2})


def test_malformed_inner_packet_is_refused_and_counted() -> None:
    table, _ = tunnel_table()
    flow = table.lookup(0x1000)
    assert flow is not None
    assert table.check_inbound(flow, b"\x45\x00") is False
    assert table.check_inbound(flow, b"") is False
    assert table.counters["foo"]["inner_malformed"] == 2
    assert table.counters["foo"]["policy_violation"] == 0


def test_any_port_selectors_accept_fragments_and_icmp() -> None:
    table = SaFlowTable()
    table.add(
        0x2000,
        None,
        [TrafficSelector.from_prefix("198.51.100.0/24"), TrafficSelector.any(6)],
        [TrafficSelector.from_prefix("192.0.2.0/24")],
        "bar",
    )
    flow = table.lookup(0x2000)
    assert flow is not None
    frag = IP(src="198.51.100.7", dst="192.0.2.1", proto=17, frag=10) / Raw(b"x" * 8)
    assert table.check_inbound(flow, bytes(frag))
    assert table.check_inbound(flow, bytes(IP(src="198.51.100.7", dst="192.0.2.1") / ICMP()))
    # IPv6 source is allowed by TrafficSelector.any(6), but the destination is
    # constrained to IPv4, so no IPv6 packet passes.
    v6 = IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment() / UDP()
    assert not table.check_inbound(flow, bytes(v6))
    assert table.counters["bar"]["policy_ok"] == 2
    assert table.counters["bar"]["policy_violation"] == 1


def test_ipv6_selectors_and_ranges() -> None:
    table = SaFlowTable()
    table.add(
        0x3000,
        None,
        [TrafficSelector.from_range("2001:db8::10", "2001:db8::1f", protocol=17)],
        [TrafficSelector.from_prefix("2001:db8:1::/64", protocol=17, ports=(500, 600))],
        "v6",
    )
    flow = table.lookup(0x3000)
    assert flow is not None
    good = IPv6(src="2001:db8::1f", dst="2001:db8:1::5") / UDP(sport=1, dport=600)
    assert table.check_inbound(flow, bytes(good))
    for bad in (
        IPv6(src="2001:db8::20", dst="2001:db8:1::5") / UDP(sport=1, dport=600),
        IPv6(src="2001:db8::10", dst="2001:db8:1::5") / UDP(sport=1, dport=601),
        IPv6(src="2001:db8::10", dst="2001:db8:2::5") / UDP(sport=1, dport=500),
    ):
        assert not table.check_inbound(flow, bytes(bad))
    assert table.counters["v6"]["policy_ok"] == 1
    assert table.counters["v6"]["policy_violation"] == 3


def _packed(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def test_transport_mode_check_uses_outer_addresses_and_next_header() -> None:
    # Transport mode, the reference's second example: the peer is the server.
    table = SaFlowTable()
    flow = table.add(
        0x4000,
        None,
        [TrafficSelector.from_prefix("209.165.200.229", protocol=6, ports=(49, 49))],
        [TrafficSelector.from_prefix("209.165.200.228", protocol=6)],
        "foo",
    )
    seg = bytes(TCP(sport=49, dport=40000, flags="SA"))
    src, dst = _packed("209.165.200.229"), _packed("209.165.200.228")
    assert table.check_inbound_transport(flow, src, dst, 6, seg)
    assert not table.check_inbound_transport(flow, src, dst, 17, bytes(UDP(sport=49)))
    assert not table.check_inbound_transport(flow, dst, src, 6, seg)
    assert not table.check_inbound_transport(flow, src, dst, 6, seg[:3])  # no ports visible
    assert table.counters["foo"]["policy_ok"] == 1
    assert table.counters["foo"]["policy_violation"] == 3
    assert not table.check_inbound_transport(flow, src, _packed("2001:db8::1"), 6, seg)
    assert table.counters["foo"]["inner_malformed"] == 1


def test_icmp_type_and_code_are_the_ports() -> None:
    # RFC 7296 §3.13.1: ICMP type in the high byte, code in the low byte.
    echo_request = (8 << 8, 8 << 8)
    table = SaFlowTable()
    flow = table.add(
        0x5000,
        None,
        [TrafficSelector.from_prefix("192.0.2.1", protocol=1, ports=echo_request)],
        [TrafficSelector.from_prefix("192.0.2.2", protocol=1, ports=echo_request)],
        "icmp",
    )
    ping = IP(src="192.0.2.1", dst="192.0.2.2") / ICMP(type=8)
    reply = IP(src="192.0.2.1", dst="192.0.2.2") / ICMP(type=0)
    assert table.check_inbound(flow, bytes(ping))
    assert not table.check_inbound(flow, bytes(reply))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spi": 0}, "outside"),
        ({"spi": 255}, "outside"),
        ({"spi": 1 << 32}, "outside"),
        ({"crypto_map": GLOBAL}, "reserved"),
        ({"src_selectors": []}, "at least one"),
    ],
)
def test_add_refuses_bad_input(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "spi": 0x1234,
        "sa": None,
        "src_selectors": [TrafficSelector.any(4)],
        "dst_selectors": [TrafficSelector.any(4)],
        "crypto_map": "foo",
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SaFlowTable().add(**args)  # type: ignore[arg-type]


def test_duplicate_spi_is_refused() -> None:
    table, _ = tunnel_table()
    with pytest.raises(ValueError, match="already installed"):
        table.add(0x1000, None, [TrafficSelector.any(4)], [TrafficSelector.any(4)], "foo")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: TrafficSelector(5), "version"),
        (lambda: TrafficSelector(4, start=10, end=9), "address range"),
        (lambda: TrafficSelector(4, end=1 << 32), "address range"),
        (lambda: TrafficSelector(4, start_port=10, end_port=9), "port range"),
        (lambda: TrafficSelector(4, protocol=256), "protocol"),
        (lambda: TrafficSelector.from_range("192.0.2.1", "2001:db8::1"), "mixes"),
    ],
)
def test_bad_selectors_are_refused(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()  # type: ignore[operator]


def test_selector_constructors() -> None:
    ts = TrafficSelector.from_prefix("192.0.2.0/24", protocol=6, ports=(49, 49))
    assert (ts.version, ts.protocol, ts.start, ts.end, ts.start_port, ts.end_port) == (
        4,
        6,
        int(ipaddress.ip_address("192.0.2.0")),
        int(ipaddress.ip_address("192.0.2.255")),
        49,
        49,
    )
    assert TrafficSelector.any(6).end == (1 << 128) - 1
    assert (
        TrafficSelector.from_prefix("2001:db8::1").start
        == TrafficSelector.from_prefix("2001:db8::1").end
    )


def _acl_table(rules: list[str]) -> tuple[SaFlowTable, SaFlow, Classifier]:
    """An SA whose selectors are the cross product of the ACL's permit lines
    (as ipsecmgr.translate.selectors_from_acl builds them) and the classifier."""
    from ipsecmgr.translate import npu_selectors, selectors_from_acl

    acl = parse_acl("tacacs", rules)
    local, remote = selectors_from_acl(acl)
    table = SaFlowTable()
    flow = table.add(0x6000, None, npu_selectors(remote), npu_selectors(local), "foo")
    return table, flow, Classifier([CryptoMap("foo", acl)])


def test_sa_flows_with_the_same_selectors_share_them() -> None:
    """Our side's selectors are the same for many peers: their SA-flow entries hold
    one tuple (ipsecmgr.translate.npu_selectors), each selector converted once."""
    from ipsecmgr.translate import npu_selectors, selectors_from_acl

    local, remote = selectors_from_acl(parse_acl("t", [f"permit ip host {CLIENT} any"]))
    table = SaFlowTable()
    a = table.add(0x6000, None, npu_selectors(remote), npu_selectors(local), "a")
    b = table.add(0x6001, None, npu_selectors(list(remote)), npu_selectors(list(local)), "b")
    assert a.dst_selectors is b.dst_selectors and a.src_selectors is b.src_selectors
    assert a.dst_selectors == (TrafficSelector.from_prefix(CLIENT),)
    assert a.src_selectors == (TrafficSelector.any(4),)


def test_acl_deny_line_drops_what_the_selectors_admit() -> None:
    # The selectors come from the permit line only; the deny line exists only in the ACL.
    table, flow, acl = _acl_table(
        [f"deny tcp host {CLIENT} host {SERVER} eq 23", f"permit ip host {CLIENT} host {SERVER}"]
    )
    telnet = bytes(IP(src=SERVER, dst=CLIENT) / TCP(sport=23, dport=40000))
    tacacs = bytes(IP(src=SERVER, dst=CLIENT) / TCP(sport=49, dport=40000))
    assert table.inbound_drop(flow, telnet) is None  # the selectors alone admit it
    assert table.inbound_drop(flow, telnet, acl) == "acl"
    assert table.inbound_drop(flow, tacacs, acl) is None
    assert table.counters["foo"]["policy_acl"] == 1
    assert acl.counters["foo"] == {"protect": 0, "deny": 0}  # the outbound counters stay


def test_acl_check_refuses_a_cross_product_of_two_permit_lines() -> None:
    # Two lines, two local hosts each with its own server: the selectors' cross product
    # admits server A talking to client 2; the ACL does not.
    a, b, client2 = SERVER, "209.165.201.3", "209.165.200.226"
    table, flow, acl = _acl_table(
        [f"permit tcp host {CLIENT} host {a} eq 49", f"permit tcp host {client2} host {b} eq 49"]
    )
    crossed = bytes(IP(src=a, dst=client2) / TCP(sport=49, dport=40000))
    assert table.inbound_drop(flow, crossed) is None
    assert table.inbound_drop(flow, crossed, acl) == "acl"
    assert table.inbound_drop(flow, bytes(IP(src=b, dst=client2) / TCP(sport=49)), acl) is None
    assert table.inbound_drop(flow, bytes(IP(src=a, dst=CLIENT) / TCP(sport=49)), acl) is None


def test_transport_mode_reasons_and_acl() -> None:
    table, flow, acl = _acl_table([f"permit tcp host {CLIENT} host {SERVER} eq 49"])
    src, dst = _packed(SERVER), _packed(CLIENT)
    seg = bytes(TCP(sport=49, dport=40000))
    check = table.inbound_drop_transport
    assert check(flow, src, dst, 6, seg, acl) is None
    assert check(flow, src, dst, 6, bytes(TCP(sport=22, dport=40000)), acl) == "port"
    assert check(flow, src, dst, 17, bytes(UDP(sport=49, dport=40000)), acl) == "protocol"
    assert check(flow, _packed("209.165.201.9"), dst, 6, seg, acl) == "address"
    assert check(flow, src, dst, 6, seg[:3], acl) == "port"  # ports cut off
    c = table.counters["foo"]
    assert (c["policy_ok"], c["policy_violation"]) == (1, 4)
    assert (c["policy_port"], c["policy_protocol"], c["policy_address"]) == (2, 1, 1)


def test_permits_reply_is_the_mirror_of_classify() -> None:
    acl = parse_acl("a", [f"permit tcp host {CLIENT} host {SERVER} eq 49"])
    clf = Classifier(
        [CryptoMap("foo", acl), CryptoMap("bar", parse_acl("b", ["permit ip any any"]))]
    )
    c, s = int(ipaddress.ip_address(CLIENT)), int(ipaddress.ip_address(SERVER))
    assert clf.permits_reply("foo", 4, 6, s, c, 49, 40000, PORTS_OK)
    assert not clf.permits_reply("bar", 4, 6, s, c, 49, 40000, PORTS_OK)  # foo's, not bar's
    assert not clf.permits_reply("foo", 4, 6, s, c, 50, 40000, PORTS_OK)
    assert clf.permits_reply("bar", 4, 6, s, c, 50, 40000, PORTS_OK)
    assert not clf.permits_reply("foo", 4, 6, s, c, -1, -1, PORTS_TRUNCATED)


def test_an_sa_inside_the_permit_line_is_judged_once_and_skips_the_acl_check() -> None:
    # The usual TACACS+ map: its selectors (client any port <-> server port 49) lie
    # wholly inside the one permit line, so the selectors alone decide (#19).
    table, flow, acl = _acl_table([f"permit tcp host {CLIENT} host {SERVER} eq 49"])
    assert acl.covers_reply("foo", flow.boxes())
    tacacs = bytes(IP(src=SERVER, dst=CLIENT) / TCP(sport=49, dport=40000))
    assert table.inbound_drop(flow, tacacs, acl) is None
    assert flow.acl is acl and flow.acl_covered
    assert table.inbound_drop(flow, bytes(IP(src=SERVER, dst=CLIENT) / TCP(sport=23)), acl) == (
        "port"  # outside the selectors: still refused, by them
    )
    # Another map protects the same traffic first: foo's SA is not covered.
    first = Classifier([CryptoMap("bar", parse_acl("b", ["permit tcp any any"])), *acl.crypto_maps])
    assert not first.covers_reply("foo", flow.boxes())
    assert table.inbound_drop(flow, tacacs, first) == "acl"
    assert flow.acl is first and not flow.acl_covered


def test_a_wider_sa_is_not_covered_and_still_drops_what_the_acl_denies() -> None:
    table, flow, acl = _acl_table(
        [f"deny tcp host {CLIENT} host {SERVER} eq 23", f"permit ip host {CLIENT} host {SERVER}"]
    )
    assert not acl.covers_reply("foo", flow.boxes())
    telnet = bytes(IP(src=SERVER, dst=CLIENT) / TCP(sport=23, dport=40000))
    assert table.inbound_drop(flow, telnet, acl) == "acl"
    assert flow.acl is acl and not flow.acl_covered
    # A reconfiguration (a new classifier) without the deny line covers the SA:
    # judged again on the next packet.
    wider = Classifier([CryptoMap("foo", parse_acl("t", [f"permit ip host {CLIENT} any"]))])
    assert table.inbound_drop(flow, telnet, wider) is None
    assert flow.acl is wider and flow.acl_covered


@pytest.mark.parametrize(
    ("sel", "covered"),
    [
        # (reply direction: the client's ports are the packet's destination ports)
        (((49, 49), (0, 65535)), True),
        (((49, 49), (1024, 65535)), True),
        (((48, 49), (0, 65535)), False),  # 48 is not permitted
        (((0, 65535), (0, 65535)), False),
    ],
)
def test_covers_reply_follows_the_ports(
    sel: tuple[tuple[int, int], tuple[int, int]], covered: bool
) -> None:
    clf = Classifier(
        [CryptoMap("foo", parse_acl("a", [f"permit tcp host {CLIENT} host {SERVER} eq 49"]))]
    )
    s, c = int(ipaddress.ip_address(SERVER)), int(ipaddress.ip_address(CLIENT))
    (slo, shi), (dlo, dhi) = sel
    assert clf.covers_reply("foo", [(4, 6, s, s, c, c, slo, shi, dlo, dhi)]) is covered
    # any protocol: UDP and the rest are not permitted
    assert not clf.covers_reply("foo", [(4, 0, s, s, c, c, slo, shi, dlo, dhi)])


def test_covers_reply_refuses_selectors_holding_a_peer_or_link_scope() -> None:
    # The reply of IKE/ESP to a peer bypasses (never via a tunnel), and an IPv6
    # link-local reply is dropped: permits_reply refuses them, so covers_reply must.
    clf = Classifier(
        [
            CryptoMap("foo", parse_acl("a", ["permit ip 192.0.2.0/24 any"]), ["198.51.100.7"]),
            CryptoMap("six", parse_acl("b", ["permit ipv6 any any"])),
        ]
    )
    net = (int(ipaddress.ip_address("192.0.2.0")), int(ipaddress.ip_address("192.0.2.255")))
    peer = int(ipaddress.ip_address("198.51.100.7"))
    assert clf.covers_reply("foo", [(4, 6, peer + 1, peer + 1, *net, 0, 65535, 0, 65535)])
    assert not clf.covers_reply("foo", [(4, 0, peer, peer, *net, 0, 65535, 0, 65535)])
    ll = int(ipaddress.ip_address("fe80::1"))
    doc = int(ipaddress.ip_address("2001:db8::1"))
    assert clf.covers_reply("six", [(6, 0, doc, doc, doc, doc, 0, 65535, 0, 65535)])
    assert not clf.covers_reply("six", [(6, 0, doc, doc, ll, ll, 0, 65535, 0, 65535)])
