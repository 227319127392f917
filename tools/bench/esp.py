"""Per-packet cost of esp.OutboundSA.encapsulate / InboundSA.decapsulate.

Run: /work/main/.venv/bin/python tools/bench/esp.py [--quick]

Reference, measured in the same run with the same loop shape: a bare
``AESGCM.encrypt`` / ``AESGCM.decrypt`` of a payload of the same size (12-byte
nonce, 8-byte AAD). The ratio (ours / bare) is what the ESP layer adds on top of
the cipher; target at 1400 bytes: <= 2.0.

Method: each sample runs PASSES loops over BATCH packets (BATCH distinct packets,
because the replay window rejects a repeated sequence number; a fresh InboundSA
per pass, built before the clock starts). BATCH x 1.4 kB stays inside L2, as a
packet fresh from a socket would. Our sample and the reference sample alternate,
so drift on this shared VM hits both; each figure is the median of REPEATS
samples.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import esp

SIZES = (64, 512, 1400)
KEY_BITS = (128, 256)
BATCH = 500
PASSES = 40
REPEATS = 9
TARGET_RATIO = 2.0
SPI = 0x0A0B0C0D


def _paired(
    ours: Callable[[], float], bare: Callable[[], float], repeats: int
) -> tuple[float, float]:
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        a.append(ours())
        b.append(bare())
    return statistics.median(a), statistics.median(b)


def bench(key_bits: int, size: int, passes: int, repeats: int) -> tuple[float, float, float, float]:
    keymat = os.urandom(key_bits // 8 + 4)
    payload = os.urandom(size)
    aead = AESGCM(keymat[:-4])
    aad = os.urandom(8)
    per_packet = 1e6 / (BATCH * passes)

    def encap() -> float:
        sa = esp.OutboundSA(SPI, keymat)
        fn = sa.encapsulate
        start = time.perf_counter()
        for _ in range(passes):
            for _ in range(BATCH):
                fn(payload, 4)
        return (time.perf_counter() - start) * per_packet

    nonce = os.urandom(12)

    def encrypt() -> float:
        fn = aead.encrypt
        start = time.perf_counter()
        for _ in range(passes):
            for _ in range(BATCH):
                fn(nonce, payload, aad)
        return (time.perf_counter() - start) * per_packet

    sender = esp.OutboundSA(SPI, keymat)
    packets = [sender.encapsulate(payload, 4) for _ in range(BATCH)]
    nonces = [os.urandom(12) for _ in range(BATCH)]
    sealed = [(n, aead.encrypt(n, payload, aad)) for n in nonces]

    def decap() -> float:
        fns = [esp.InboundSA(SPI, keymat).decapsulate for _ in range(passes)]
        start = time.perf_counter()
        for fn in fns:
            for p in packets:
                fn(p)
        return (time.perf_counter() - start) * per_packet

    def decrypt() -> float:
        fn = aead.decrypt
        start = time.perf_counter()
        for _ in range(passes):
            for n, c in sealed:
                fn(n, c, aad)
        return (time.perf_counter() - start) * per_packet

    # The timed loops do the real work: every packet opens to the payload.
    check = esp.InboundSA(SPI, keymat)
    assert all(check.decapsulate(p) == (payload, 4) for p in packets)
    enc, bare_enc = _paired(encap, encrypt, repeats)
    dec, bare_dec = _paired(decap, decrypt, repeats)
    return enc, bare_enc, dec, bare_dec


def main(argv: list[str]) -> int:
    passes, repeats = (4, 3) if "--quick" in argv else (PASSES, REPEATS)
    started = time.perf_counter()
    print(
        f"esp bench: µs per packet, median of {repeats} samples of {passes} x {BATCH} packets; "
        "bare = AESGCM alone, same size"
    )
    print(
        f"{'AES':>4} {'size':>5} | {'encap':>6} {'encrypt':>7} {'ratio':>5} | "
        f"{'decap':>6} {'decrypt':>7} {'ratio':>5}"
    )
    worst = 0.0
    for key_bits in KEY_BITS:
        for size in SIZES:
            enc, bare_enc, dec, bare_dec = bench(key_bits, size, passes, repeats)
            r_enc, r_dec = enc / bare_enc, dec / bare_dec
            if size == 1400:
                worst = max(worst, r_enc, r_dec)
            print(
                f"{key_bits:>4} {size:>5} | {enc:6.2f} {bare_enc:7.2f} {r_enc:5.2f} | "
                f"{dec:6.2f} {bare_dec:7.2f} {r_dec:5.2f}"
            )
    verdict = "OK" if worst <= TARGET_RATIO else "ABOVE TARGET"
    print(f"worst ratio at 1400 B: {worst:.2f} (target <= {TARGET_RATIO}): {verdict}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
