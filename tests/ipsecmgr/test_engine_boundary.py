"""One owner per decision (issue #16.1): the IKE engine owns SA lifetimes.

The daemon translates configuration into the engine's config, feeds it
datagrams and time and reacts to its events; it never reads or writes the
engine's lifetime deadlines or its wire state (``IkeSA.ch``: SPIs, keys,
message IDs). What ``show`` needs comes from read-only properties
(``IkeSA.spi_i``, ``spi_r``, ``role``, ``suite``). Checked on the syntax tree
of every module of ipsecmgr/ and tools/, so a comment or a string may name them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINE_INTERNALS = {"rekey_at", "ike_rekey_at", "ike_expire_at", "ch"}


def _sources() -> list[Path]:
    return sorted([*ROOT.joinpath("ipsecmgr").rglob("*.py"), *ROOT.joinpath("tools").rglob("*.py")])


def _internal_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in ENGINE_INTERNALS
    ]


def test_the_scan_finds_an_engine_internal() -> None:
    tree = ast.parse("child.rekey_at = None\nspi = sa.ch.spi_i\n")
    found = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert {"rekey_at", "ch"} <= found & ENGINE_INTERNALS


def test_the_daemon_never_touches_engine_lifetimes_or_wire_state() -> None:
    sources = _sources()
    assert len(sources) > 50  # the whole of ipsecmgr/ and tools/
    assert [use for path in sources for use in _internal_uses(path)] == []
