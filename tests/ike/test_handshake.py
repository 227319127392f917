"""IKE_SA_INIT + IKE_AUTH between two in-memory engines."""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict

import pytest

from ike.config import EspProposal, IkeProposal
from ike.constants import DhGroup, EncrId, IntegId, PrfId
from ike.events import (
    AuthenticationFailed,
    ChildSaInstalled,
    ExchangeFailed,
    IkeSaDeleted,
    IkeSaEstablished,
    InitialContactReceived,
)
from ike.payloads import TrafficSelector
from ike.sa import State

from .pair import Pair, configs

ENCRS = [
    (EncrId.AES_GCM_16, 128, IntegId.NONE),
    (EncrId.AES_GCM_16, 256, IntegId.NONE),
    (EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_256_128),
]
PRFS = [PrfId.HMAC_SHA2_256, PrfId.HMAC_SHA2_384, PrfId.HMAC_SHA2_512]
GROUPS = [DhGroup.MODP_2048, DhGroup.ECP_256, DhGroup.ECP_384, DhGroup.CURVE25519]


def installed(p: Pair) -> tuple[ChildSaInstalled, ChildSaInstalled]:
    (ci,) = p.events_of("i", ChildSaInstalled)
    (cr,) = p.events_of("r", ChildSaInstalled)
    return ci, cr


@pytest.mark.parametrize(
    ("group", "encr", "prf"),
    list(itertools.product(GROUPS, ENCRS, PRFS)),
    ids=lambda x: x.name if hasattr(x, "name") else f"{x[0].name}{x[1]}",
)
def test_every_suite(group: DhGroup, encr: tuple[EncrId, int, IntegId], prf: PrfId) -> None:
    prop = IkeProposal(encr[0], encr[1], prf, encr[2], group)
    p = Pair(*configs(ike_proposals=(prop,)))
    p.handshake()
    assert p.i.state == p.r.state == State.ESTABLISHED
    ki, kr = p.i.ch.keys, p.r.ch.keys
    assert ki is not None and kr is not None
    assert asdict(ki) == asdict(kr)
    assert len(ki.sk_d) == {5: 32, 6: 48, 7: 64}[prf]
    assert len(ki.sk_ei) == encr[1] // 8 + (4 if encr[0] == EncrId.AES_GCM_16 else 0)
    ci, cr = installed(p)
    assert (ci.inbound_spi, ci.outbound_spi) == (cr.outbound_spi, cr.inbound_spi)
    assert ci.inbound_key == cr.outbound_key and ci.outbound_key == cr.inbound_key
    assert ci.inbound_key != ci.outbound_key and len(ci.inbound_key) == 36
    (ei,) = p.events_of("i", IkeSaEstablished)
    assert group.name in ei.algorithms and ei.spi_r == p.r.ch.spi_r
    assert p.i.counters.get("internal_error", 0) == p.r.counters.get("internal_error", 0) == 0
    # 4 datagrams: IKE_SA_INIT and IKE_AUTH, request and response
    assert [d for d, _, _ in p.wire] == ["i>r", "r>i", "i>r", "r>i"]


def test_key_fields_hidden_from_repr() -> None:
    p = Pair(*configs())
    p.handshake()
    ci, _ = installed(p)
    assert ci.inbound_key.hex() not in repr(ci) and ci.outbound_key.hex() not in repr(ci)
    assert "correct horse" not in repr(p.i.config)
    assert p.i.ch.keys is not None and p.i.ch.keys.sk_d.hex() not in repr(p.i.ch)


def test_wrong_psk_fails_authentication_without_child() -> None:
    ci, cr = configs()
    cr = type(cr)(**{**vars(cr), "local_psk": b"other"})
    p = Pair(ci, cr)
    p.handshake()
    assert p.events_of("r", AuthenticationFailed)
    assert p.events_of("i", AuthenticationFailed)
    (d,) = p.events_of("i", IkeSaDeleted)
    assert d.reason == "auth-failed"
    assert not p.events_of("i", ChildSaInstalled) and not p.events_of("r", ChildSaInstalled)
    assert p.i.dead and not p.ep.sas


def test_asymmetric_psks() -> None:
    p = Pair(
        *configs(
            i_local_psk=b"a" * 16,
            i_remote_psk=b"b" * 16,
            r_local_psk=b"b" * 16,
            r_remote_psk=b"a" * 16,
        )
    )
    p.handshake()
    assert p.i.established and p.r.established
    bad = Pair(
        *configs(
            i_local_psk=b"a" * 16,
            i_remote_psk=b"b" * 16,
            r_local_psk=b"a" * 16,
            r_remote_psk=b"a" * 16,
        )
    )
    bad.handshake()
    # The responder accepts our AUTH, but ours of theirs fails
    assert bad.events_of("r", IkeSaEstablished) and bad.events_of("i", AuthenticationFailed)


def test_no_common_proposal() -> None:
    p = Pair(
        *configs(
            i_ike_proposals=(
                IkeProposal(
                    EncrId.AES_GCM_16, 128, PrfId.HMAC_SHA2_256, IntegId.NONE, DhGroup.ECP_256
                ),
            ),
            r_ike_proposals=(
                IkeProposal(
                    EncrId.AES_GCM_16, 256, PrfId.HMAC_SHA2_512, IntegId.NONE, DhGroup.ECP_256
                ),
            ),
        )
    )
    p.handshake()
    (f,) = p.events_of("i", ExchangeFailed)
    assert (f.exchange, f.notify, f.by_peer) == ("IKE_SA_INIT", "NO_PROPOSAL_CHOSEN", True)
    assert p.events_of("i", IkeSaDeleted)[0].reason == "failed: NO_PROPOSAL_CHOSEN"
    assert p.events_of("r", ExchangeFailed)[0].notify == "NO_PROPOSAL_CHOSEN"
    assert not p.ep.sas and p.i.dead


def test_invalid_ke_round_trip() -> None:
    x = IkeProposal(EncrId.AES_GCM_16, 256, PrfId.HMAC_SHA2_256, IntegId.NONE, DhGroup.CURVE25519)
    e = IkeProposal(EncrId.AES_GCM_16, 256, PrfId.HMAC_SHA2_256, IntegId.NONE, DhGroup.ECP_384)
    p = Pair(*configs(i_ike_proposals=(x, e), r_ike_proposals=(e,)))
    p.handshake()
    assert p.i.established and p.i.ch.suite is not None and p.i.ch.suite.dh == DhGroup.ECP_384
    assert p.i.counters["invalid_ke_retry"] == 1
    # request, INVALID_KE answer, request again (message ID 0), answer, IKE_AUTH pair
    assert len(p.wire) == 6
    assert [int.from_bytes(d[20:24], "big") for _, _, d in p.wire[:4]] == [0, 0, 0, 0]
    assert p.ep.counters["refused_init"] == 1
    assert not p.events_of("r", ExchangeFailed)  # INVALID_KE is negotiation, not failure


def test_cookie_exchange() -> None:
    p = Pair(*configs(r_cookie_threshold=0))
    p.handshake()
    assert p.i.established and p.r.established
    assert p.ep.counters == {"cookie_sent": 1, "cookie_accepted": 1}
    assert p.i.counters["cookie_retry"] == 1
    # the second request starts with N(COOKIE) (§2.6): next payload 41 in the header
    assert p.wire[2][2][16] == 41 and p.wire[0][2][16] == 33
    # the COOKIE answer carries no responder SPI and created no state
    assert p.wire[1][2][8:16] == b"\x00" * 8


def test_forged_cookie_gets_a_fresh_challenge() -> None:
    p = Pair(*configs(r_cookie_threshold=0))
    p.i.initiate(0)
    ((req, _),) = p.i.datagrams_to_send(0)
    p.ep.receive_datagram(req, p.i_src, 0)
    ((ans, _),) = p.ep.datagrams_to_send(0)
    cookie_payload = ans[28:]
    # put a wrong cookie in front and send it again
    from ike.payloads import NotifyPayload, build_plain_message, parse_message

    hdr, payloads, _ = parse_message(req)
    forged = build_plain_message(
        hdr.spi_i, hdr.spi_r, 34, hdr.flags, 0, [NotifyPayload(16390, b"\x00" * 36), *payloads]
    )
    p.ep.receive_datagram(forged, p.i_src, 0)
    assert p.ep.counters["cookie_sent"] == 2 and not p.ep.sas
    assert cookie_payload


def test_initial_contact() -> None:
    p = Pair(*configs())
    p.handshake()
    (ic,) = p.events_of("r", InitialContactReceived)
    assert ic.remote_id == "ID_IPV4_ADDR:198.51.100.1"
    q = Pair(*configs(initial_contact=False))
    q.handshake()
    assert not q.events_of("r", InitialContactReceived)


def test_ts_narrowing() -> None:
    p = Pair(
        *configs(
            i_local_ts=(TrafficSelector.from_network("10.0.0.0/16"),),
            i_remote_ts=(TrafficSelector.from_network("10.1.0.0/16"),),
            r_local_ts=(TrafficSelector.from_network("10.1.0.0/24", 6, 49, 49),),
            r_remote_ts=(TrafficSelector.from_network("10.0.1.0/24"),),
        )
    )
    p.handshake()
    ci, cr = installed(p)
    assert [str(t) for t in ci.local_ts] == ["10.0.1.0-10.0.1.255/0"]
    assert [str(t) for t in ci.remote_ts] == ["10.1.0.0-10.1.0.255/6[49-49]"]
    assert ci.local_ts == cr.remote_ts and ci.remote_ts == cr.local_ts


def test_ts_unacceptable_keeps_ike_sa() -> None:
    p = Pair(
        *configs(
            i_local_ts=(TrafficSelector.from_network("10.0.0.0/16"),),
            r_remote_ts=(TrafficSelector.from_network("10.9.0.0/16"),),
        )
    )
    p.handshake()
    assert p.i.established and p.r.established
    assert p.events_of("i", ExchangeFailed)[0].notify == "TS_UNACCEPTABLE"
    assert p.events_of("r", ExchangeFailed)[0].notify == "TS_UNACCEPTABLE"
    assert not p.events_of("i", ChildSaInstalled) and not p.r.children


@pytest.mark.parametrize(
    ("i_mode", "r_mode", "want"),
    [
        ("transport", "transport", "transport"),
        ("transport", "tunnel", "tunnel"),
        ("tunnel", "transport", "tunnel"),
    ],
)
def test_modes(i_mode: str, r_mode: str, want: str) -> None:
    p = Pair(*configs(i_mode=i_mode, r_mode=r_mode))
    p.handshake()
    ci, cr = installed(p)
    assert ci.mode == cr.mode == want


@pytest.mark.parametrize(("i_esn", "r_esn", "want"), [(True, True, True), (False, False, False)])
def test_esn(i_esn: bool, r_esn: bool, want: bool) -> None:
    p = Pair(
        *configs(
            i_esp_proposals=(EspProposal(128, i_esn),), r_esp_proposals=(EspProposal(128, r_esn),)
        )
    )
    p.handshake()
    ci, cr = installed(p)
    assert ci.esn is cr.esn is want and ci.key_bits == 128 and len(ci.inbound_key) == 20


def test_esp_no_proposal_keeps_ike_sa() -> None:
    p = Pair(
        *configs(
            i_esp_proposals=(EspProposal(128, True),), r_esp_proposals=(EspProposal(128, False),)
        )
    )
    p.handshake()
    assert p.i.established and not p.i.children
    assert p.events_of("i", ExchangeFailed)[0].notify == "NO_PROPOSAL_CHOSEN"


def test_export_keys() -> None:
    p = Pair(*configs())
    p.handshake()
    k = p.i.export_keys()
    assert k["spi_i"] == p.i.ch.spi_i.hex() and k["spi_r"] == p.r.ch.spi_r.hex()
    assert k["encryption"] == "AES-GCM-256 with 16 octet ICV [RFC5282]"
    assert k["integrity"] == "NONE [RFC4306]"
    assert k == p.r.export_keys()


def test_log_lines_name_every_payload_and_no_secret() -> None:
    lines: list[str] = []
    ci, cr = configs()
    p = Pair(ci, cr)
    p.i.log = lines.append
    p.ep.log = lines.append
    p.handshake()
    assert re.search(
        r"sending IKE_SA_INIT request 0 \[ SA KE No N\(NAT_DETECTION_SOURCE_IP\) "
        r"N\(NAT_DETECTION_DESTINATION_IP\) \] \((\d+) bytes\) to 198\.51\.100\.2\[500\]$",
        lines[0],
    ), lines[0]
    # The size logged by the sender is the size the receiver logs for the same message.
    sizes = {}
    for line in lines:
        m = re.search(r"(sending|received) (\w+ \w+ \d+) .*\((\d+) bytes\)", line)
        assert m, line
        sizes.setdefault(m.group(2), set()).add(int(m.group(3)))
    assert len(sizes) == 4 and all(len(v) == 1 for v in sizes.values()), sizes
    assert any(
        "received IKE_AUTH request 1 [ IDi N(INITIAL_CONTACT) IDr AUTH SA TSi TSr ]" in x
        for x in lines
    )
    assert any("sending IKE_AUTH response 1 [ IDr AUTH SA TSi TSr ]" in x for x in lines)
    assert len(lines) == 8  # each of 4 messages: sent by one side, received by the other
    keys = p.i.export_keys()
    assert not any(keys["sk_ei"] in x or "correct horse" in x for x in lines)


def test_cookies_only_above_the_half_open_threshold() -> None:
    p = Pair(*configs(r_cookie_threshold=1))
    p.handshake(lambda d, n, data: [] if n >= 3 else [data])  # stays half-open
    assert p.ep.counters.get("cookie_sent", 0) == 0 and len(p.ep.sas) == 1
    q = Pair(*configs(), seed=5)
    q.ep = p.ep
    q.handshake()
    assert q.i.established
    assert p.ep.counters["cookie_sent"] == 1 and p.ep.counters["cookie_accepted"] == 1


def test_cookie_secret_rotation() -> None:
    from ike.endpoint import CookieJar

    secrets = iter([b"a" * 32, b"b" * 32, b"c" * 32])
    jar = CookieJar(lambda n: next(secrets), rotation=300.0)
    c = jar.make(b"n" * 32, "198.51.100.1", b"s" * 8, 0.0)
    assert len(c) == 36 and jar.check(c, b"n" * 32, "198.51.100.1", b"s" * 8, 299.0)
    assert not jar.check(c, b"m" * 32, "198.51.100.1", b"s" * 8, 299.0)  # other nonce
    assert not jar.check(c, b"n" * 32, "198.51.100.9", b"s" * 8, 299.0)  # other address
    assert jar.check(c, b"n" * 32, "198.51.100.1", b"s" * 8, 301.0)  # previous secret: ok
    assert not jar.check(c, b"n" * 32, "198.51.100.1", b"s" * 8, 601.0)  # two rotations: no


def test_info_is_plain_and_secret_free() -> None:
    import json

    p = Pair(*configs())
    p.handshake()
    info = p.i.info()
    text = json.dumps(info)
    keys = p.i.export_keys()
    ci, _ = installed(p)
    for secret in (keys["sk_ei"], keys["sk_er"], ci.inbound_key.hex(), "correct horse"):
        assert secret not in text
    assert info["state"] == "established" and info["spi_r"] == keys["spi_r"]
    assert info["algorithms"] == "AES_GCM_16_256/HMAC_SHA2_256/CURVE25519"
    (child,) = info["children"]  # type: ignore[misc]
    assert child["inbound_spi"] == f"{ci.inbound_spi:08x}" and child["mode"] == "tunnel"
