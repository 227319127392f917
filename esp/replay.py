"""Anti-replay window (RFC 4303 §3.4.3 and Appendix A).

State: ``top``, the highest authenticated sequence number (64-bit with ESN), and
``missing``, a Python int used as a bitmap of the numbers inside the window that
have NOT been received: bit ``i`` set means ``top - i`` is still acceptable.
Storing the gaps rather than the hits makes the common case free: with in-order
traffic and no loss ``missing`` stays 0 and accepting a packet is ``top += 1``
(:class:`esp.sa.InboundSA` inlines exactly that fast path and calls the methods
here for everything else).

Everything at or below ``top`` that is not marked missing counts as seen, which
includes the numbers before the first packet: sequence number 0 is never sent
(RFC 4303 §3.3.3: the first packet carries 1), so a fresh window (``top = 0``,
``missing = 0``) rejects it without a special case.

The caller checks first (:meth:`ReplayWindow.check`, before decryption, so a flood
of replays costs no AES work) and commits only after the ICV verified
(:meth:`ReplayWindow.accept`), so forged packets never move the window.
"""

from __future__ import annotations

from .errors import ReplayError

__all__ = ["MAX_WINDOW", "MIN_WINDOW", "ReplayWindow"]

MIN_WINDOW = 32  # RFC 4303 §3.4.3: "a minimum window size of 32 packets MUST be supported"
MAX_WINDOW = 65536

_M32 = 0xFFFFFFFF
_MASKS: dict[int, int] = {}  # window size -> (1 << size) - 1


class ReplayWindow:
    """Sliding anti-replay window, 32-bit or ESN (64-bit) sequence numbers."""

    __slots__ = ("_mask", "esn", "missing", "size", "top")

    def __init__(self, size: int = 128, *, esn: bool = False, top: int = 0) -> None:
        if not MIN_WINDOW <= size <= MAX_WINDOW:
            raise ValueError(f"replay window must be {MIN_WINDOW}..{MAX_WINDOW}, got {size}")
        self.size = size
        self.esn = esn
        # One int per window size, shared: a 128-bit int is 44 bytes, per Child SA
        self._mask = _MASKS.setdefault(size, (1 << size) - 1)
        self.top = 0
        self.missing = 0
        self.reset(top)

    def reset(self, top: int) -> None:
        """Forget history: everything up to and including ``top`` counts as seen.

        For an SA that resumes from saved state, and for tests that need the window
        near 2^32 or at a known-answer vector's sequence number.
        """
        limit = (1 << 64) if self.esn else (1 << 32)
        if not 0 <= top < limit:
            raise ValueError(f"top {top} out of range")
        self.top = top
        self.missing = 0

    def check(self, seq_low: int) -> int:
        """Return the full sequence number for the received low 32 bits, or raise.

        Raises :class:`ReplayError` for a duplicate or a number left of the window.
        Changes nothing.
        """
        top = self.top
        size = self.size
        if self.esn:
            # RFC 4303 Appendix A2.2: pick the high half that puts the packet in
            # or right of the window. The ICV then confirms the guess (A2.3).
            tl = top & _M32
            th = top >> 32
            if tl >= size - 1:  # Case A: window within one 2^32 subspace
                seq_high = th if seq_low >= tl - size + 1 else th + 1
            else:  # Case B: window spans two subspaces
                seq_high = th - 1 if seq_low >= (tl - size + 1) & _M32 else th
            if seq_high < 0 or seq_high > _M32:
                # Before the first subspace (nothing was ever that old) or past the
                # end of the 64-bit space: neither can be a valid new packet.
                raise ReplayError("sequence number outside the 64-bit space")
            seq = (seq_high << 32) | seq_low
        else:
            seq = seq_low
        if seq > top:
            return seq
        diff = top - seq
        if diff >= size:
            raise ReplayError("sequence number left of the window")
        if not (self.missing >> diff) & 1:
            raise ReplayError("duplicate sequence number")
        return seq

    def accept(self, seq: int) -> None:
        """Record ``seq`` (a number :meth:`check` returned) as received.

        Call only after the ICV verified (RFC 4303 §3.4.3).
        """
        diff = seq - self.top
        if diff > 0:
            # Slide right: the numbers strictly between the old and new top are gaps.
            if diff < self.size:
                self.missing = ((self.missing << diff) | ((1 << diff) - 2)) & self._mask
            else:
                self.missing = self._mask - 1
            self.top = seq
        else:
            self.missing &= ~(1 << -diff)

    def seen(self, seq: int) -> bool:
        """True if ``seq`` would be rejected as a replay (for tests and show commands)."""
        diff = self.top - seq
        return diff >= self.size or (diff >= 0 and not (self.missing >> diff) & 1)

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self.size}, esn={self.esn}, top={self.top})"
