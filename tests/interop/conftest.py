"""Fixtures of the strongSwan interop tests: one lab per shape, shared by a module."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipsecmgr.netns import is_root

from .harness import InteropLab


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, InteropLab]]:
    """``labs["tunnel"]`` / ``labs["outer"]``, built on first use, removed at the end."""
    if not is_root():
        pytest.skip("needs root")
    if shutil.which("swanctl") is None:
        pytest.fail("strongSwan is missing (make test installs it: tools/install-system-deps)")

    built: dict[str, InteropLab] = {}

    class Labs(dict[str, InteropLab]):
        def __missing__(self, shape: str) -> InteropLab:
            lab = InteropLab(shape, Path(tmp_path_factory.mktemp(f"interop-{shape}")))
            built[shape] = lab
            self[shape] = lab
            return lab

    try:
        yield Labs()
    finally:
        for lab in built.values():
            lab.close()
