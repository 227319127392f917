"""Sequence-number exhaustion (RFC 4303 §3.3.3) and lifetimes reported via status(now)."""

from __future__ import annotations

import pytest

import esp

KEY = bytes(32) + b"salt"
SPI = 0x5A5A5A5A
M32 = (1 << 32) - 1
M64 = (1 << 64) - 1


@pytest.mark.parametrize(("use_esn", "last"), [(False, M32), (True, M64)])
def test_hard_limit_last_number_is_sent_then_refused(use_esn: bool, last: int) -> None:
    sa = esp.OutboundSA(SPI, KEY, esn=use_esn, seq=last)
    packet = sa.encapsulate(b"last", 6)
    assert packet[4:8] == b"\xff\xff\xff\xff"
    assert packet[8:16] == last.to_bytes(8, "big")  # IV = full sequence number
    assert sa.status(0.0).hard == {"seq"}
    for _ in range(2):
        with pytest.raises(esp.SequenceExhausted):
            sa.encapsulate(b"one more", 6)
    assert sa.next_seq == last + 1
    assert sa.counters.drops["seq_exhausted"] == 2
    assert sa.counters.packets == 1


def test_esn_sender_crosses_2_32() -> None:
    sa = esp.OutboundSA(SPI, KEY, esn=True, seq=M32)
    a, b = sa.encapsulate(b"a", 6), sa.encapsulate(b"b", 6)
    assert a[4:16] == b"\xff\xff\xff\xff" + M32.to_bytes(8, "big")
    assert b[4:16] == bytes(4) + (1 << 32).to_bytes(8, "big")
    assert not sa.status(0.0).soft_expired


@pytest.mark.parametrize(
    ("use_esn", "soft"), [(False, (1 << 32) - (1 << 20)), (True, (1 << 64) - (1 << 32))]
)
def test_default_soft_threshold(use_esn: bool, soft: int) -> None:
    sa = esp.OutboundSA(SPI, KEY, esn=use_esn, seq=soft - 1)
    sa.encapsulate(b"x", 6)  # sends soft - 1
    assert not sa.status(0.0).soft_expired
    sa.encapsulate(b"x", 6)  # sends soft
    status = sa.status(0.0)
    assert status.soft == {"seq"}
    assert not status.hard_expired


def test_soft_threshold_configurable_and_reported_inbound() -> None:
    out = esp.OutboundSA(SPI, KEY, soft_seq=3)
    inb = esp.InboundSA(SPI, KEY, soft_seq=3)
    for expected in (False, False, True):
        inb.decapsulate(out.encapsulate(b"x", 6))
        assert out.status(0.0).soft_expired is expected
        assert inb.status(0.0).soft_expired is expected


def test_inbound_hard_seq_when_top_reaches_last_number() -> None:
    out = esp.OutboundSA(SPI, KEY, seq=M32)
    inb = esp.InboundSA(SPI, KEY)
    inb.window.reset(M32 - 1)
    assert not inb.status(0.0).hard_expired
    inb.decapsulate(out.encapsulate(b"x", 6))
    assert inb.status(0.0).hard == {"seq"}


@pytest.mark.parametrize("direction", ["out", "in"])
def test_packet_byte_and_time_lifetimes(direction: str) -> None:
    limits = {
        "soft_packets": 2,
        "hard_packets": 4,
        "soft_bytes": 250,
        "hard_bytes": 1000,
        "soft_seconds": 100.0,
        "hard_seconds": 200.0,
        "created": 1000.0,
    }
    out = esp.OutboundSA(SPI, KEY, **limits)  # type: ignore[arg-type]
    inb = esp.InboundSA(SPI, KEY, **limits)  # type: ignore[arg-type]
    sa: esp.OutboundSA | esp.InboundSA = out if direction == "out" else inb

    def send(n: int) -> None:
        inb.decapsulate(out.encapsulate(bytes(n), 4))

    assert sa.status(1000.0) == esp.LifetimeStatus(frozenset(), frozenset())
    send(100)
    assert not sa.status(1099.9).soft_expired
    send(100)  # 2 packets, 200 bytes
    assert sa.status(1000.0).soft == {"packets"}
    send(100)  # 3 packets, 300 bytes
    assert sa.status(1100.0).soft == {"packets", "bytes", "seconds"}
    assert not sa.status(1199.0).hard_expired
    assert sa.status(1200.0).hard == {"seconds"}
    send(700)  # 4 packets, 1000 bytes
    assert sa.status(1000.0).hard == {"packets", "bytes"}
    assert sa.counters.packets == 4
    assert sa.counters.bytes == 1000
    # reported, not enforced: only the sequence number stops a sender
    send(1)
    assert sa.counters.packets == 5


def test_hard_limit_without_soft_limit_reports_both() -> None:
    sa = esp.OutboundSA(SPI, KEY, hard_packets=1)
    sa.encapsulate(b"", 6)
    status = sa.status(0.0)
    assert status.soft == status.hard == {"packets"}


@pytest.mark.parametrize("seq", [0, -1, (1 << 32) + 1])
def test_initial_sequence_number_range(seq: int) -> None:
    with pytest.raises(ValueError):
        esp.OutboundSA(SPI, KEY, seq=seq)
