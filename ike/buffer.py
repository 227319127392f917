"""A bounds-checked byte buffer (after aioquic's ``buffer.py``).

Every ``pull_*`` checks what is left before reading and raises
:class:`BufferReadError` on underrun, so a length read from the wire can never
index past the datagram. The hot parsers of ``payloads`` (the payload chain),
``sa_payload`` and ``ts_payload`` read ``span()`` with struct instead, with the
same checks in the same order, and raise what ``_underrun`` makes; the builders
there pack with struct.
"""

from __future__ import annotations

import struct


class DecodeError(Exception):
    """A message or payload is malformed (becomes INVALID_SYNTAX or a silent drop)."""


class BufferReadError(DecodeError):
    """Read past the end of the buffer."""


def _underrun(pos: int, n: int, end: int) -> BufferReadError:
    return BufferReadError(f"need {n} bytes, {end - pos} left")


_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class Buffer:
    __slots__ = ("_data", "_end", "_pos")

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self._data = data
        self._pos = start
        self._end = len(data) if end is None else end
        if not 0 <= start <= self._end <= len(data):
            raise BufferReadError("buffer bounds outside data")

    @property
    def position(self) -> int:
        return self._pos

    def remaining(self) -> int:
        return self._end - self._pos

    def eof(self) -> bool:
        return self._pos >= self._end

    def _need(self, n: int) -> int:
        if n < 0 or self._pos + n > self._end:
            raise BufferReadError(f"need {n} bytes, {self._end - self._pos} left")
        pos = self._pos
        self._pos = pos + n
        return pos

    def pull_uint8(self) -> int:
        return self._data[self._need(1)]

    def pull_uint16(self) -> int:
        return int(_U16.unpack_from(self._data, self._need(2))[0])

    def pull_uint32(self) -> int:
        return int(_U32.unpack_from(self._data, self._need(4))[0])

    def pull_bytes(self, n: int) -> bytes:
        pos = self._need(n)
        return self._data[pos : pos + n]

    def pull_rest(self) -> bytes:
        return self.pull_bytes(self.remaining())

    def span(self) -> tuple[bytes, int, int]:
        """(data, position, end): for a parser that reads the rest with struct
        at known offsets and checks each length against ``end`` itself."""
        return self._data, self._pos, self._end

    def sub(self, n: int) -> Buffer:
        """A buffer over the next ``n`` bytes; this one skips past them."""
        pos = self._need(n)
        return Buffer(self._data, pos, pos + n)
