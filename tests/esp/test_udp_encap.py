"""RFC 3948 port-4500 framing: non-ESP marker, ESP as is, NAT-keepalive 0xFF."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import UDP
from scapy.layers.ipsec import ESP, NAT_KEEPALIVE, NON_ESP

import esp
from esp import udp_encap

# An IKE_SA_INIT header (RFC 7296 §3.1): SPIi, SPIr 0, next payload SA, version
# 2.0, exchange 34, flags Initiator, message id 0, length 28.
IKE_HEADER = bytes.fromhex("0102030405060708 0000000000000000 21 20 22 08 00000000 0000001c")
ESP_PACKET = bytes.fromhex("c0de0042 00000001 0000000000000001") + bytes(20)


def test_constants() -> None:
    assert udp_encap.NON_ESP_MARKER == b"\x00\x00\x00\x00"
    assert udp_encap.nat_keepalive() == b"\xff" == udp_encap.NAT_KEEPALIVE
    assert udp_encap.NAT_T_PORT == 4500


@pytest.mark.parametrize(
    ("payload", "kind", "inner"),
    [
        (b"\x00\x00\x00\x00" + IKE_HEADER, "ike", IKE_HEADER),
        (ESP_PACKET, "esp", ESP_PACKET),
        (b"\xff", "keepalive", b""),
        (b"\x00\x00\x00\x01", "esp", b"\x00\x00\x00\x01"),  # SPI 1; too short is decap's job
        (b"\x00\x00\x00\x00", "ike", b""),  # marker only; the IKE parser rejects it
    ],
)
def test_demux(payload: bytes, kind: str, inner: bytes) -> None:
    assert udp_encap.classify_udp4500(payload) == kind
    assert udp_encap.decode(payload) == (kind, inner)


@pytest.mark.parametrize("payload", [b"", b"\x00", b"\xfe", b"\xff\xff", b"\x00\x00\x00"])
def test_demux_junk_goes_to_esp_which_calls_it_truncated(payload: bytes) -> None:
    """Never an exception from the demux (the daemon calls it on raw input)."""
    assert udp_encap.classify_udp4500(payload) == "esp"
    assert udp_encap.decode(payload) == ("esp", payload)
    with pytest.raises(esp.TruncatedError):
        esp.InboundSA(0xC0DE0042, bytes(20)).decapsulate(payload)


def test_marker_prefix_shorter_than_four_bytes_is_not_ike() -> None:
    assert udp_encap.classify_udp4500(b"\x00\x00\x00") == "esp"
    assert udp_encap.classify_udp4500(b"\x00\x00\x00\x00\x00") == "ike"


def test_encode_ike_and_strip_marker() -> None:
    framed = udp_encap.encode_ike_in_udp(IKE_HEADER)
    assert framed == bytes(4) + IKE_HEADER
    assert udp_encap.strip_non_esp_marker(framed) == IKE_HEADER
    with pytest.raises(esp.MalformedError):
        udp_encap.strip_non_esp_marker(ESP_PACKET)


def test_encode_esp_is_identity_and_refuses_spi_zero() -> None:
    assert udp_encap.encode_esp_in_udp(ESP_PACKET) == ESP_PACKET
    for bad in (bytes(4) + ESP_PACKET[4:], ESP_PACKET[:7]):
        with pytest.raises(ValueError):
            udp_encap.encode_esp_in_udp(bad)


def test_scapy_agrees_on_the_demux() -> None:
    """scapy's RFC 3948 dissector (ESP.dispatch_hook) classifies our framings alike."""
    out = esp.OutboundSA(0xC0DE0042, bytes(20))
    cases = {
        NON_ESP: udp_encap.encode_ike_in_udp(IKE_HEADER),
        ESP: udp_encap.encode_esp_in_udp(out.encapsulate(b"x", 4)),
        NAT_KEEPALIVE: udp_encap.nat_keepalive(),
    }
    names = {NON_ESP: "ike", ESP: "esp", NAT_KEEPALIVE: "keepalive"}
    for layer, payload in cases.items():
        datagram = UDP(bytes(UDP(sport=4500, dport=4500) / payload))
        assert datagram.haslayer(layer)
        assert udp_encap.classify_udp4500(payload) == names[layer]


@given(st.binary(max_size=64))
def test_demux_is_total_and_consistent(payload: bytes) -> None:
    kind, inner = udp_encap.decode(payload)
    assert kind == udp_encap.classify_udp4500(payload)
    if kind == "ike":
        assert payload == udp_encap.encode_ike_in_udp(inner)
    elif kind == "keepalive":
        assert payload == b"\xff"
    else:
        assert inner == payload
