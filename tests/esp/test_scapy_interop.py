"""Cross-check with scapy's ESP (scapy.layers.ipsec.SecurityAssociation, AES-GCM).

scapy's conventions, read from its ipsec.py (scapy 2.8):
* ``crypt_key`` for 'AES-GCM' is key ‖ 4-byte salt, like IKEv2's KEYMAT and ours.
* Its IV is random unless ``iv=`` is given; given IV = the sequence number, its ESP
  bytes must equal ours exactly (same 4-byte-alignment padding 1, 2, 3).
* ESN: scapy has no high-bit inference; the SA carries a fixed ``esn`` (high 32
  bits) used for the AAD on both encrypt and decrypt. Also, ``encrypt(seq_num=0)``
  and ``esn=0`` arguments are ignored (``seq_num or self.seq_num``), so a packet with
  low bits 0 (the one after an ESN rollover) needs an SA built with ``seq_num=0``.
  We test ESN through those fixed high bits, which is what scapy supports.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Packet, Raw, raw

import esp

SPI = 0xC0DE0042
OUTER = {"src": "192.0.2.1", "dst": "198.51.100.1"}
KEYS = {128: bytes(range(0x10, 0x20)) + b"\x01\x02\x03\x04", 256: bytes(range(32)) + b"salt"}
# (high 32 bits, low 32 bits) of the first sequence number used
SEQS = {False: [(0, 1), (0, 0xFFFFFFF0)], True: [(0, 1), (1, 5), (0x12345678, 0xFFFFFFF0)]}


def _cases() -> list[tuple[int, str, bool, int, int]]:
    return [
        (bits, mode, use_esn, high, low)
        for bits in (128, 256)
        for mode in ("tunnel", "transport")
        for use_esn in (False, True)
        for high, low in SEQS[use_esn]
    ]


CASES = _cases()
IDS = [f"aes{b}-{m}-{'esn' if e else 'seq32'}-{h:x}:{lo:x}" for b, m, e, h, lo in CASES]


def _inner_packets() -> list[Packet]:
    tacacs = Raw(b"\xc0\x01\x01\x00" + bytes(8) + b"TACACS+ body")
    return [
        IP(src="203.0.113.5", dst="203.0.113.9") / TCP(sport=40000, dport=49) / tacacs,
        IPv6(src="2001:db8::5", dst="2001:db8::9") / TCP(sport=40000, dport=49) / tacacs,
        IP(src="203.0.113.5", dst="203.0.113.9") / TCP(sport=1, dport=49) / Raw(bytes(1400)),
    ]


def _scapy_sa(bits: int, mode: str, use_esn: bool, high: int, low: int) -> SecurityAssociation:
    return SecurityAssociation(
        ESP,
        spi=SPI,
        seq_num=low,
        crypt_algo="AES-GCM",
        crypt_key=KEYS[bits],
        tunnel_header=IP(**OUTER) if mode == "tunnel" else None,
        esn_en=use_esn,
        esn=high,
    )


def _payload_and_nh(inner: Packet, mode: str) -> tuple[bytes, int]:
    """What the daemon hands to encapsulate for this inner packet."""
    if mode == "tunnel":
        return raw(inner), 4 if inner.version == 4 else 41
    # transport: the upper-layer segment; scapy sends it from the inner packet's own
    # addresses, so build it the same way (checksums over those addresses).
    built = inner.__class__(raw(inner))
    return raw(built[TCP]), 6


def _transport_ip(inner: Packet) -> Packet:
    return inner.__class__(raw(inner))


@pytest.mark.parametrize(("bits", "mode", "use_esn", "high", "low"), CASES, ids=IDS)
def test_scapy_decrypts_ours(bits: int, mode: str, use_esn: bool, high: int, low: int) -> None:
    ours = esp.OutboundSA(SPI, KEYS[bits], mode=mode, esn=use_esn, seq=(high << 32) | low)
    theirs = _scapy_sa(bits, mode, use_esn, high, low)
    for inner in _inner_packets():
        if mode == "transport" and inner.version == 6:
            continue  # one IP version is enough for transport mode
        payload, nh = _payload_and_nh(inner, mode)
        packet = ours.encapsulate(payload, nh)
        if mode == "tunnel":
            wire = IP(raw(IP(**OUTER, proto=50) / Raw(packet)))
            assert raw(theirs.decrypt(wire)) == raw(inner)
        else:
            ip = _transport_ip(inner)
            wire = IP(raw(IP(src=ip.src, dst=ip.dst, proto=50) / Raw(packet)))
            opened = theirs.decrypt(wire)
            assert opened.proto == nh
            assert raw(opened.payload) == payload


@pytest.mark.parametrize(("bits", "mode", "use_esn", "high", "low"), CASES, ids=IDS)
def test_scapy_bytes_equal_ours_with_iv_seq(
    bits: int, mode: str, use_esn: bool, high: int, low: int
) -> None:
    """scapy told to use IV = sequence number must produce our exact packet."""
    ours = esp.OutboundSA(SPI, KEYS[bits], mode=mode, esn=use_esn, seq=(high << 32) | low)
    theirs = _scapy_sa(bits, mode, use_esn, high, low)
    for inner in _inner_packets():
        if mode == "transport" and inner.version == 6:
            continue
        seq = ours.next_seq
        payload, nh = _payload_and_nh(inner, mode)
        packet = ours.encapsulate(payload, nh)
        sent = theirs.encrypt(
            _transport_ip(inner) if mode == "transport" else inner,
            iv=seq.to_bytes(8, "big"),
        )
        assert raw(sent[ESP]) == packet


@pytest.mark.parametrize(("bits", "mode", "use_esn", "high", "low"), CASES, ids=IDS)
def test_we_decrypt_scapy(bits: int, mode: str, use_esn: bool, high: int, low: int) -> None:
    theirs = _scapy_sa(bits, mode, use_esn, high, low)
    ours = esp.InboundSA(SPI, KEYS[bits], mode=mode, esn=use_esn)
    ours.window.reset(((high << 32) | low) - 1)
    for inner in _inner_packets():
        if mode == "transport" and inner.version == 6:
            continue
        payload, nh = _payload_and_nh(inner, mode)
        sent = theirs.encrypt(_transport_ip(inner) if mode == "transport" else inner)
        assert ours.decapsulate(raw(sent[ESP])) == (payload, nh)
    assert ours.counters.packets == (2 if mode == "transport" else 3)


def test_we_decrypt_scapy_across_esn_rollover() -> None:
    """Packets 2^32-1, 2^32 (low bits 0) and 2^32+1 from scapy, out of order."""
    ours = esp.InboundSA(SPI, KEYS[128], esn=True)
    ours.window.reset((1 << 32) - 10)
    inner = _inner_packets()[0]
    sent = {}
    for high, low in ((0, 0xFFFFFFFF), (1, 0), (1, 1)):
        # seq_num=0 given to encrypt() would be ignored by scapy, so put it in the SA
        sa = _scapy_sa(128, "tunnel", True, high, low)
        sent[(high << 32) | low] = raw(sa.encrypt(inner)[ESP])
    for seq in ((1 << 32) + 1, 1 << 32, (1 << 32) - 1):
        assert ours.decapsulate(sent[seq]) == (raw(inner), 4)
    assert ours.window.top == (1 << 32) + 1
    for seq in sent:
        with pytest.raises(esp.ReplayError):
            ours.decapsulate(sent[seq])


def test_scapy_decrypts_ours_across_esn_rollover() -> None:
    """Our packets 2^32-1, 2^32, 2^32+1: scapy needs esn=0 for the first, 1 for the rest."""
    ours = esp.OutboundSA(SPI, KEYS[256], esn=True, seq=(1 << 32) - 1)
    inner = _inner_packets()[0]
    packets = [ours.encapsulate(raw(inner), 4) for _ in range(3)]
    assert [p[4:8] for p in packets] == [b"\xff\xff\xff\xff", bytes(4), b"\x00\x00\x00\x01"]
    for packet, high in zip(packets, (0, 1, 1), strict=True):
        theirs = _scapy_sa(256, "tunnel", True, high, 0)
        assert raw(theirs.decrypt(IP(raw(IP(**OUTER, proto=50) / Raw(packet))))) == raw(inner)
