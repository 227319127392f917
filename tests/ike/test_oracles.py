"""Independent oracles: scapy's IKEv2 dissector and tshark (with our exported keys)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from scapy.contrib.ikev2 import IKEv2
from scapy.layers.inet import IP, UDP
from scapy.packet import Packet, Raw
from scapy.utils import wrpcap

from ike.buffer import Buffer
from ike.config import EspProposal, IkeProposal
from ike.constants import DhGroup, EncrId, IntegId, PrfId
from ike.payloads import parse_chain, parse_message

from .pair import I_ADDR, R_ADDR, Pair, configs

GCM = IkeProposal(EncrId.AES_GCM_16, 256, PrfId.HMAC_SHA2_256, IntegId.NONE, DhGroup.ECP_256)
CBC = IkeProposal(
    EncrId.AES_CBC, 256, PrfId.HMAC_SHA2_384, IntegId.HMAC_SHA2_256_128, DhGroup.MODP_2048
)


def busy_pair(prop: IkeProposal, rekey_ike: bool = True) -> Pair:
    """A conversation using every exchange we build."""
    p = Pair(*configs(ike_proposals=(prop,), pfs_group=DhGroup.CURVE25519, i_mode="transport"))
    p.handshake()
    p.i.liveness_check(p.now)
    p.roundtrip()
    p.i.create_child(p.now)
    p.roundtrip()
    p.r.rekey_child(1, p.now)
    p.roundtrip()
    p.i.delete_child(2, p.now)
    p.roundtrip()
    if rekey_ike:
        p.i.rekey_ike(p.now)
        p.roundtrip()
        p.i.delete(p.now)
        p.roundtrip()
    return p


def _names(pkt: Packet) -> list[str]:
    return [layer.__class__.__name__ for layer in pkt.iterpayloads()]


def _inner_as_plain(p: Pair, who: str, data: bytes) -> bytes | None:
    """The decrypted inner chain under a plain header, so scapy can dissect it too."""
    hdr, _, sk = parse_message(data)
    assert sk is not None
    receiver = p.r if who == "i>r" else p.i
    for ch in (receiver.ch, receiver.old_ch):
        if ch is not None and ch.inb is not None and ch.spi_i == hdr.spi_i:
            inner = ch.inb.open(data, sk.offset)
            parse_chain(Buffer(inner), sk.first_inner)  # our own parser agrees
            head = bytearray(data[:28])
            head[16] = sk.first_inner
            head[24:28] = (28 + len(inner)).to_bytes(4, "big")
            return bytes(head) + inner
    return None


@pytest.mark.parametrize("prop", [GCM, CBC], ids=["gcm", "cbc"])
def test_scapy_dissects_every_message(prop: IkeProposal) -> None:
    p = busy_pair(prop, rekey_ike=False)  # after an IKE rekey the old keys are gone
    assert len(p.wire) >= 12
    seen_inner: set[str] = set()
    for who, _, data in p.wire:
        pkt = IKEv2(data)
        names = _names(pkt)
        assert Raw not in pkt and "Padding" not in names, pkt.summary()
        assert pkt.version == 0x20 and pkt.length == len(data)
        # §3.1: the I flag marks the original initiator (no IKE rekey in this conversation)
        assert bool(pkt.flags & 0x08) == (who == "i>r")
        if pkt.exch_type == 34:
            assert names[:4] == ["IKEv2", "IKEv2_SA", "IKEv2_KE", "IKEv2_Nonce"]
            continue
        assert names == ["IKEv2", "IKEv2_Encrypted"]
        plain = _inner_as_plain(p, who, data)
        assert plain is not None
        inner = IKEv2(plain)
        assert Raw not in inner, inner.summary()
        seen_inner.update(_names(inner))
    assert {
        "IKEv2_IDi",
        "IKEv2_IDr",
        "IKEv2_AUTH",
        "IKEv2_SA",
        "IKEv2_TSi",
        "IKEv2_TSr",
        "IKEv2_Notify",
        "IKEv2_Nonce",
        "IKEv2_KE",
        "IKEv2_Delete",
    } <= seen_inner


def test_scapy_reads_our_fields() -> None:
    p = Pair(*configs(ike_proposals=(GCM,)))
    p.handshake()
    init = IKEv2(p.wire[0][2])
    assert init.init_SPI == p.i.ch.spi_i and init.resp_SPI == b"\x00" * 8
    assert init.exch_type == 34 and init.flags == 0x08 and init.id == 0
    sa = init[IKEv2].payload
    prop = sa.prop
    assert prop.proto == 1 and prop.trans_nb == 3
    assert [t.transform_id for t in prop.trans.iterpayloads()] == [20, 5, 19]
    assert prop.trans.key_length == 256
    auth = IKEv2(_inner_as_plain(p, "i>r", p.wire[2][2]))
    assert auth.exch_type == 35 and auth.id == 1
    assert _names(auth)[1:5] == ["IKEv2_IDi", "IKEv2_Notify", "IKEv2_IDr", "IKEv2_AUTH"]
    assert auth["IKEv2_IDi"].IDtype == 1 and I_ADDR[0] == auth["IKEv2_IDi"].ID
    assert auth["IKEv2_AUTH"].auth_type == 2 and len(auth["IKEv2_AUTH"].load) == 32
    ts = auth["IKEv2_TSi"].traffic_selector[0]
    assert ts.starting_address_v4 == I_ADDR[0] and ts.ending_address_v4 == I_ADDR[0]


TSHARK = shutil.which("tshark")


def _pcap(p: Pair, path: Path) -> None:
    pkts = []
    for who, t, data in p.wire:
        src, dst = (I_ADDR, R_ADDR) if who == "i>r" else (R_ADDR, I_ADDR)
        pkt = IP(src=src[0], dst=dst[0]) / UDP(sport=src[1], dport=dst[1]) / Raw(data)
        pkt.time = t
        pkts.append(pkt)
    wrpcap(str(path), pkts)


def _tshark(path: Path, *rows: str) -> str:
    assert TSHARK is not None
    args = [TSHARK, "-n", "-r", str(path), "-V", "-O", "isakmp"]
    for row in rows:
        args += ["-o", f"uat:ikev2_decryption_table:{row}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout


def _row(k: dict[str, str]) -> str:
    return (
        f'{k["spi_i"]},{k["spi_r"]},{k["sk_ei"]},{k["sk_er"]},"{k["encryption"]}",'
        f'{k["sk_ai"]},{k["sk_ar"]},"{k["integrity"]}"'
    )


@pytest.mark.skipif(TSHARK is None, reason="tshark not installed")
@pytest.mark.parametrize("prop", [GCM, CBC], ids=["gcm", "cbc"])
def test_tshark_dissects_and_decrypts(prop: IkeProposal, tmp_path: Path) -> None:
    p = busy_pair(prop, rekey_ike=False)
    keys = p.i.export_keys()
    cap = tmp_path / "ike.pcap"
    _pcap(p, cap)
    text = _tshark(cap, _row(keys))
    assert "Malformed" not in text and "Exception" not in text
    n_encrypted = sum(1 for _, _, d in p.wire if d[18] != 34)
    assert text.count("[correct]") == n_encrypted
    assert "incorrect" not in text
    for want in (
        "Identification - Initiator",
        "Identification - Responder",
        "Authentication",
        "Traffic Selector - Initiator",
        "USE_TRANSPORT_MODE",
        "REKEY_SA",
        "Delete",
        "INITIAL_CONTACT",
        "198.51.100.1",
    ):
        assert want in text, want
    # Without keys tshark still parses everything but cannot open SK payloads
    plain = _tshark(cap)
    assert "Malformed" not in plain and "[correct]" not in plain


@pytest.mark.skipif(TSHARK is None, reason="tshark not installed")
def test_tshark_follows_ike_rekey_with_both_key_rows(tmp_path: Path) -> None:
    p = Pair(*configs(ike_proposals=(GCM,)))
    p.handshake()
    first = p.i.export_keys()
    p.i.rekey_ike(p.now)
    p.roundtrip()
    second = p.i.export_keys()
    p.i.liveness_check(p.now)
    p.roundtrip()
    p.r.delete(p.now)
    p.roundtrip()
    cap = tmp_path / "rekey.pcap"
    _pcap(p, cap)
    text = _tshark(cap, _row(first), _row(second))
    assert "Malformed" not in text and "incorrect" not in text
    assert text.count("[correct]") == sum(1 for _, _, d in p.wire if d[18] != 34)
    assert first["spi_i"] != second["spi_i"]


def test_esp_proposal_on_the_wire_has_esn_and_spi() -> None:
    p = Pair(*configs(esp_proposals=(EspProposal(128, True), EspProposal(256, False))))
    p.handshake()
    auth = IKEv2(_inner_as_plain(p, "i>r", p.wire[2][2]))
    props = list(auth["IKEv2_SA"].prop.iterpayloads())
    props = [x for x in props if x.__class__.__name__ == "IKEv2_Proposal"]
    assert [x.proto for x in props] == [3, 3] and all(x.SPIsize == 4 for x in props)
    first = [(t.transform_type, t.transform_id) for t in props[0].trans.iterpayloads()]
    assert first == [(1, 20), (5, 1)]
