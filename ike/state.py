"""Plain state records shared by the SA machinery and the tasks."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, MutableMapping, ValuesView
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from .crypto import IkeKeys, IkeSuite, Prf, SkCipher
from .payloads import Header, Payload, TrafficSelector

if TYPE_CHECKING:
    from .tasks import Task

Address = tuple[str, int]

NAT_T_PORT = 4500


def nat_hash(spi_i: bytes, spi_r: bytes, addr: Address, packed: Callable[[str], bytes]) -> bytes:
    """§2.23: SHA-1(SPIi | SPIr | IP | Port). ``packed``: an address as octets
    (the endpoint's cache, ``EngineCaches.packed_ip``)."""
    data = spi_i + spi_r + packed(addr[0]) + addr[1].to_bytes(2, "big")
    return hashlib.sha1(data).digest()


class State(StrEnum):
    """States of an IKE SA (str values: ``info()`` and logs print them as before)."""

    NEW = "new"
    INIT_SENT = "init-sent"
    INIT_DONE = "init-done"  # IKE_SA_INIT done, IKE_AUTH not yet
    ESTABLISHED = "established"
    DELETING = "deleting"
    DEAD = "dead"


class ChildState(StrEnum):
    """States of a Child SA.

    INSTALLED: in use. REKEYING: our CREATE_CHILD_SA rekey is in flight (§1.3.3).
    REKEYED: replaced by a newer Child SA, the DELETE of this one follows
    (make-before-break, §2.8). DELETING: our DELETE is in flight (§1.4.1).
    """

    INSTALLED = "installed"
    REKEYING = "rekeying"
    REKEYED = "rekeyed"
    DELETING = "deleting"


@dataclass(slots=True)
class ChildSA:
    child_id: int
    inbound_spi: int
    outbound_spi: int
    inbound_key: bytes = field(repr=False)
    outbound_key: bytes = field(repr=False)
    mode: str
    esn: bool
    key_bits: int
    local_ts: tuple[TrafficSelector, ...]  # (tuples: a list of one is 24 bytes more)
    remote_ts: tuple[TrafficSelector, ...]
    installed_at: float
    state: ChildState = ChildState.INSTALLED
    # Lifetime policy (ike.lifetimes): soft deadline in seconds, at which we start a
    # rekey (§2.8; None once started or skipped: one rekey per generation), hard
    # deadline, at which we delete it, and the soft volume limits (0: none)
    rekey_at: float | None = None
    expire_at: float | None = None
    soft_packets: int = 0
    soft_bytes: int = 0
    volume_done: bool = False  # a volume limit was acted on (rekey or delete): only once


class Children(MutableMapping[int, ChildSA]):
    """An IKE SA's Child SAs by child ID, in the order they were added.

    An IKE SA has one Child SA nearly all its life (a second one during a rekey,
    or with more selectors): that one is held in a slot, and a dict only exists
    while there are more. A dict of one is ~220 bytes, this object 48; a
    responder holds one per peer (10,000 and more).
    """

    __slots__ = ("_more", "_one")

    def __init__(self) -> None:
        self._one: ChildSA | None = None  # the only one (keyed by its child_id)...
        self._more: dict[int, ChildSA] | None = None  # ...or all of them

    def __getitem__(self, child_id: int) -> ChildSA:
        if self._more is not None:
            return self._more[child_id]
        one = self._one
        if one is None or one.child_id != child_id:
            raise KeyError(child_id)
        return one

    def __setitem__(self, child_id: int, child: ChildSA) -> None:
        one, more = self._one, self._more
        if more is not None:
            more[child_id] = child
        elif child.child_id == child_id and (one is None or one.child_id == child_id):
            self._one = child
        else:
            self._more = {} if one is None else {one.child_id: one}
            self._more[child_id] = child
            self._one = None

    def __delitem__(self, child_id: int) -> None:
        more = self._more
        if more is None:
            if self._one is None or self._one.child_id != child_id:
                raise KeyError(child_id)
            self._one = None
            return
        del more[child_id]
        if len(more) == 1:
            ((key, last),) = more.items()
            if last.child_id == key:
                self._one, self._more = last, None
        elif not more:
            self._more = None

    def __iter__(self) -> Iterator[int]:
        if self._more is not None:
            return iter(self._more)
        return iter(() if self._one is None else (self._one.child_id,))

    def __len__(self) -> int:
        if self._more is not None:
            return len(self._more)
        return 0 if self._one is None else 1

    def __contains__(self, child_id: object) -> bool:
        if self._more is not None:
            return child_id in self._more
        return self._one is not None and self._one.child_id == child_id

    def values(self) -> ValuesView[ChildSA]:
        # (the dict's own view when there is one; the mixin's goes through __getitem__)
        return self._more.values() if self._more is not None else super().values()

    def clear(self) -> None:
        self._one = self._more = None

    def __repr__(self) -> str:
        return f"Children({dict(self.items())!r})"


class SaCounters(Mapping[str, int]):
    """An IKE SA's counters by name: like a dict of the counts taken (a name never
    counted is not in it); ``requests``, ``responses`` and ``decrypted`` come
    first, in that order, then the others in the order first counted.

    Nearly every SA counts ``requests``, ``responses`` or ``decrypted`` and
    nothing else: those are held in slots, the rest in a dict made when one is
    first counted. A dict of two is 184 bytes per SA (10,000s on a responder),
    this object 64.
    """

    __slots__ = ("_more", "decrypted", "requests", "responses")
    _SLOTTED = ("requests", "responses", "decrypted")

    def __init__(self) -> None:
        self.decrypted = self.requests = self.responses = 0
        self._more: dict[str, int] | None = None

    def add(self, what: str) -> None:
        if what in SaCounters._SLOTTED:
            setattr(self, what, getattr(self, what) + 1)
        else:
            if self._more is None:
                self._more = {}
            self._more[what] = self._more.get(what, 0) + 1

    def __getitem__(self, what: str) -> int:
        if what in SaCounters._SLOTTED:
            n: int = getattr(self, what)
            if n:
                return n
        elif self._more is not None:
            return self._more[what]
        raise KeyError(what)

    def __iter__(self) -> Iterator[str]:
        yield from (name for name in SaCounters._SLOTTED if getattr(self, name))
        if self._more is not None:
            yield from self._more

    def __len__(self) -> int:
        slotted = sum(1 for name in SaCounters._SLOTTED if getattr(self, name))
        return slotted + (len(self._more) if self._more is not None else 0)

    def __repr__(self) -> str:
        return f"SaCounters({dict(self)!r})"


@dataclass(slots=True)
class Pending:
    """The request in flight on a channel (§2.1)."""

    task: Task
    msg_id: int
    packet: bytes
    tries: int
    deadline: float


@dataclass(repr=False, slots=True)
class Channel:
    """One IKE SA on the wire: SPIs, keys, message IDs, retransmission state."""

    spi_i: bytes
    spi_r: bytes
    initiator: bool  # we are the original initiator of *this* IKE SA (I flag)
    suite: IkeSuite | None = None
    prf: Prf | None = None
    keys: IkeKeys | None = None
    out: SkCipher | None = None
    inb: SkCipher | None = None
    next_id: int = 0  # next request message ID we send
    peer_id: int = 0  # next request message ID we expect
    pending: Pending | None = None
    cached: bytes | None = None  # the last response sent (§2.1; its header says to what)
    expire_at: float | None = None  # a retiring channel we wait on: forget it then

    def __repr__(self) -> str:
        return f"Channel({self.spi_i.hex()}/{self.spi_r.hex()})"

    @property
    def local_spi(self) -> bytes:
        return self.spi_i if self.initiator else self.spi_r

    def install_keys(self, suite: IkeSuite, prf: Prf, keys: IkeKeys) -> None:
        self.suite, self.prf, self.keys = suite, prf, keys
        ours_e, ours_a = (keys.sk_ei, keys.sk_ai) if self.initiator else (keys.sk_er, keys.sk_ar)
        theirs_e, theirs_a = (
            (keys.sk_er, keys.sk_ar) if self.initiator else (keys.sk_ei, keys.sk_ai)
        )
        self.out = SkCipher(suite.encr, ours_e, suite.integ, ours_a)
        self.inb = SkCipher(suite.encr, theirs_e, suite.integ, theirs_a)


@dataclass(slots=True)
class Inbound:
    """A decoded message handed to tasks and responder handlers."""

    header: Header
    payloads: list[Payload]
    raw: bytes
    addr: Address
