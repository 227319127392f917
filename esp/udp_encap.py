"""UDP encapsulation of ESP and IKE on port 4500 (RFC 3948, RFC 7296 §2.23).

Framing only: the daemon's UDP socket adds and strips the UDP header. What one
UDP payload on port 4500 can be (RFC 3948 §2.2):

* a NAT-keepalive: exactly one byte, 0xFF (§2.3);
* an IKE message: the 4-byte non-ESP marker (all zero) and then the IKE header;
* an ESP packet, as is: its first 4 bytes are the SPI, which is never 0
  (RFC 4303 §2.1), so it cannot be mistaken for the marker.

Anything else (empty, or 1 to 3 bytes other than 0xFF) is classified "esp" and
left to ESP processing to reject as truncated.
"""

from __future__ import annotations

from typing import Literal

from .errors import MalformedError

__all__ = [
    "NAT_KEEPALIVE",
    "NAT_T_PORT",
    "NON_ESP_MARKER",
    "UdpKind",
    "classify_udp4500",
    "decode",
    "encode_esp_in_udp",
    "encode_ike_in_udp",
    "nat_keepalive",
    "strip_non_esp_marker",
]

NAT_T_PORT = 4500
NON_ESP_MARKER = b"\x00\x00\x00\x00"
NAT_KEEPALIVE = b"\xff"

UdpKind = Literal["ike", "esp", "keepalive"]


def classify_udp4500(payload: bytes) -> UdpKind:
    """Say what a UDP payload received on port 4500 is, without copying it.

    Total: never raises, so the daemon may call it on anything a socket returns.
    RFC 3948 §2.2 tells the kinds apart by the marker alone, so whatever is neither
    a keepalive nor marked IKE goes to ESP processing, which rejects what is too
    short (``InboundSA.decapsulate`` raises :class:`TruncatedError`).
    """
    if payload[:4] == NON_ESP_MARKER:
        return "ike"
    if payload == NAT_KEEPALIVE:
        return "keepalive"
    return "esp"


def strip_non_esp_marker(payload: bytes) -> bytes:
    """Return the IKE message behind the non-ESP marker; MalformedError if absent."""
    if payload[:4] != NON_ESP_MARKER:
        raise MalformedError("no non-ESP marker")
    return payload[4:]


def decode(payload: bytes) -> tuple[UdpKind, bytes]:
    """Demultiplex a port-4500 payload: ("ike", IKE message without the marker),
    ("esp", the ESP packet) or ("keepalive", b"")."""
    kind = classify_udp4500(payload)
    if kind == "ike":
        return kind, payload[4:]
    if kind == "esp":
        return kind, payload
    return kind, b""


def encode_esp_in_udp(esp_packet: bytes) -> bytes:
    """UDP payload for an ESP packet: the packet itself (RFC 3948 §2.1).

    Refuses SPI 0, which a receiver would take for the non-ESP marker.
    """
    if len(esp_packet) < 8 or esp_packet[:4] == NON_ESP_MARKER:
        raise ValueError("not an ESP packet (too short, or SPI 0)")
    return esp_packet


def encode_ike_in_udp(ike_message: bytes) -> bytes:
    """UDP payload for an IKE message sent on port 4500: marker ‖ message."""
    return NON_ESP_MARKER + ike_message


def nat_keepalive() -> bytes:
    """The NAT-keepalive payload (RFC 3948 §2.3): the single byte 0xFF."""
    return NAT_KEEPALIVE
