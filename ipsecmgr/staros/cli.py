"""``ipsecmgr import-staros FILE [-o OUT.toml]``: arguments and the command.

With ``-o`` the TOML goes to OUT, each plain-text key to a 0600 file beside
it, the report to stdout, and the output is then checked as ``check-config``
does. Without ``-o`` the TOML goes to stdout and the report to stderr; a
configuration with plain-text keys then needs ``-o`` (a key never goes to a
terminal or a pipe).

Exit status: 0 imported, and the output passes ``check-config``; 1 imported,
but a line could not be mapped (an ``error`` in the report) or the output does
not pass ``check-config`` yet (typically: the key files of encrypted keys are
still to be written); 2 nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="StarOS configuration (e.g. 'show configuration')")
    p.add_argument("-o", "--output", type=Path, help="TOML file to write (key files go beside it)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")


def run_import(args: argparse.Namespace) -> int:
    from ipsecmgr.config import diagnose_config
    from ipsecmgr.daemon import validate_acl
    from ipsecmgr.staros import format_report, import_staros, write_import

    src: Path = args.file
    try:
        text = src.read_text(errors="replace")
    except OSError as exc:
        print(f"ipsecmgr import-staros: cannot read {src}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    result = import_staros(text)
    out: Path | None = args.output
    if out is None:
        if result.keys:
            print(
                f"ipsecmgr import-staros: {src} has plain-text pre-shared keys; give "
                "-o OUT.toml so they are written to 0600 files beside it",
                file=sys.stderr,
            )
            return 2
        sys.stdout.write(result.toml)
        print(format_report(result, str(src)), file=sys.stderr)
        return 1 if result.count("error") or result.missing_keys else 0
    try:
        written = write_import(result, out, force=args.force)
    except FileExistsError as exc:
        print(f"ipsecmgr import-staros: exists (use --force): {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ipsecmgr import-staros: cannot write: {exc}", file=sys.stderr)
        return 2
    print(format_report(result, str(src)))
    for path in written:
        print(f"wrote {path}" + (" (mode 0600)" if path != out else ""))
    for name in result.missing_keys:
        if not (out.parent / name).exists():
            print(f"to do: write {out.parent / name} (mode 0600)")
    diag = diagnose_config(out, validate_acl=validate_acl)
    for e in diag.errors:
        print(f"check-config: error: {e}")
    for w in diag.warnings:
        print(f"check-config: warning: {w}")
    print(f"check-config {out}: " + ("OK" if not diag.errors else f"{len(diag.errors)} error(s)"))
    return 1 if result.count("error") or diag.errors else 0
