"""SIGHUP at N crypto maps: which maps changed, and what the alternatives would cost
(issue #19 item 7; docs/performance.md, "SIGHUP: what is O(changed) and what is not").

Run: PYTHONPATH=$PWD .venv/bin/python tools/bench/reload_compare.py [--maps 1000 10000]
     [--before TREE]

The configuration of tools/bench/config_scale.py (one ACL, peer and identity per
map), read twice, the second time with map m0's DPD interval changed; a
:class:`~ipsecmgr.daemon.Gateway` of the first is alive (the daemon's heap).
Printed per N, best and median of 11, in milliseconds:

- ``MapDiff.of``: what the daemon does (this tree);
- with ``--before TREE`` (a checkout of the branch point, de997b9): that tree's
  ``map_definitions`` of both files and ``MapDiff.between``, alternating with
  the above in this process;
- the alternative not taken: the running file's raw TOML ``crypto_map`` and
  ``access_list`` tables kept (their size, ``tracemalloc``) and compared with the
  new file's (C-level dict equality), and a 16-byte ``blake2b`` digest of every
  raw map table (what a digest per map would cost at each load).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import tomllib
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from config_scale import PSK, config_text

from ipsecmgr import config as cfg
from ipsecmgr import reload
from ipsecmgr.daemon import Gateway, validate_acl

RUNS = 11


def load_module(tree: Path) -> ModuleType:
    """``ipsecmgr/reload.py`` of another tree, under another name."""
    spec = importlib.util.spec_from_file_location("before_reload", tree / "ipsecmgr/reload.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["before_reload"] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def timings(fns: dict[str, Callable[[], Any]]) -> dict[str, list[float]]:
    """Each function RUNS times, alternating; seconds."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(RUNS):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t0)
    return out


def raw_tables(text: str) -> tuple[dict[str, Any], int]:
    """The ``crypto_map`` and ``access_list`` tables of a file, and their size in bytes."""
    tracemalloc.start()
    data = tomllib.loads(text)
    kept = {k: data[k] for k in ("crypto_map", "access_list")}
    del data
    gc.collect()
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return kept, size


def measure(n: int, work: Path, before: ModuleType | None) -> None:
    psk = work / "psk"
    psk.write_bytes(PSK)
    psk.chmod(0o600)
    path = work / "gateway.toml"
    path.write_text(config_text(n, work))
    gw = Gateway(cfg.load_config(path, validate_acl=validate_acl))
    old = gw.config
    path.write_text(config_text(n, work, dpd_of_m0=31))
    new = cfg.load_config(path, validate_acl=validate_acl)
    assert reload.MapDiff.of(old, new).changed == {"m0"}
    fns: dict[str, Callable[[], Any]] = {"MapDiff.of": lambda: reload.MapDiff.of(old, new)}
    if before is not None:
        b = before

        def branch_point() -> Any:
            return b.MapDiff.between(b.map_definitions(old), b.map_definitions(new))

        assert branch_point().changed == {"m0"}
        fns["before: map_definitions x2 + between"] = branch_point
    running, size = raw_tables(config_text(n, work))
    fresh, _ = raw_tables(config_text(n, work, dpd_of_m0=31))
    om, nm = running["crypto_map"], fresh["crypto_map"]
    oa, na = running["access_list"], fresh["access_list"]
    fns["raw map tables compared"] = lambda: [k for k, v in nm.items() if om.get(k) != v]
    fns["raw ACL tables compared"] = lambda: [k for k, v in na.items() if oa.get(k) != v]
    fns["blake2b of every raw map table"] = lambda: {
        k: hashlib.blake2b(repr(v).encode(), digest_size=16).digest() for k, v in nm.items()
    }
    for label, ts in timings(fns).items():
        print(f"{n:>7} maps  {label:<40} best {min(ts) * 1e3:7.1f} ms"
              f"  median {statistics.median(ts) * 1e3:7.1f} ms")  # fmt: skip
    print(f"{n:>7} maps  raw crypto_map + access_list tables kept: {size / 1e6:.1f} MB"
          f" ({size / n:.0f} bytes per map)", flush=True)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maps", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--before", type=Path, help="a checkout of the branch point")
    a = ap.parse_args()
    before = load_module(a.before) if a.before else None
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}", flush=True)
    for n in a.maps:
        with tempfile.TemporaryDirectory(prefix="reloadcmp-") as tmp:
            measure(n, Path(tmp), before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
