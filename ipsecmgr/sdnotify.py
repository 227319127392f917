"""systemd's notify protocol (``Type=notify``), spoken directly.

sd_notify(3) documents the protocol: one AF_UNIX datagram per message to the
socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace), newline-separated ``KEY=VALUE`` assignments. It is a dozen lines,
so no library: the maintained Python bindings (python-systemd) need libsystemd
headers to build, and the small pure-Python ones add nothing we need.

What the daemon sends (see :mod:`ipsecmgr.serve`):

- ``READY=1`` once its TUNs, routes, rules and sockets are up and the control
  socket listens. Not when a tunnel is up: tunnels are built on demand.
- ``STATUS=`` a one-line summary (:func:`status_line`), refreshed periodically.
- ``RELOADING=1`` with ``MONOTONIC_USEC=`` (systemd ≥ 253 requires it to match
  the reload to the request) before a SIGHUP reload, ``READY=1`` after it.
- ``STOPPING=1`` when SIGTERM arrives, before the DELETEs go out.
- ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` when ``WatchdogSec=`` is set,
  from the event loop: a loop that is stuck stops pinging and systemd restarts us.

Without ``$NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) every call
is a no-op. A send that fails is logged once and otherwise ignored: the
gateway must not stop because its supervisor went away.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("ipsecmgr")

#: Longest gap between two STATUS= refreshes when no watchdog is configured.
STATUS_PERIOD = 5.0


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in µs, the clock systemd compares MONOTONIC_USEC with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends notify messages to ``address`` (None: every call does nothing)."""

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec if address else 0
        self._sock: socket.socket | None = None
        self._failed = False
        self._handle: asyncio.TimerHandle | None = None
        self._last_status = ""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """From ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` (sd_notify(3),
        sd_watchdog_enabled(3): a WATCHDOG_PID that is not ours means the watchdog is
        meant for another process)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec = 0
        try:
            usec = int(env.get("WATCHDOG_USEC", "0"))
            pid = env.get("WATCHDOG_PID")
            if pid is not None and int(pid) != os.getpid():
                usec = 0
        except ValueError:
            usec = 0
        return cls(address, max(usec, 0))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """One datagram with ``assignments`` joined by newlines; True if it was sent."""
        if self.address is None:
            return False
        # sd_notify(3): a leading "@" names the abstract namespace (a NUL byte).
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(assignments).encode(), target)
        except OSError as exc:
            if not self._failed:
                log.warning("systemd notify to %s failed: %s", self.address, exc)
                self._failed = True
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *self._status(status))

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self) -> None:
        self.stop_periodic()
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        if text.replace("\n", " ") != self._last_status:
            self.send(*self._status(text))

    def _status(self, text: str | None) -> list[str]:
        if text is None:
            return []
        self._last_status = text = text.replace("\n", " ")
        return [f"STATUS={text}"]

    # -- periodic: WATCHDOG=1 and STATUS= from the event loop ---------------------------

    @property
    def period(self) -> float:
        """Seconds between two periodic sends: half the watchdog timeout, as
        sd_watchdog_enabled(3) recommends, or :data:`STATUS_PERIOD`."""
        if self.watchdog_usec:
            return min(self.watchdog_usec / 2e6, STATUS_PERIOD)
        return STATUS_PERIOD

    def start_periodic(self, loop: asyncio.AbstractEventLoop, status: Callable[[], str]) -> None:
        """Ping the watchdog and refresh STATUS= every :attr:`period` seconds, from
        ``loop``: if the loop hangs, the pings stop and systemd acts."""
        if self.address is None:
            return

        def tick() -> None:
            try:
                text = status()
            except Exception:  # a summary that fails must not stop the pings
                log.exception("status summary failed")
                text = self._last_status
            if self.watchdog_usec:
                changed = text.replace("\n", " ") != self._last_status
                self.send("WATCHDOG=1", *(self._status(text) if changed else []))
            else:
                self.status(text)
            self._handle = loop.call_later(self.period, tick)

        tick()

    def stop_periodic(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def close(self) -> None:
        self.stop_periodic()
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_line(maps: Mapping[str, str], ike_sas: int, child_sas: int) -> str:
    """``STATUS=`` text: crypto maps up of total, then the SA counts.

    ``maps`` is the manager's ``map_status()`` (name -> "up" / "down" / ...)."""
    up = sum(1 for s in maps.values() if s == "up")
    return f"crypto maps up {up}/{len(maps)}; IKE SAs {ike_sas}; Child SAs {child_sas}"
