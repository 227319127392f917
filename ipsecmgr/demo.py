"""``ipsecmgr lab demo``: placeholder until the ESP demonstration lands."""

from __future__ import annotations


def run_demo() -> int:
    print("demo: not built yet")
    return 0
