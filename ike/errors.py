"""Errors raised inside the engine; none escapes ``receive_datagram``."""

from __future__ import annotations

from .constants import NotifyType, notify_name


class ProtocolError(Exception):
    """A request we must refuse with an error NOTIFY (§2.21)."""

    def __init__(self, notify: int, detail: str = "", data: bytes = b"") -> None:
        super().__init__(f"{notify_name(notify)}: {detail}")
        self.notify = NotifyType(notify)
        self.detail = detail
        self.data = data
