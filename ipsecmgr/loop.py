"""The daemon's event loop for ``[gateway] datapath = "single"``: asyncio, with the
data-path fds (TUNs, ESP sockets, UDP 4500) served straight from the selector.

A packet that arrives after idle time wakes the loop once per gateway traversal,
four times per round trip (docs/performance.md "latency"). Through ``add_reader``
each wake-up also pays asyncio's own bookkeeping: the selector's key lookup, a
Handle queued on ``_ready``, popped again and run under ``Context.run`` (~3-5 us
with cold caches, measured). :class:`DataPathSelector` calls the data path's
callback as soon as ``epoll_wait`` names its fd and hands asyncio only the other
fds (control socket, IKE on 500, trace clients). ``select`` still returns on every
wake-up, so asyncio's timers and ready callbacks run exactly as before: the
control plane keeps its turn after every data-path batch (the data path yields
after :data:`ipsecmgr.datapath.BATCH` packets, as it did under ``add_reader``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import select
import selectors
import weakref
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ipsecmgr")

# The loops new_event_loop() made, and their selector.
_SELECTORS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, DataPathSelector] = (
    weakref.WeakKeyDictionary()
)


class DataPathSelector(selectors.EpollSelector):
    """An ``EpollSelector`` (CPython's: its epoll object is ``_selector``, its
    registrations ``_fd_to_key``; :func:`supported` checks both) that runs the
    callbacks of fds added with :meth:`add_direct` itself."""

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, Callable[[], None]] = {}

    def add_direct(self, fd: int, callback: Callable[[], None]) -> None:
        """Serve ``fd`` (readable) with ``callback``, outside asyncio's registrations."""
        if fd in self._direct or fd in self.get_map():
            raise KeyError(f"fd {fd} is already registered")
        self._epoll.register(fd, select.EPOLLIN)
        self._direct[fd] = callback

    def remove_direct(self, fd: int) -> bool:
        if self._direct.pop(fd, None) is None:
            return False
        with contextlib.suppress(OSError, ValueError):  # closed already: epoll forgot it
            self._epoll.unregister(fd)
        return True

    @property
    def _epoll(self) -> select.epoll:
        return self._selector  # type: ignore[attr-defined, no-any-return]

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            timeout = -1
        elif timeout <= 0:
            timeout = 0
        else:
            # epoll_wait() has a resolution of 1 ms: round up, as EpollSelector does.
            timeout = math.ceil(timeout * 1e3) * 1e-3
        direct = self._direct
        keys: dict[int, selectors.SelectorKey] = self._fd_to_key  # type: ignore[attr-defined]
        ready: list[tuple[selectors.SelectorKey, int]] = []
        try:
            events = self._epoll.poll(timeout, max(len(keys) + len(direct), 1))
        except InterruptedError:
            return ready
        for fd, event in events:
            callback = direct.get(fd)
            if callback is not None:
                try:
                    callback()
                except Exception:  # as asyncio's Handle does: log it, keep serving
                    log.exception("data path callback for fd %d failed", fd)
                continue
            key = keys.get(fd)
            if key is not None:
                mask = 0
                if event & ~select.EPOLLIN:
                    mask |= selectors.EVENT_WRITE
                if event & ~select.EPOLLOUT:
                    mask |= selectors.EVENT_READ
                ready.append((key, mask & key.events))
        return ready

    def close(self) -> None:
        self._direct.clear()
        super().close()


def supported() -> bool:
    """Whether this Python's EpollSelector has the internals DataPathSelector uses."""
    probe = selectors.EpollSelector()
    try:
        return isinstance(getattr(probe, "_selector", None), select.epoll) and isinstance(
            getattr(probe, "_fd_to_key", None), dict
        )
    finally:
        probe.close()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The daemon's loop: a selector loop on :class:`DataPathSelector` where it works
    here, asyncio's default otherwise (the data path then goes through add_reader)."""
    if not supported():
        return asyncio.new_event_loop()
    selector = DataPathSelector()
    loop = asyncio.SelectorEventLoop(selector)
    _SELECTORS[loop] = selector
    return loop


def add_data_reader(loop: asyncio.AbstractEventLoop, fd: int, callback: Callable[..., Any],
                    *args: Any) -> None:  # fmt: skip
    """Read ``fd`` with ``callback(*args)``: straight from the selector when the loop
    is :func:`new_event_loop`'s, through ``add_reader`` otherwise."""
    selector = _SELECTORS.get(loop)
    if selector is None:
        loop.add_reader(fd, callback, *args)
    else:
        selector.add_direct(fd, functools.partial(callback, *args))


def remove_data_reader(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    selector = _SELECTORS.get(loop)
    if selector is None or not selector.remove_direct(fd):
        loop.remove_reader(fd)
