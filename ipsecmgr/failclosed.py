"""Fail closed: what the gateway leaves in the kernel so that protected traffic
never leaves in clear, whoever stops the daemon and however.

* :func:`protected_prefixes`: the destinations the ``permit`` lines of the crypto
  maps' ACLs cover; each gets a ``prohibit`` route in the gateway's table
  (:meth:`ipsecmgr.routing.Routing.install_blocks`), which outlives the process.
  :class:`ProtectedPrefixes` keeps them per crypto map, so that a SIGHUP blocks
  and unblocks by looking at the changed maps only (:func:`sync_blocks`).
* :func:`take_over`: start-up after a crash or a stop with ``on_stop = "block"``:
  the blocks are (re)installed first, then stale TUN routes and devices go, and
  the rules are added only where missing, so there is no moment without them.
* :class:`InstanceLock`: one daemon per network namespace (the routing state is
  per namespace). An abstract unix socket, not a file: the kernel releases it
  when the process dies however it dies, so a SIGKILL leaves no stale lock.
* :func:`down`: ``ipsecmgr down``, what removes the block (and whatever a crashed
  daemon left) on purpose, and says what it removed.

docs/security.md has the threat model and how each property is tested.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import npusim
from ipsecmgr import config as cfg
from ipsecmgr.routing import Routing
from ipsecmgr.tls.capture import CaptureRoutes

log = logging.getLogger("ipsecmgr.failclosed")

#: Abstract unix socket name (per network namespace, see :class:`InstanceLock`).
LOCK_NAME = b"\0ipsecmgr-gateway-%x"


class AlreadyRunning(RuntimeError):
    """Another daemon holds this namespace's lock."""


def _prefix(version: int, addr: int, mask: int) -> tuple[str, bool]:
    """The prefix of an ACL address and whether the wildcard was contiguous.

    A non-contiguous wildcard (``0.0.255.0``) has no route; the covering prefix
    (the mask's leading ones) blocks a superset, which is the safe side. Spelled
    by ``inet_ntop``, as the kernel's routes are read back (ipsecmgr.nlbatch), and
    with int operations only: 10,000 maps, 10,000 prefixes at every start."""
    bits = 128 if version == 6 else 32
    full = (1 << bits) - 1
    plen = bits - ((full ^ mask).bit_length())  # the mask's leading ones
    cover = full ^ ((1 << (bits - plen)) - 1)
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    text = socket.inet_ntop(family, (addr & cover).to_bytes(bits // 8, "big"))
    return f"{text}/{plen}", mask == cover


def protected_prefixes(
    config: cfg.Config, acls: Mapping[str, npusim.Acl]
) -> tuple[list[str], list[str]]:
    """Every destination prefix a ``permit`` of a crypto map's ACL covers (v4 and v6),
    in configuration order without repeats; and notes about over-blocking.

    Routes match destinations only: a permit narrowed by source or port blocks its
    whole destination prefix while the daemon is gone (bypass traffic to other
    destinations is untouched)."""
    out: dict[str, None] = {}
    notes: list[str] = []
    for name, m in config.crypto_maps.items():
        prefixes, more = map_prefixes(name, acls[m.match_address])
        out.update(dict.fromkeys(prefixes))
        notes += more
    return list(out), notes


def map_prefixes(name: str, acl: npusim.Acl) -> tuple[list[str], list[str]]:
    """One crypto map's part of :func:`protected_prefixes`."""
    out: list[str] = []
    notes: list[str] = []
    for rule in acl.rules:
        if not rule.permit:
            continue
        versions = (rule.version,) if rule.version else (4, 6)
        for v in versions:
            mask = rule.dst_mask if rule.version else 0
            prefix, contiguous = _prefix(v, rule.dst if rule.version else 0, mask)
            if not contiguous:
                notes.append(
                    f"crypto map {name}: {rule.where} has a non-contiguous destination "
                    f"wildcard; {prefix} is blocked while the daemon is down"
                )
            out.append(prefix)
    return out, notes


class ProtectedPrefixes:
    """The blocked prefixes, each with how many crypto maps protect it, so that a
    reload looks only at the maps it changed (issue #19 item 7): a prefix is
    blocked when its first map appears and unblocked when its last one goes."""

    def __init__(self, config: cfg.Config, acls: Mapping[str, npusim.Acl]) -> None:
        self.of_map: dict[str, list[str]] = {}
        self.maps_of: dict[str, int] = {}
        self.notes: list[str] = []  # over-blocking at start (non-contiguous wildcards)
        for name, m in config.crypto_maps.items():
            self._add(name, acls[m.match_address])

    def prefixes(self) -> list[str]:
        """In configuration order of the first map that protects each."""
        return list(self.maps_of)

    def _add(self, name: str, acl: npusim.Acl) -> list[str]:
        found, notes = map_prefixes(name, acl)
        self.notes += notes
        prefixes = list(dict.fromkeys(found))
        self.of_map[name] = prefixes
        new = []
        for p in prefixes:
            n = self.maps_of.get(p, 0)
            self.maps_of[p] = n + 1
            if n == 0:
                new.append(p)
        return new

    def _remove(self, name: str) -> list[str]:
        gone = []
        for p in self.of_map.pop(name, ()):
            n = self.maps_of[p] - 1
            if n:
                self.maps_of[p] = n
            else:
                del self.maps_of[p]
                gone.append(p)
        return gone

    def update(
        self, config: cfg.Config, acls: Mapping[str, npusim.Acl], names: Iterable[str]
    ) -> tuple[list[str], list[str]]:
        """``names``: the crypto maps a reload changed, added or removed. Returns the
        prefixes to block and those to unblock (O(changed maps), not O(maps))."""
        gone: dict[str, None] = {}
        for name in names:
            gone.update(dict.fromkeys(self._remove(name)))
        new: list[str] = []
        for name in names:
            m = config.crypto_maps.get(name)
            if m is not None:
                new += self._add(name, acls[m.match_address])
        back = set(new) & gone.keys()  # removed by one map, added again by another
        return [p for p in new if p not in back], [p for p in gone if p not in back]


def take_over(routing: Routing, config: cfg.Config, prefixes: Iterable[str]) -> list[str]:
    """Start-up: blocks first, then remove what a dead daemon left, rules last.

    Returns what could not be protected (logged by the caller at start)."""
    wanted = list(prefixes)
    failed = routing.install_blocks(wanted)
    for r in routing.flush_except_blocks(wanted):
        log.info("removed stale route %s", r)
    for t in config.tuns:
        if routing.link_exists(t.name):
            log.info("removing stale TUN %s", t.name)
            routing.delete_link(t.name)
    failed += routing.install_rules()
    return failed


def sync_blocks(block: Iterable[str], unblock: Iterable[str]) -> list[str]:
    """SIGHUP: block what the new ACLs protect before unblocking what they no longer
    do (only the differences, see :meth:`ProtectedPrefixes.update`). Runs in a thread
    with its own netlink socket: pyroute2's synchronous API drives an asyncio loop
    of its own, which cannot nest in the daemon's running one.
    Returns what could not be protected."""
    new_list, old_list = list(block), list(unblock)
    if not new_list and not old_list:
        return []
    failed: list[str] = []

    def work() -> None:
        rt = Routing()
        try:
            failed.extend(rt.install_blocks(new_list))
            for r in rt.remove_blocks(old_list):
                log.info("reload: removed %s", r)
        except Exception as exc:  # reported, the reload itself goes on
            failed.append(f"fail-closed routes not updated: {exc}")
        finally:
            rt.close()

    t = threading.Thread(target=work, name="ipsecmgr-blocks")
    t.start()
    t.join()
    return failed


class InstanceLock:
    """One gateway per network namespace: an abstract unix socket bound for life.

    The listening socket is never accepted on; :func:`holder_pid` connects only
    to learn the holder's pid (SO_PEERCRED)."""

    def __init__(self, table: int) -> None:
        self.name = LOCK_NAME % table
        self.sock: socket.socket | None = None

    def acquire(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.name)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            pid = self.holder_pid()
            who = f" (pid {pid})" if pid else ""
            raise AlreadyRunning(
                f"another ipsecmgr daemon{who} is running in this network namespace; "
                "stop it first (one gateway per namespace owns the routing table)"
            ) from None
        sock.listen(8)
        self.sock = sock

    def holder_pid(self) -> int | None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(0.5)
        try:
            probe.connect(self.name)
            cred = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            pid: int = struct.unpack("3i", cred)[0]
            return pid
        except OSError:
            return None
        finally:
            probe.close()

    def release(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def down(config: cfg.Config | None, *, routing: Routing | None = None) -> tuple[int, list[str]]:
    """``ipsecmgr down``: remove rules, routes (blocks included) and TUNs a stopped or
    crashed daemon left. Refuses while a daemon runs. Returns (exit code, lines)."""
    rt = routing or Routing()
    lock = InstanceLock(rt.table)
    try:
        lock.acquire()  # held while we remove: no daemon starts half-way through
    except AlreadyRunning as exc:
        rt.close()
        return 1, [f"{exc}; 'ipsecmgr down' only cleans up after a daemon that is gone"]
    lines: list[str] = []
    try:
        lines += [f"removed {r}" for r in rt.remove_rules()]
        lines += [f"removed route {r} (table {rt.table})" for r in rt.flush_table()]
        # [tls_map] captures: local routes in the next table; their rules share our
        # priority and went with remove_rules above.
        captures = CaptureRoutes(rt.table + 1, rt.priority)
        lines += [f"removed TLS capture of {a} (table {captures.table})"
                  for a in captures.flush_stale()]  # fmt: skip
        for t in config.tuns if config is not None else ():
            if rt.link_exists(t.name):
                rt.delete_link(t.name)
                lines.append(f"removed TUN {t.name}")
        if config is not None:
            sock = Path(config.gateway.control_socket)
            if sock.is_socket():
                sock.unlink()
                lines.append(f"removed stale control socket {sock}")
    finally:
        lock.release()
        rt.close()
    return 0, lines or ["nothing to remove"]
