"""Checks on configuration values that need more than a type and a range.

:mod:`ipsecmgr.config` calls these so that ``check-config`` refuses everything
``run`` would refuse, with a message that says what to fix, and never a
traceback (issue #15):

* :func:`file_problem`: the file is too large or not UTF-8 (named by line and
  column; ``tomllib`` would raise UnicodeDecodeError);
* :func:`interface_name_problem`: a name the kernel refuses for a network
  interface (``dev_valid_name`` in net/core/dev.c);
* :func:`control_socket_problem`: a control socket path the daemon refuses
  (:func:`ipsecmgr.control.prepare_socket_dir`) or cannot bind (``sun_path``);
* :func:`acl_shadow_warnings`: ACL lines that can never match because an
  earlier line matches every packet they would.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import npusim

MAX_CONFIG_BYTES: Final = 16 << 20  # far above any real file (a 10,000-line ACL is ~0.6 MB)
#: sizeof(sockaddr_un.sun_path) - 1 on Linux: the NUL-terminated path must fit.
MAX_SOCKET_PATH: Final = 107
#: IFNAMSIZ - 1 (include/uapi/linux/if.h).
MAX_IFNAME: Final = 15
#: ACLs longer than this are not checked for shadowed lines (the check is quadratic).
MAX_SHADOW_CHECK: Final = 500


def file_problem(raw: bytes) -> str | None:
    """Why a configuration file's bytes cannot be TOML (None: they may be)."""
    if len(raw) > MAX_CONFIG_BYTES:
        return f"larger than {MAX_CONFIG_BYTES >> 20} MiB: not a configuration file"
    try:
        raw.decode()
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        return (
            f"line {line}, column {column}: byte 0x{raw[e.start]:02x} is not UTF-8 "
            "(is this a binary file? TOML files are UTF-8 text)"
        )
    return None


def interface_name_problem(name: str) -> str | None:
    """Why the kernel would refuse ``name`` for a network interface (None: it would not)."""
    if len(name.encode()) > MAX_IFNAME:
        return f"interface name {name!r} is longer than {MAX_IFNAME} bytes"
    if name in (".", "..") or any(c in "/:" or c.isspace() or c == "\0" for c in name):
        return f"{name!r} is not a valid interface name (no '/', ':', spaces; not '.' or '..')"
    return None


def control_socket_problem(path: Path) -> str | None:
    """Why the daemon would refuse or fail to create its control socket at ``path``."""
    from ipsecmgr.control import socket_dir_problem  # asyncio only when checking

    if not path.is_absolute():
        return f"{str(path)!r} is not an absolute path"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        return f"longer than {MAX_SOCKET_PATH} bytes (a Unix socket path must fit sun_path)"
    try:
        if path.parent.exists():
            problem = socket_dir_problem(path.parent)
            if problem is not None:
                return f"{problem} (make it so, or choose another path)"
            if path.is_symlink() or (path.exists() and not stat.S_ISSOCK(path.stat().st_mode)):
                return f"{path} exists and is not a socket (the daemon will not replace it)"
            return None
        for ancestor in path.parent.parents:
            if ancestor.exists():
                if not ancestor.is_dir():
                    return f"{ancestor} is not a directory (the socket directory cannot be made)"
                return None
    except (OSError, ValueError) as e:
        return f"cannot check: {getattr(e, 'strerror', None) or e}"
    return None


def acl_shadow_warnings(name: str, rules: Sequence[str]) -> list[str]:
    """One warning per line that an earlier line makes unreachable: the earlier
    line matches every packet the later one would (same family and protocol or
    broader, addresses and ports a superset), so the later line never decides.
    Lines that do not parse are left to the ACL validator."""
    return shadow_warnings(compile_acl(name, rules))


def compile_acl(name: str, rules: Sequence[str]) -> npusim.Acl | None:
    """npusim's compiled ACL, or None if a line does not parse (the validator says why)."""
    try:
        return npusim.parse_acl(name, list(rules))
    except (npusim.AclSyntaxError, ValueError):
        return None


def shadow_warnings(acl: npusim.Acl | None) -> list[str]:
    """:func:`acl_shadow_warnings` of an ACL already compiled."""
    if acl is None:
        return []
    if len(acl.rules) > MAX_SHADOW_CHECK:
        return [f"not checked for shadowed lines (more than {MAX_SHADOW_CHECK} lines)"]
    out: list[str] = []
    for j, later in enumerate(acl.rules):
        for earlier in acl.rules[:j]:
            if _covers(earlier, later):
                kind = "permit" if later.permit else "deny"
                out.append(
                    f"line {later.line} ({later.text.strip()!r}) can never match: line "
                    f"{earlier.line} ({earlier.text.strip()!r}) matches every packet this "
                    f"{kind} would; remove it or move it up"
                )
                break
    return out


def _covers(a: npusim.Rule, b: npusim.Rule) -> bool:
    """Whether every packet that matches rule ``b`` also matches rule ``a``."""
    if a.version and a.version != b.version:
        return False
    if a.protocol >= 0 and a.protocol != b.protocol:
        return False
    for value, mask, b_value, b_mask in (
        (a.src, a.src_mask, b.src, b.src_mask),
        (a.dst, a.dst_mask, b.dst, b.dst_mask),
    ):
        # a cares about no bit that b leaves free, and b's fixed bits agree with a's.
        if mask & ~b_mask or b_value & mask != value:
            return False
    for a_ports, b_ports in ((a.src_ports, b.src_ports), (a.dst_ports, b.dst_ports)):
        if a_ports is None:
            continue
        if b_ports is None:
            return False
        for lo, hi in b_ports:
            if not any(alo <= lo and hi <= ahi for alo, ahi in a_ports):
                return False
    return True
