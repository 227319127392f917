"""Permission rules for the TLS key material (the private key, PSK files).

A private key readable by group or others is refused by the same rule as the
gateway's PSK files (:func:`ipsecmgr.secret.key_mode_error`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ipsecmgr.secret import key_mode_error


def check_key_file(path: Path) -> list[str]:
    """Errors for a private-key file: must exist, be a regular file, mode 0600 or 0400,
    owned by root or this user. Empty list: fine."""
    try:
        st = os.stat(path)
    except OSError as e:
        return [f"cannot read {path}: {e.strerror or e}"]
    if not stat.S_ISREG(st.st_mode):
        return [f"{path} is not a regular file"]
    errors = []
    if (refusal := key_mode_error(path, stat.S_IMODE(st.st_mode))) is not None:
        errors.append(refusal)
    if st.st_uid not in (0, os.geteuid()):
        errors.append(f"{path} is owned by uid {st.st_uid}, neither root nor this user")
    return errors


def check_readable(path: Path) -> list[str]:
    """Errors for a public file (certificate, CA bundle): must be a readable regular file."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return [f"cannot read {path}: {e.strerror or e}"]
    if not path.is_file():
        return [f"{path} is not a regular file"]
    return []
