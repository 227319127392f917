"""Construction, key handling, wire layout of what encapsulate emits, repr hygiene."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import esp

KEY = bytes(range(0x30, 0x40)) + b"SALT"
SPI = 0x01020304


@pytest.mark.parametrize("length", [0, 4, 16, 19, 21, 24, 28, 32, 35, 37, 40])
def test_keying_material_must_be_20_or_36_bytes(length: int) -> None:
    for cls in (esp.OutboundSA, esp.InboundSA):
        with pytest.raises(ValueError):
            cls(SPI, bytes(length))


def test_key_not_bytes_is_value_error() -> None:
    with pytest.raises(ValueError):
        esp.OutboundSA(SPI, "x" * 20)  # type: ignore[arg-type]


@pytest.mark.parametrize("spi", [0, -1, 1 << 32])
def test_spi_range(spi: int) -> None:
    with pytest.raises(ValueError):
        esp.InboundSA(spi, KEY)


def test_mode_is_kept_and_checked() -> None:
    assert esp.OutboundSA(SPI, KEY).mode == "tunnel"
    assert esp.InboundSA(SPI, KEY, mode="transport").mode == "transport"
    with pytest.raises(ValueError):
        esp.OutboundSA(SPI, KEY, mode="beet")


@pytest.mark.parametrize("keymat", [KEY, bytes(range(32)) + b"SALT"])
def test_repr_holds_no_secret(keymat: bytes) -> None:
    for sa in (esp.OutboundSA(SPI, keymat), esp.InboundSA(SPI, keymat)):
        text = repr(sa) + str(sa) + repr(sa.counters)
        assert "0x01020304" in text
        for secret in (keymat[:-4], keymat[-4:], keymat):
            assert secret.hex() not in text
            assert repr(secret) not in text
        assert "SALT" not in text


@pytest.mark.parametrize("use_esn", [False, True])
@pytest.mark.parametrize("n", range(9))
def test_wire_layout(use_esn: bool, n: int) -> None:
    """SPI, seq low 32, IV = 64-bit seq, then GCM(salt ‖ IV) over payload ‖ pad ‖
    pad length ‖ next header with the RFC 4106 §5 AAD, padded to 4 bytes only."""
    seq = (3 << 32) + 9 if use_esn else 9
    sa = esp.OutboundSA(SPI, KEY, esn=use_esn, seq=seq)
    payload = bytes(range(100, 100 + n))
    packet = sa.encapsulate(payload, 41)
    spi, low, iv = struct.unpack_from(">II8s", packet)
    assert (spi, low, iv) == (SPI, seq & 0xFFFFFFFF, seq.to_bytes(8, "big"))
    aad = struct.pack(">III", SPI, seq >> 32, low) if use_esn else packet[:8]
    plain = AESGCM(KEY[:16]).decrypt(b"SALT" + iv, packet[16:], aad)
    pad = (-(n + 2)) % 4
    assert plain == payload + bytes(range(1, pad + 1)) + bytes((pad, 41))
    assert len(packet) == 16 + n + pad + 2 + 16
    assert (len(plain)) % 4 == 0


def test_next_header_out_of_range() -> None:
    sa = esp.OutboundSA(SPI, KEY)
    for bad in (-1, 256, "4"):
        with pytest.raises(ValueError):
            sa.encapsulate(b"x", bad)  # type: ignore[arg-type]


def test_sequence_numbers_start_at_one_and_count_up() -> None:
    sa = esp.OutboundSA(SPI, KEY)
    seqs = [struct.unpack_from(">I", sa.encapsulate(b"", 6), 4)[0] for _ in range(3)]
    assert seqs == [1, 2, 3]
    assert sa.counters.as_dict()["packets"] == 3


def test_error_classes_and_counters() -> None:
    expected = {
        esp.MalformedError: "malformed",
        esp.TruncatedError: "truncated",
        esp.PadError: "bad_padding",
        esp.ReplayError: "replayed",
        esp.IntegrityError: "icv_failed",
        esp.UnknownSpiError: "unknown_spi",
        esp.DummyPacket: "dummy",
        esp.SequenceExhausted: "seq_exhausted",
    }
    for cls, counter in expected.items():
        assert issubclass(cls, esp.EspError)
        assert cls.counter == counter
        assert counter in esp.DROP_REASONS
    assert set(expected.values()) == set(esp.DROP_REASONS)


def test_counters_as_dict() -> None:
    sa = esp.InboundSA(SPI, KEY)
    with pytest.raises(esp.TruncatedError):
        sa.decapsulate(b"")
    assert sa.counters.as_dict() == {
        "packets": 0,
        "bytes": 0,
        **dict.fromkeys(esp.DROP_REASONS, 0),
        "truncated": 1,
    }


def test_drops_store_only_what_was_counted() -> None:
    """A reason never counted reads 0 without being stored (an idle SA keeps no
    dict, not one entry per reason); counts copied in as a plain dict (the data-path
    worker's snapshot) read the same way. The counts are read only: the data path
    counts with count_drop."""
    sa = esp.InboundSA(SPI, KEY)
    assert dict(sa.counters.drops) == {}
    assert all(sa.counters.drops[reason] == 0 for reason in esp.DROP_REASONS)
    assert dict(sa.counters.drops) == {}  # reading stored nothing
    with pytest.raises(TypeError):
        sa.counters.drops["replayed"] = 1  # type: ignore[index]
    assert esp.InboundSA(SPI, KEY).counters.drops == {}  # nothing shared leaked
    for _ in range(2):
        with pytest.raises(esp.UnknownSpiError):
            sa.decapsulate(struct.pack(">I", SPI + 1) + bytes(esp.MIN_PACKET_LEN))
    assert dict(sa.counters.drops) == {"unknown_spi": 2}
    sa.counters.drops = {"replayed": 3}
    assert sa.counters.drops["replayed"] == 3
    assert sa.counters.drops["icv_failed"] == 0
    assert sa.counters.as_dict()["replayed"] == 3
    sa.counters.count_drop("replayed", 2)
    assert dict(sa.counters.drops) == {"replayed": 5}
    sa.counters.drops = {}  # a worker's snapshot of an SA that dropped nothing
    assert dict(sa.counters.drops) == {} and sa.counters.as_dict()["replayed"] == 0


def test_sas_without_limits_report_nothing() -> None:
    """SAs without lifetime limits share one (frozen) Lifetime; the status stays empty."""
    a, b = esp.OutboundSA(SPI, KEY), esp.InboundSA(SPI, KEY)
    assert a.lifetime is b.lifetime
    assert not a.status(1e9).soft and not b.status(1e9).hard
    limited = esp.OutboundSA(SPI, KEY, soft_packets=1, hard_packets=2)
    assert limited.lifetime is not a.lifetime
    limited.encapsulate(b"x", 4)
    assert limited.status(0.0).soft == {"packets"} and not limited.status(0.0).hard
