"""The ACL language: the reference's examples, each syntax element, each error."""

from __future__ import annotations

import ipaddress

import pytest

from npusim.acl import ANY_FAMILY, ANY_PROTOCOL, AclSyntaxError, Rule, parse_acl

V4_ALL = 0xFFFFFFFF
V6_ALL = (1 << 128) - 1


def ip(a: str) -> int:
    return int(ipaddress.ip_address(a))


def one(line: str) -> Rule:
    acl = parse_acl("foo", [line])
    assert len(acl.rules) == 1
    return acl.rules[0]


def test_reference_tunnel_example_typo_is_rejected_naming_the_token() -> None:
    # The vendor document's line, verbatim, has a stray "1" where the source
    # wildcard belongs.
    with pytest.raises(AclSyntaxError) as exc:
        parse_acl("foo", ["permit ip 209.165.200.225 1 0.0.0.0 209.165.201.1 0.0.0.0"])
    err = exc.value
    assert (err.acl, err.line, err.token) == ("foo", 1, "1")
    assert "wildcard mask" in err.expected and "209.165.200.225" in err.expected
    assert str(err).startswith("ACL foo line 1: unexpected '1': expected a wildcard mask")


def test_reference_tunnel_example_corrected() -> None:
    r = one("permit ip 209.165.200.225 0.0.0.0 209.165.201.1 0.0.0.0")
    assert r.permit and r.version == 4 and r.protocol == ANY_PROTOCOL
    assert (r.src, r.src_mask) == (ip("209.165.200.225"), V4_ALL)
    assert (r.dst, r.dst_mask) == (ip("209.165.201.1"), V4_ALL)
    assert r.src_ports is None and r.dst_ports is None
    assert r.where == "ACL foo line 1"
    assert r.text == "permit ip 209.165.200.225 0.0.0.0 209.165.201.1 0.0.0.0"


def test_reference_transport_example() -> None:
    r = one("permit tcp 209.165.200.228 0.0.0.0 209.165.200.229 0.0.0.0")
    assert r.permit and r.version == 4 and r.protocol == 6
    assert (r.src, r.src_mask) == (ip("209.165.200.228"), V4_ALL)
    assert (r.dst, r.dst_mask) == (ip("209.165.200.229"), V4_ALL)


@pytest.mark.parametrize(
    ("line", "fields"),
    [
        # protocols
        ("permit ip any any", {"protocol": ANY_PROTOCOL, "version": ANY_FAMILY}),
        ("permit tcp any any", {"protocol": 6, "version": ANY_FAMILY}),
        ("permit udp any any", {"protocol": 17}),
        ("permit icmp any any", {"protocol": 1, "version": 4}),
        ("permit icmpv6 any any", {"protocol": 58, "version": 6}),
        ("permit ipv6 any any", {"protocol": ANY_PROTOCOL, "version": 6}),
        ("permit esp any any", {"protocol": 50}),
        ("permit 47 any any", {"protocol": 47}),
        ("permit 0 any any", {"protocol": 0}),
        ("permit 255 any any", {"protocol": 255}),
        ("PERMIT TCP ANY ANY", {"protocol": 6, "permit": True}),
        # actions
        ("deny ip any any", {"permit": False}),
        # addresses
        ("permit ip host 192.0.2.1 any", {"src": ip("192.0.2.1"), "src_mask": V4_ALL}),
        ("permit ip any host 192.0.2.1", {"dst": ip("192.0.2.1"), "dst_mask": V4_ALL}),
        (
            "permit ip 192.0.2.0 0.0.0.255 any",
            {"src": ip("192.0.2.0"), "src_mask": 0xFFFFFF00, "version": 4},
        ),
        # non-contiguous wildcard: every even host of 192.0.2.0/24
        ("permit ip any 192.0.2.0 0.0.0.254", {"dst_mask": 0xFFFFFF01}),
        ("permit ip 198.51.100.0/24 any", {"src": ip("198.51.100.0"), "src_mask": 0xFFFFFF00}),
        (
            "permit ip 2001:db8::/64 any",
            {"src": ip("2001:db8::"), "src_mask": V6_ALL ^ ((1 << 64) - 1), "version": 6},
        ),
        ("permit tcp any host 2001:db8::1", {"dst": ip("2001:db8::1"), "dst_mask": V6_ALL}),
        # ports
        ("permit tcp any any eq 49", {"dst_ports": ((49, 49),), "src_ports": None}),
        ("permit tcp any any eq tacacs", {"dst_ports": ((49, 49),)}),
        ("permit udp any eq 500 any", {"src_ports": ((500, 500),), "dst_ports": None}),
        ("permit tcp any range 1024 65535 any eq 49", {"src_ports": ((1024, 65535),)}),
        ("permit tcp any any lt 1024", {"dst_ports": ((0, 1023),)}),
        ("permit tcp any any gt 1023", {"dst_ports": ((1024, 65535),)}),
        ("permit tcp any any neq 49", {"dst_ports": ((0, 48), (50, 65535))}),
        ("permit tcp any any neq 0", {"dst_ports": ((1, 65535),)}),
        ("permit 6 any any eq 49", {"protocol": 6, "dst_ports": ((49, 49),)}),
        ("permit 17 any any eq 53", {"protocol": 17, "dst_ports": ((53, 53),)}),
    ],
)
def test_syntax_elements(line: str, fields: dict[str, object]) -> None:
    r = one(line)
    for name, value in fields.items():
        assert getattr(r, name) == value, name


def test_remarks_and_blank_lines_are_skipped_but_keep_line_numbers() -> None:
    acl = parse_acl("foo", ["remark TACACS+ only", "", "! comment", "permit tcp any any eq 49"])
    assert len(acl.rules) == 1
    assert acl.rules[0].line == 4


def test_rules_keep_order_and_line_numbers() -> None:
    acl = parse_acl("bar", ["deny ip host 192.0.2.9 any", "permit ip any any"])
    assert [(r.line, r.permit) for r in acl.rules] == [(1, False), (2, True)]
    assert acl.name == "bar" and acl.warnings == []


def test_host_bits_under_wildcard_are_normalised_with_a_warning() -> None:
    acl = parse_acl("foo", ["permit ip 192.0.2.5 0.0.0.255 any"])
    assert acl.rules[0].src == ip("192.0.2.0")
    assert acl.warnings == [
        "ACL foo line 1: 192.0.2.5 0.0.0.255 has bits set under the wildcard; "
        "using 192.0.2.0 0.0.0.255"
    ]


def test_host_bits_in_prefix_are_normalised_with_a_warning() -> None:
    acl = parse_acl("foo", ["permit ip any any", "permit ip any 2001:db8::1/64"])
    assert acl.rules[1].dst == ip("2001:db8::")
    assert acl.warnings == ["ACL foo line 2: 2001:db8::1/64 has host bits set; using 2001:db8::/64"]


@pytest.mark.parametrize(
    ("line", "token", "expected"),
    [
        ("allow ip any any", "allow", "'permit' or 'deny'"),
        ("permit", "", "a protocol"),
        ("permit foo any any", "foo", "a protocol"),
        ("permit 256 any any", "256", "a protocol"),
        ("permit ip", "", "a source address"),
        ("permit ip nowhere any", "nowhere", "a source address"),
        ("permit ip 192.0.2.1", "", "a wildcard mask"),
        ("permit ip 192.0.2.1 255.255.255.256 any", "255.255.255.256", "a wildcard mask"),
        ("permit ip host", "", "an IPv4 or IPv6 address after 'host'"),
        ("permit ip host 192.0.2.300 any", "192.0.2.300", "an IPv4 or IPv6 address"),
        ("permit ip any", "", "a destination address"),
        ("permit ip 2001:db8::1 any", "2001:db8::1", "an IPv6 prefix"),
        ("permit ip 192.0.2.0/33 any", "192.0.2.0/33", "a prefix"),
        ("permit ip any any any", "any", "end of line"),
        ("permit tcp any any 49", "49", "a port condition (eq, neq, lt, gt, range) or end"),
        ("permit tcp any any eq 49 extra", "extra", "end of line"),
        ("permit ip any any eq 49", "eq", "port conditions need tcp or udp"),
        ("permit icmp any eq 1 any", "eq", "port conditions need tcp or udp"),
        ("permit tcp any any eq", "", "a port number"),
        ("permit tcp any any eq 65536", "65536", "a port number"),
        ("permit tcp any any eq bogus", "bogus", "a port number"),
        ("permit tcp any any range 10", "", "a port number"),
        ("permit tcp any any range 10 9", "9", "a range end >= 10"),
        ("permit tcp any any lt 0", "0", "a port above 0"),
        ("permit tcp any any gt 65535", "65535", "a port below 65535"),
        ("permit ip host 192.0.2.1 host 2001:db8::1", "2001:db8::1", "an IPv4"),
        ("permit icmp any 2001:db8::/32", "2001:db8::/32", "an IPv4 protocol or address"),
        ("permit icmpv6 host 192.0.2.1 any", "192.0.2.1", "an IPv6 protocol or address"),
    ],
)
def test_syntax_errors_name_acl_line_token_and_expectation(
    line: str, token: str, expected: str
) -> None:
    with pytest.raises(AclSyntaxError) as exc:
        parse_acl("acl7", ["permit ip any any", line])
    err = exc.value
    assert (err.acl, err.line, err.token) == ("acl7", 2, token)
    assert expected in err.expected
    assert str(err).startswith("ACL acl7 line 2: unexpected ")
    assert (f"'{token}'" if token else "end of line") in str(err)


def test_syntax_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="ACL x line 1"):
        parse_acl("x", ["permit"])


def test_rule_matches_uses_integer_masks() -> None:
    r = one("permit tcp 192.0.2.0 0.0.0.254 any eq 49")
    assert r.matches(4, 6, ip("192.0.2.8"), 1, 40000, 49, 0)
    assert not r.matches(4, 6, ip("192.0.2.9"), 1, 40000, 49, 0)  # odd host
    assert not r.matches(4, 6, ip("192.0.2.8"), 1, 40000, 50, 0)  # port
    assert not r.matches(4, 17, ip("192.0.2.8"), 1, 40000, 49, 0)  # protocol
    assert not r.matches(4, 6, ip("192.0.2.8"), 1, -1, -1, 2)  # ports opaque


def test_linear_first_match_is_first_match() -> None:
    acl = parse_acl(
        "foo",
        ["deny tcp any any eq 23", "permit tcp any host 192.0.2.1", "permit ip any any"],
    )
    args = (4, 6, ip("198.51.100.1"), ip("192.0.2.1"), 40000)
    assert acl.first_match(*args, 23, 0) is acl.rules[0]
    assert acl.first_match(*args, 49, 0) is acl.rules[1]
    assert acl.first_match(4, 17, 1, 2, 1, 1, 0) is acl.rules[2]
    # "ip any any" names no family, so it matches IPv6 too.
    assert acl.first_match(6, 17, 1, 2, 1, 1, 0) is acl.rules[2]
    v4_only = parse_acl("bar", ["permit ip 0.0.0.0 255.255.255.255 any"])
    assert v4_only.first_match(6, 17, 1, 2, 1, 1, 0) is None
