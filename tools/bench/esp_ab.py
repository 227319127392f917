"""A/B of the ESP per-packet cost: this tree's esp against another checkout's, one process.

Run: .venv/bin/python tools/bench/esp_ab.py OTHER_CHECKOUT   (e.g. /work/main)

tools/bench/esp.py compares against bare AESGCM; between two of its runs on a
shared machine the figures move by more than a small change costs. Here both
packages are loaded side by side (the other one as ``esp_other``), their
samples alternate, time is this thread's CPU time (a sample during which the
process was not scheduled does not count the other processes' work), and each
figure is the best of REPEATS samples (the least disturbed one).
Prints µs per packet for encapsulate and decapsulate and the ratio this/other.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import timeit
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
KEY = bytes(range(32)) + b"SALT"
SPI = 0x1234
BATCH, PASSES, REPEATS = 500, 20, 21


def load(name: str, checkout: Path) -> ModuleType:
    init = checkout / "esp" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[str(init.parent)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def cpu_us(fn: Any) -> float:
    """µs per packet of one sample (PASSES calls of ``fn``, BATCH packets each)."""
    return timeit.Timer(fn, timer=time.thread_time).timeit(PASSES) / (PASSES * BATCH) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("other", type=Path, help="the other checkout (its esp/ is compared)")
    args = ap.parse_args(argv)
    mods = {"this": load("esp_this", ROOT), "other": load("esp_other", args.other)}
    for size in (64, 512, 1400):
        payload = bytes(size)
        packets: dict[str, list[bytes]] = {}
        for k, m in mods.items():
            out = m.OutboundSA(SPI, KEY)
            packets[k] = [out.encapsulate(payload, 4) for _ in range(BATCH)]
        enc: dict[str, list[float]] = {k: [] for k in mods}
        dec: dict[str, list[float]] = {k: [] for k in mods}
        for _ in range(REPEATS):
            for k, m in mods.items():
                f = m.OutboundSA(SPI, KEY).encapsulate
                enc[k].append(cpu_us(lambda f=f, p=payload: [f(p, 4) for _ in range(BATCH)]))
                # a fresh SA per pass: the replay window refuses a packet seen twice
                fresh = iter([m.InboundSA(SPI, KEY) for _ in range(PASSES)])
                batch = packets[k]

                def run(fresh: Any = fresh, batch: list[bytes] = batch) -> None:
                    d = next(fresh).decapsulate
                    for p in batch:
                        d(p)

                dec[k].append(cpu_us(run))
        e, d = {k: min(v) for k, v in enc.items()}, {k: min(v) for k, v in dec.items()}
        print(
            f"{size:5} B: encapsulate this {e['this']:.2f} other {e['other']:.2f} µs "
            f"(x{e['this'] / e['other']:.3f}); decapsulate this {d['this']:.2f} other "
            f"{d['other']:.2f} µs (x{d['this'] / d['other']:.3f})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
