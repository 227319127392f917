"""Drive an initiator IkeSA and a responder IkeEndpoint in memory with a fake clock.

After aioquic's ``client_and_server()``/``roundtrip()``: every datagram goes
through ``deliver``, which a test can make drop, duplicate or reorder.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

from ike.config import Identity, IkeConfig
from ike.endpoint import IkeEndpoint
from ike.events import IkeEvent
from ike.sa import IkeSA

I_ADDR = ("198.51.100.1", 500)
R_ADDR = ("198.51.100.2", 500)

# (direction "i>r"/"r>i", sequence number, data) -> datagrams to deliver instead
Filter = Callable[[str, int, bytes], list[bytes]]


def configs(psk: bytes = b"correct horse battery staple", **kw: Any) -> tuple[IkeConfig, IkeConfig]:
    """Matching initiator/responder configs; ``i_x``/``r_x`` keys override one side.

    The rekey jitter is 0 unless a test says otherwise (``jitter=...``): soft
    lifetimes at exactly 90 % / 93 %, so timings are deterministic."""
    kw.setdefault("jitter", no_jitter)
    ci = IkeConfig(I_ADDR, R_ADDR, Identity.address(I_ADDR[0]), Identity.address(R_ADDR[0]), psk)
    cr = IkeConfig(R_ADDR, I_ADDR, Identity.address(R_ADDR[0]), Identity.address(I_ADDR[0]), psk)
    both = {k: v for k, v in kw.items() if not k.startswith(("i_", "r_"))}
    ci = dataclasses.replace(ci, **both, **{k[2:]: v for k, v in kw.items() if k.startswith("i_")})
    cr = dataclasses.replace(cr, **both, **{k[2:]: v for k, v in kw.items() if k.startswith("r_")})
    return ci, cr


def no_jitter() -> float:
    return 0.0


class Pair:
    def __init__(self, ci: IkeConfig, cr: IkeConfig, seed: int = 1) -> None:
        rnd = random.Random(seed)
        self.now = 0.0
        self.i = IkeSA(ci, True, rnd.randbytes)
        self.ep = IkeEndpoint([cr], rng=random.Random(seed + 1).randbytes)
        self.wire: list[tuple[str, float, bytes]] = []  # everything either side sent
        self.i_events: list[IkeEvent] = []
        self.r_events: list[IkeEvent] = []
        self.i_src = I_ADDR  # what the responder sees as the initiator's address (NAT tests)
        self.i_src_4500 = (I_ADDR[0], 4500)  # ... once the initiator has floated to 4500
        self.dest: list[tuple[str, int]] = []  # destination of each datagram in ``wire``
        self._seq = 0

    @property
    def r(self) -> IkeSA:
        assert len(self.ep.sas) == 1, self.ep.sas
        return self.ep.sas[0]

    def _pump_events(self) -> None:
        while (e := self.i.next_event()) is not None:
            self.i_events.append(e)
        while (e := self.ep.next_event()) is not None:
            self.r_events.append(e)

    def roundtrip(self, flt: Filter | None = None, rounds: int = 30) -> int:
        """Move datagrams until both sides are quiet; returns how many moved."""
        moved = 0
        for _ in range(rounds):
            out_i = self.i.datagrams_to_send(self.now)
            out_r = self.ep.datagrams_to_send(self.now)
            if not out_i and not out_r:
                break
            src = self.i_src if self.i.local_addr[1] != 4500 else self.i_src_4500
            for data, dst in out_i:
                self.wire.append(("i>r", self.now, data))
                self.dest.append(dst)
                self._seq += 1
                for d in flt("i>r", self._seq, data) if flt else [data]:
                    self.ep.receive_datagram(d, src, self.now)
                    moved += 1
            for data, dst in out_r:
                self.wire.append(("r>i", self.now, data))
                self.dest.append(dst)
                self._seq += 1
                for d in flt("r>i", self._seq, data) if flt else [data]:
                    self.i.receive_datagram(d, R_ADDR, self.now)
                    moved += 1
        self._pump_events()
        return moved

    def handshake(self, flt: Filter | None = None) -> None:
        self.i.initiate(self.now)
        self.roundtrip(flt)

    def advance(self, to: float, flt: Filter | None = None) -> None:
        """Move the clock to ``to``, firing timers in order on the way."""
        while True:
            timers = [t for t in (self.i.get_timer(), self.ep.get_timer()) if t is not None]
            nxt = min(timers) if timers else None
            if nxt is None or nxt > to:
                break
            self.now = max(self.now, nxt)
            self.i.handle_timer(self.now)
            self.ep.handle_timer(self.now)
            self.roundtrip(flt)
        self.now = to
        self.roundtrip(flt)

    def events_of(self, side: str, kind: type[Any]) -> list[Any]:
        evs = self.i_events if side == "i" else self.r_events
        return [e for e in evs if isinstance(e, kind)]


def drop_nth(*numbers: int) -> Filter:
    """Drop the datagrams with these sequence numbers (1-based, both directions)."""

    def f(direction: str, seq: int, data: bytes) -> list[bytes]:
        return [] if seq in numbers else [data]

    return f
