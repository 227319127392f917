"""Anti-replay (RFC 4303 §3.4.3, Appendix A) through InboundSA.decapsulate."""

from __future__ import annotations

import pytest

import esp

KEY = bytes(range(0x40, 0x50)) + b"salt"
SPI = 0x11223344


def _pair(
    *, esn: bool = False, window: int = 128, seq: int = 1
) -> tuple[esp.OutboundSA, esp.InboundSA]:
    out = esp.OutboundSA(SPI, KEY, esn=esn, seq=seq)
    inb = esp.InboundSA(SPI, KEY, esn=esn, replay_window=window)
    if seq > 1:
        inb.window.reset(seq - 1)
    return out, inb


def _packets(out: esp.OutboundSA, count: int) -> list[bytes]:
    return [out.encapsulate(b"pkt %d" % out.next_seq, 6) for _ in range(count)]


def _state(inb: esp.InboundSA) -> tuple[int, int]:
    return inb.window.top, inb.window.missing


def test_in_order_then_duplicate_rejected() -> None:
    out, inb = _pair()
    pkts = _packets(out, 3)
    for i, p in enumerate(pkts, 1):
        assert inb.decapsulate(p) == (b"pkt %d" % i, 6)
    with pytest.raises(esp.ReplayError):
        inb.decapsulate(pkts[1])
    assert inb.counters.drops["replayed"] == 1
    assert inb.counters.packets == 3


@pytest.mark.parametrize("size", [32, 64, 128, 1024])
def test_window_edges(size: int) -> None:
    out, inb = _pair(window=size)
    pkts = _packets(out, size + 5)  # seq 1 .. size+5
    inb.decapsulate(pkts[-1])  # top = size + 5
    # top - size + 1 is the oldest number inside the window: accepted once
    oldest_inside = size + 5 - size + 1
    assert inb.decapsulate(pkts[oldest_inside - 1])[0] == b"pkt %d" % oldest_inside
    # top - size is left of the window: too old, even though never received
    with pytest.raises(esp.ReplayError):
        inb.decapsulate(pkts[oldest_inside - 2])
    assert inb.counters.drops["replayed"] == 1


def test_reorder_inside_window_accepted_once_each() -> None:
    out, inb = _pair()
    pkts = _packets(out, 40)
    order = [10, 3, 40, 1, 2, 39, 20, 4, *range(5, 10), *range(11, 20), *range(21, 39)]
    assert sorted(order) == list(range(1, 41))
    for n in order:
        assert inb.decapsulate(pkts[n - 1])[0] == b"pkt %d" % n
    assert inb.window.top == 40
    assert inb.window.missing == 0  # every gap filled
    for n in (1, 20, 40):
        with pytest.raises(esp.ReplayError):
            inb.decapsulate(pkts[n - 1])


def test_big_jump_forgets_everything_left_of_window() -> None:
    out, inb = _pair(window=32)
    pkts = _packets(out, 200)
    inb.decapsulate(pkts[0])
    inb.decapsulate(pkts[199])  # jump of 199 > window
    assert inb.window.missing == (1 << 32) - 2  # all but top missing
    assert inb.decapsulate(pkts[199 - 31])[0] == b"pkt 169"
    with pytest.raises(esp.ReplayError):
        inb.decapsulate(pkts[199 - 32])


def test_sequence_zero_is_never_valid() -> None:
    _, inb = _pair()
    # A packet with seq 0 is rejected before any decryption (ReplayError, not ICV).
    forged = SPI.to_bytes(4, "big") + bytes(4) + bytes(40)
    with pytest.raises(esp.ReplayError):
        inb.decapsulate(forged)


@pytest.mark.parametrize("size", [0, 31, 65537, -1])
def test_window_size_limits(size: int) -> None:
    with pytest.raises(ValueError):
        esp.InboundSA(SPI, KEY, replay_window=size)


def test_window_size_65536_works() -> None:
    out, inb = _pair(window=65536)
    pkts = _packets(out, 3)
    inb.decapsulate(pkts[2])
    inb.decapsulate(pkts[0])
    assert inb.window.seen(1)
    assert not inb.window.seen(2)


def test_esn_rollover_across_2_32() -> None:
    start = (1 << 32) - 3
    out, inb = _pair(esn=True, seq=start)
    pkts = _packets(out, 6)  # 2^32-3 .. 2^32+2
    assert pkts[3][4:8] == bytes(4)  # 2^32 carries low bits 0
    # deliver the post-rollover ones first, then the late pre-rollover ones
    for i in (3, 5, 4, 0, 2, 1):
        seq = start + i
        assert inb.decapsulate(pkts[i])[0] == b"pkt %d" % seq
    assert inb.window.top == (1 << 32) + 2
    for p in pkts:
        with pytest.raises(esp.ReplayError):
            inb.decapsulate(p)


def test_esn_without_esn_receiver_cannot_cross() -> None:
    """Non-ESN peers stop at 2^32-1: the last packet is accepted, nothing after it."""
    out, inb = _pair(seq=(1 << 32) - 2)
    pkts = _packets(out, 2)
    for p in pkts:
        inb.decapsulate(p)
    assert inb.window.top == (1 << 32) - 1
    with pytest.raises(esp.SequenceExhausted):
        out.encapsulate(b"x", 6)


def test_esn_packet_from_far_behind_fails_icv_and_moves_nothing() -> None:
    """A packet from the previous subspace but outside the window: A2.2 infers the
    next subspace, the ICV fails (A2.3) and the window stays where it was."""
    out_old = esp.OutboundSA(SPI, KEY, esn=True, seq=(5 << 32) + 1000)
    old = out_old.encapsulate(b"old", 6)
    out, inb = _pair(esn=True, seq=(6 << 32) + 2000)
    inb.decapsulate(out.encapsulate(b"new", 6))
    before = _state(inb)
    with pytest.raises(esp.IntegrityError):
        inb.decapsulate(old)
    assert _state(inb) == before


def _flip_cases() -> list[tuple[bool, int, int]]:
    return [(esn, pos, mask) for esn in (False, True) for pos in range(60) for mask in (1, 0x80)]


@pytest.mark.parametrize(("use_esn", "pos", "mask"), _flip_cases())
def test_single_byte_flip_is_rejected_and_window_does_not_move(
    use_esn: bool, pos: int, mask: int
) -> None:
    """Bytes 0-3 (SPI): UnknownSpiError. Every other byte (sequence number, IV,
    ciphertext, ICV): IntegrityError, except a sequence number turned into one
    already received (ReplayError). Never a payload, never a window change."""
    out, inb = _pair(esn=use_esn, seq=(7 << 32) + 100 if use_esn else 100)
    pkts = [out.encapsulate(b"26 bytes of payload here..", 6) for _ in range(2)]
    inb.decapsulate(pkts[1])  # top = 101, 100 missing
    assert len(pkts[0]) == 60  # SPI, seq, IV 16 + payload 26 + trailer 2 + ICV 16
    before = _state(inb)
    bad = bytearray(pkts[0])
    bad[pos] ^= mask
    expected = esp.UnknownSpiError if pos < 4 else esp.IntegrityError
    if pos == 7 and mask == 1:
        # low bits 100 ^ 1 = 101 were received: caught by the window before decryption
        expected = esp.ReplayError
    with pytest.raises(expected):
        inb.decapsulate(bytes(bad))
    assert _state(inb) == before
    assert inb.counters.drops[expected.counter] == 1
    # the genuine packet is still accepted afterwards
    assert inb.decapsulate(pkts[0]) == (b"26 bytes of payload here..", 6)
