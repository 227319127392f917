"""``ipsecmgr import-staros``: a StarOS configuration in, our TOML and a report out.

The input is the reference's configuration language (``configure`` / ``context``
/ ``ip access-list`` / ``ipsec transform-set`` / ``ikev2-ikesa transform-set`` /
``crypto map NAME ikev2-ipv4`` with its ``payload`` / ``interface ...
crypto-map`` / ``tacacs mode``), and the IKEv1 lines of its transport-mode
example (``crypto ipsec transform-set``, ``crypto map NAME ipsec-ikev1``,
``ikev1 policy``, ``ikev1 keepalive dpd``), which become IKEv2 here (RFC 9395
deprecates IKEv1; RFC 7296 §1.3.1 gives IKEv2 transport mode).

Parsing follows the StarOS CLI's modes, not the indentation (the reference's
own tunnel example is indented wrongly after its first ``#exit``): a mode
command (``crypto map foo ikev2-ipv4``) enters a mode, ``#exit``/``exit``
leaves one, ``end`` leaves all. A line that the current mode does not know
but an enclosing mode does is taken as leaving the inner mode first (what a
missing ``#exit`` means). A line no mode knows opens an unknown mode, closed
by the next ``#exit`` or by the next line a known mode takes.

Every line that has no equivalent, or is mapped by a choice the operator
should review, is reported with its line number as one :class:`Note`:

* ``ignored``: nothing to configure here (``aaa tacacs+``, ``require crypto
  ... software``: this gateway is always software);
* ``decision``: mapped, but not one to one (``cipher aes-cbc-128`` becomes
  AES-GCM, ``group 2`` becomes 14, IKEv1 becomes IKEv2);
* ``action``: the operator must do something before ``check-config`` passes
  (an ``encrypted key`` cannot be decrypted: put the key into the named file);
* ``error``: not mapped; the output fails ``check-config`` until it is fixed
  (the reference's ACL line with a stray ``1`` is written as is and rejected
  by npusim naming the token: a guess would decide what leaves in clear).

Secrets: a plain-text ``pre-shared-key key K`` goes into a key file beside
the output (mode 0600), referenced from the TOML by a relative path (resolved
against the config's directory, :mod:`ipsecmgr.config`). No key or TACACS+
password is ever in the TOML, the report or a log: reported lines show
``***`` in their place.
"""

from __future__ import annotations

import os
from pathlib import Path

from ipsecmgr.staros.model import NOTE_KINDS, Imported, Note, mask_secrets
from ipsecmgr.staros.reader import _Reader
from ipsecmgr.staros.writer import _Writer

__all__ = [
    "NOTE_KINDS",
    "Imported",
    "Note",
    "format_report",
    "import_staros",
    "mask_secrets",
    "write_import",
]

# ---------------------------------------------------------------- public API


def import_staros(text: str) -> Imported:
    """Read a StarOS configuration; return our TOML, the key files and the report."""
    r = _Reader()
    r.read(text)
    w = _Writer(r)
    toml = w.build()
    notes = sorted(r.notes, key=lambda n: (n.line, NOTE_KINDS.index(n.kind)))
    return Imported(toml, dict(w.keys), tuple(w.missing), tuple(notes))


def write_import(result: Imported, out: Path, *, force: bool = False) -> list[Path]:
    """Write the TOML to ``out`` and each plain-text key file beside it (mode 0600).

    Refuses to overwrite existing files unless ``force``. Returns the paths written.
    """
    targets = [out, *(out.parent / name for name in result.keys)]
    if not force:
        existing = [p for p in targets if p.exists()]
        if existing:
            raise FileExistsError(", ".join(map(str, existing)))
    out.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, value in result.keys.items():
        path = out.parent / name
        # Created 0600 (not chmod after writing): the key is never readable by others.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, value + b"\n")
        finally:
            os.close(fd)
        written.append(path)
    out.write_text(result.toml)
    written.insert(0, out)
    return written


def format_report(result: Imported, source: str) -> str:
    """The report: every noted line, then a count per kind."""
    lines = [f"{source}: {n}" for n in result.notes]
    counts = ", ".join(f"{result.count(k)} {k}" for k in NOTE_KINDS)
    lines.append(f"{source}: {len(result.notes)} line(s) reported ({counts})")
    return "\n".join(lines)
