"""Least privilege: once its sockets, TUNs, routes and rules exist, the daemon
keeps only what it still uses, and no crash or debugger writes its keys to disk.

* Capabilities: CAP_NET_ADMIN (routes, rules, links at stop and takeover; SO_MARK),
  CAP_NET_RAW (raw ESP sockets), CAP_NET_BIND_SERVICE (ports below 1024, e.g. for a
  socket opened after start). Nothing else in the effective, permitted, inheritable,
  ambient or bounding sets (capabilities(7)). The uid stays 0: the config and key
  files SIGHUP reads again are root's own, and without CAP_DAC_OVERRIDE nobody
  else's file is readable any more.
* ``PR_SET_NO_NEW_PRIVS``: an execve can never gain privileges again (setuid, file
  capabilities).
* ``PR_SET_DUMPABLE 0``: no core dump, and ptrace attach (``gcore``, ``gdb -p``)
  needs CAP_SYS_PTRACE over us; /proc/PID/mem, environ, maps become root-only.
* ``RLIMIT_CORE 0``: no core file even if something makes the process dumpable again.

The calls are plain libc ``prctl``/``capset`` through ctypes (no dependency). Forked
data-path workers inherit all of it (they are forked after the drop).
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
from dataclasses import dataclass, field

log = logging.getLogger("ipsecmgr.privileges")

# linux/capability.h
CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
KEEP = (CAP_NET_ADMIN, CAP_NET_RAW, CAP_NET_BIND_SERVICE)
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# linux/prctl.h
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def keep_mask() -> int:
    """The capability bit mask the daemon keeps (as in /proc/PID/status CapEff)."""
    mask = 0
    for cap in KEEP:
        mask |= 1 << cap
    return mask


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40  # CAP_CHECKPOINT_RESTORE (Linux 5.9); EINVAL above the kernel's last


@dataclass
class DropReport:
    """What :func:`drop_privileges` did and what the kernel refused (logged at start)."""

    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def drop_privileges() -> DropReport:
    """Reduce the calling process to :data:`KEEP`, set no_new_privs, not dumpable, no
    core. Each step is tried on its own: a refused one is reported, the rest done."""
    report = DropReport()
    libc = ctypes.CDLL(None, use_errno=True)

    def prctl(what: str, option: int, arg2: int = 0, arg3: int = 0) -> bool:
        if libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0) != 0:
            err = ctypes.get_errno()
            report.failed.append(f"{what}: {os.strerror(err)}")
            return False
        return True

    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        report.done.append("RLIMIT_CORE 0")
    except (OSError, ValueError) as exc:
        report.failed.append(f"RLIMIT_CORE 0: {exc}")
    if prctl("PR_SET_DUMPABLE 0", PR_SET_DUMPABLE, 0):
        report.done.append("not dumpable")
    # The bounding set first: dropping from it needs CAP_SETPCAP, which capset removes.
    dropped = 0
    for cap in range(last_cap() + 1):
        if cap in KEEP:
            continue
        if libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) == 0:
            dropped += 1
        else:
            err = ctypes.get_errno()
            report.failed.append(f"bounding set, capability {cap}: {os.strerror(err)}")
            break
    else:
        report.done.append(f"bounding set: {dropped} capabilities dropped")
    # The ambient set (Linux 4.3): EINVAL on older kernels, where it does not exist.
    prctl("ambient set clear", PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    mask = keep_mask()
    data[0].effective = data[0].permitted = mask & 0xFFFFFFFF
    data[1].effective = data[1].permitted = mask >> 32
    if libc.capset(ctypes.byref(header), data) != 0:
        report.failed.append(f"capset: {os.strerror(ctypes.get_errno())}")
    else:
        report.done.append("capabilities: net_admin, net_raw, net_bind_service")
    if prctl("PR_SET_NO_NEW_PRIVS", PR_SET_NO_NEW_PRIVS, 1):
        report.done.append("no_new_privs")
    return report


def apply_least_privilege() -> None:
    """The daemon's call, after set-up: drop, and say what could not be done."""
    report = drop_privileges()
    log.info("least privilege: %s", ", ".join(report.done) or "nothing")
    for f in report.failed:
        log.warning("least privilege: could not %s", f)
