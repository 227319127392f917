"""Packaging: sdist + wheel from a scratch copy of the tree, the wheel in a fresh venv.

What an operator gets from ``pip install ipsecmgr-*.whl``: a working
``ipsecmgr --help``, ``--version`` from the package metadata, ``check-config``
accepting the shipped examples (installed under ``share/doc/ipsecmgr``), the
man page and the bash completion generated from the argparse definitions
(``tools/package/make-extras``), so every subcommand is in both.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

from ipsecmgr.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
_SKIP = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "generated", "__pycache__", "*.egg-info", ".mypy_cache",
    ".ruff_cache", ".pytest_cache", ".hypothesis", "*.pcap",
)  # fmt: skip


def _subcommands() -> list[str]:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(venv, dist): the tree built as a user would, the wheel installed in a new venv."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    _run(["sh", "tools/package/make-extras", sys.executable], src)
    dist = tmp / "dist"
    _run([sys.executable, "-m", "build", "-o", str(dist), "."], src)
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp)
    (wheel,) = dist.glob("ipsecmgr-*.whl")
    _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], tmp)
    return venv, dist


@pytest.mark.slow
def test_sdist_and_wheel_carry_examples_man_page_and_completion(
    installed: tuple[Path, Path],
) -> None:
    _, dist = installed
    (sdist,) = dist.glob("ipsecmgr-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {
        "examples/tunnel-mode.toml", "generated/share/man/man1/ipsecmgr.1",
        "generated/share/bash-completion/completions/ipsecmgr", "pyproject.toml",
    } <= names  # fmt: skip


@pytest.mark.slow
def test_installed_commands_work(installed: tuple[Path, Path], tmp_path: Path) -> None:
    venv, _ = installed
    exe = str(venv / "bin" / "ipsecmgr")
    # The venv's own copy runs, not the source tree's.
    where = _run([str(venv / "bin" / "python"), "-c", "import ipsecmgr; print(ipsecmgr.__file__)"],
                 tmp_path).stdout  # fmt: skip
    assert where.startswith(str(venv))
    help_text = _run([exe, "--help"], tmp_path).stdout
    for name in _subcommands():
        assert name in help_text
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _run([exe, "--version"], tmp_path).stdout.strip() == f"ipsecmgr {version}"
    examples = sorted((venv / "share" / "doc" / "ipsecmgr" / "examples").glob("*.toml"))
    assert len(examples) >= 4
    for example in examples:
        text = example.read_text()
        for name in set(re.findall(r'"/etc/ipsecmgr/([\w-]+)"', text)):
            (tmp_path / name).write_bytes(f"key-{name}\n".encode())
            (tmp_path / name).chmod(0o600)
        cfg = tmp_path / example.name
        cfg.write_text(text.replace('"/etc/ipsecmgr/', f'"{tmp_path}/'))
        out = _run([exe, "check-config", str(cfg)], tmp_path)
        assert out.stdout.strip() == f"{cfg}: OK" and out.stderr == ""


@pytest.mark.slow
def test_man_page_documents_every_subcommand(installed: tuple[Path, Path]) -> None:
    venv, _ = installed
    page = (venv / "share" / "man" / "man1" / "ipsecmgr.1").read_text()
    assert page.startswith('.TH IPSECMGR "1"')
    for name in _subcommands():
        assert f"'ipsecmgr {name.replace('-', chr(92) + '-')}'" in page, name


@pytest.mark.slow
def test_bash_completion_completes_subcommands_and_options(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    venv, _ = installed
    script = venv / "share" / "bash-completion" / "completions" / "ipsecmgr"

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        prog = f"""
            source {script}
            fn=$(complete -p ipsecmgr | sed -E 's/.* -F ([^ ]+) .*/\\1/')
            COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}
            COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}
            "$fn" ipsecmgr "{words[-1]}" "{words[-2]}"
            printf '%s\\n' "${{COMPREPLY[@]}}"
        """
        return _run(["bash", "-c", prog], tmp_path).stdout.split()

    assert "import-staros" in complete("ipsecmgr", "imp")
    assert set(complete("ipsecmgr", "")) >= set(_subcommands())
    assert "--force" in complete("ipsecmgr", "import-staros", "--f")


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    from ipsecmgr.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"ipsecmgr {version('ipsecmgr')}\n"
