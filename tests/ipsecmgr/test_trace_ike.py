"""ike.summary: one line per IKE message, payloads listed (decrypted when the keys are there)."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from ike.config import Identity, IkeConfig
from ike.endpoint import IkeEndpoint
from ike.sa import IkeSA
from ike.summary import IkeSummary, among, summarize

I_ADDR, R_ADDR = ("198.51.100.1", 500), ("198.51.100.2", 500)
# RFC 7296 §1.2 plus §2.4 INITIAL_CONTACT (the default) and §2.15 IDr hint
EXPECTED_AUTH_REQ = "SK{IDi, N(INITIAL_CONTACT), IDr, AUTH, SA, TSi(1), TSr(1)}"


class Pair:
    """An initiator and a responder exchanging datagrams in memory (see tests/ike/pair.py)."""

    def __init__(self, seed: int = 1) -> None:
        psk = b"correct horse battery staple"
        ci = IkeConfig(I_ADDR, R_ADDR, Identity.address(I_ADDR[0]), Identity.address(R_ADDR[0]),
                       psk)  # fmt: skip
        cr = IkeConfig(R_ADDR, I_ADDR, Identity.address(R_ADDR[0]), Identity.address(I_ADDR[0]),
                       psk)  # fmt: skip
        self.i = IkeSA(ci, True, random.Random(seed).randbytes)
        self.ep = IkeEndpoint([cr], rng=random.Random(seed + 1).randbytes)
        self.wire: list[tuple[str, float, bytes]] = []

    @property
    def r(self) -> IkeSA:
        return self.ep.sas[0]

    def handshake(self) -> None:
        self.i.initiate(0.0)
        for _ in range(10):
            out_i, out_r = self.i.datagrams_to_send(0.0), self.ep.datagrams_to_send(0.0)
            for data, _ in out_i:
                self.wire.append(("i>r", 0.0, data))
                self.ep.receive_datagram(data, I_ADDR, 0.0)
            for data, _ in out_r:
                self.wire.append(("r>i", 0.0, data))
                self.i.receive_datagram(data, R_ADDR, 0.0)


def _handshake() -> Pair:
    p = Pair()
    p.handshake()
    assert p.i.established and p.r.established
    return p


def test_ike_sa_init_is_plain_and_listed() -> None:
    p = _handshake()
    _, _, request = p.wire[0]
    s = summarize(request)
    assert isinstance(s, IkeSummary)
    assert (s.exchange, s.response, s.from_initiator, s.msg_id) == ("IKE_SA_INIT", False, True, 0)
    assert s.payloads[:3] == ["SA", "KE", "Nonce"]
    assert "N(NAT_DETECTION_SOURCE_IP)" in s.payloads and not s.encrypted
    assert str(s).startswith(f"IKE_SA_INIT request #0 ({len(request)} bytes) SA, KE, Nonce")


def test_ike_auth_is_decrypted_with_either_sides_keys() -> None:
    p = _handshake()
    (_, _, auth_req), (_, _, auth_resp) = p.wire[2], p.wire[3]
    for sas in ([p.i], [p.r]):
        req = summarize(auth_req, among(sas))
        assert req is not None and req.decrypted and req.sa_name == sas[0].name
        assert req.payloads == [EXPECTED_AUTH_REQ]
        resp = summarize(auth_resp, among(sas))
        assert resp is not None and resp.response and resp.payload_text.startswith("SK{IDr, AUTH")


def test_the_endpoint_index_finds_the_sa_by_either_spi() -> None:
    """The daemon looks the SA up in the endpoint's SPI index (not a scan of every
    SA): the responder's SPI is ours in both directions of IKE_AUTH."""
    p = _handshake()
    (_, _, auth_req), (_, _, auth_resp) = p.wire[2], p.wire[3]
    for wire in (auth_req, auth_resp):
        s = summarize(wire, p.ep.sa_by_spis)
        assert s is not None and s.decrypted and s.sa_name == p.r.name
    other = Pair(seed=7)
    other.handshake()
    s = summarize(auth_req, other.ep.sa_by_spis)  # another endpoint: no SA with these SPIs
    assert s is not None and s.encrypted and not s.decrypted and s.sa_name is None


def test_without_keys_only_the_first_inner_payload_is_named() -> None:
    p = _handshake()
    s = summarize(p.wire[2][2])
    assert s is not None and s.encrypted and not s.decrypted
    assert s.payloads == ["SK{IDi, ...}"]  # RFC 7296 §3.14: the SK header names the first one


def test_wrong_keys_do_not_decrypt() -> None:
    p, q = _handshake(), Pair(seed=7)
    q.handshake()
    s = summarize(p.wire[2][2], among([q.i]))  # another SA's keys, not its SPI either
    assert s is not None and not s.decrypted


def test_non_esp_marker_is_skipped() -> None:
    p = _handshake()
    s = summarize(b"\x00\x00\x00\x00" + p.wire[0][2])
    assert s is not None and s.exchange == "IKE_SA_INIT"


@given(st.binary(max_size=120))
def test_garbage_gives_none_or_a_summary_never_an_exception(data: bytes) -> None:
    s = summarize(data)
    assert s is None or isinstance(s.exchange, str)
