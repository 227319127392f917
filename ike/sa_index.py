"""The live IKE SAs of an endpoint and the indexes they are filed in.

:class:`SaIndex` is the part of :class:`ike.endpoint.IkeEndpoint` that keeps
them: the SAs in the order they were registered (:class:`SaList`), each one's
:class:`Filed` record, and the indexes by SPI, by name, by peer, by config, by
Child SPI (in and out), the half-open responders and the timer heap. The
endpoint's ``_collect`` keeps them up to date through ``_index`` and
``_forget``, for the SAs that woke up only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar, overload

from .config import Identity
from .sa import IkeSA
from .state import Address, ChildSA, State
from .timers import TimerHeap

ZERO_SPI = b"\x00" * 8
_INIT_DONE = State.INIT_DONE  # read per datagram (an enum member via its class: ~0.2 µs)


class Filed:
    """What one live SA is filed under in the endpoint's indexes, so that a change
    or its end removes exactly its own entries: one record per SA (in
    :class:`SaList`) rather than a reverse dict per index, ~150 bytes less per SA."""

    __slots__ = ("children", "init", "peer", "spis")

    def __init__(self) -> None:
        self.spis: tuple[bytes, ...] = ()  # our IKE SPIs (_by_spi)
        self.init: tuple[bytes, Address] | None = None  # its _by_init key (a responder)
        self.peer: PeerKey | None = None  # its _by_peer key; the peer address of...
        # ...its Child SAs as last indexed: their inbound SPIs (_child_spis) and
        # (peer address, outbound SPI) (_by_child_out)
        self.children: tuple[ChildSA, ...] = ()


class SaList:
    """The live IKE SAs in the order they were registered: a list to read, a dict inside
    (adding and removing one costs the same with 10 or 10,000 SAs), which also holds
    each SA's :class:`Filed` record."""

    __slots__ = ("_drop", "_sas")

    def __init__(self, drop: Callable[[IkeSA], None]) -> None:
        self._sas: dict[IkeSA, Filed] = {}
        self._drop = drop

    def add(self, sa: IkeSA) -> Filed:
        filed = self._sas[sa] = Filed()
        return filed

    def discard(self, sa: IkeSA) -> Filed | None:
        return self._sas.pop(sa, None)

    def filed(self, sa: IkeSA) -> Filed | None:
        return self._sas.get(sa)

    def __iter__(self) -> Iterator[IkeSA]:
        return iter(self._sas)

    def __len__(self) -> int:
        return len(self._sas)

    def __contains__(self, sa: object) -> bool:
        return sa in self._sas

    @overload
    def __getitem__(self, index: int) -> IkeSA: ...
    @overload
    def __getitem__(self, index: slice) -> list[IkeSA]: ...
    def __getitem__(self, index: int | slice) -> IkeSA | list[IkeSA]:
        return list(self._sas)[index]

    def __setitem__(self, index: slice, keep: Iterable[IkeSA]) -> None:
        """``sas[:] = [...]``: forget every SA not kept (a test's way to tidy up)."""
        if index != slice(None):
            raise TypeError("only sas[:] = ... is supported")
        kept = set(keep)
        for sa in list(self._sas):
            if sa not in kept:
                self._drop(sa)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SaList):
            return list(self._sas) == list(other._sas)
        if isinstance(other, list):
            return list(self._sas) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SaList({list(self._sas)!r})"


class SaIndex:
    """The live IKE SAs and every index they are filed in (the state of
    :class:`ike.endpoint.IkeEndpoint` that follows its SAs)."""

    def __init__(self) -> None:
        self.sas = SaList(self._drop)
        self._by_spi: dict[bytes, IkeSA] = {}
        self._by_init: dict[tuple[bytes, Address], IkeSA] = {}
        # Two live SAs may share a name (the peer chose the same SPIi twice, from two
        # addresses): the first registered is the one found, then the next.
        # (one SA per key is the rule in these three: see _link)
        self._by_name: dict[str, Group] = {}
        # (What each live SA is filed under: its Filed record in self.sas)
        # (remote ID, peer address) -> its SAs (INITIAL_CONTACT, §2.4)
        self._by_peer: dict[PeerKey, Group] = {}
        # id(IkeConfig) -> its SAs (IkeConfig is mutable, so not hashable; an SA
        # holds its config, so the id is not reused while the SA is listed)
        self._by_config: dict[int, Group] = {}
        # Inbound Child SPIs in use -> their SA (new SPIs, §2.1 of RFC 4303)
        self._child_spis: dict[int, IkeSA] = {}
        # Responders between IKE_SA_INIT and IKE_AUTH (the COOKIE threshold, §2.6)
        self._half_open: dict[IkeSA, None] = {}
        # Each live SA's next deadline (IkeSA.get_timer as of its last _collect)
        self.timers: TimerHeap[IkeSA] = TimerHeap()
        # SAs that may have news since the last _collect (IkeSA.wake), in that order:
        # only those are looked at, so a message costs the same with 10 or 10,000 SAs.
        self._dirty: dict[IkeSA, None] = {}
        # Bound once: each SA holds it, and a bound method is 72 bytes per SA
        self._wake_fn = self._wake
        # INVALID_SPI (RFC 7296 §1.5): the Child SAs by (peer address, SPI we send on)
        # and the established SAs by peer address, for what we receive and send: O(1)
        # whatever the number of SAs
        self._by_child_out: dict[tuple[str, int], IkeSA] = {}
        self._by_peer_ip: dict[str, IkeSA] = {}

    def _register(self, sa: IkeSA) -> Filed:
        """A new live SA: listed, found by name and config, looked at by the next _collect."""
        filed = self.sas.add(sa)
        _link(self._by_name, sa.name, sa)
        _link(self._by_config, id(sa.config), sa)
        sa.wake = self._wake_fn
        self._dirty[sa] = None
        return filed

    def _wake(self, sa: IkeSA) -> None:
        self._dirty[sa] = None

    def _drop(self, sa: IkeSA) -> None:
        """Forget ``sa`` without a word to anyone (``sas[:] = ...``)."""
        if sa.wake is not None:
            self._forget(sa)

    def _forget(self, sa: IkeSA) -> None:
        """A dead SA leaves the list and every index."""
        sa.wake = None
        filed = self.sas.discard(sa) or Filed()
        self._dirty.pop(sa, None)
        for spi in filed.spis:
            if self._by_spi.get(spi) is sa:
                del self._by_spi[spi]
        key = filed.init
        if key is not None and self._by_init.get(key) is sa:
            del self._by_init[key]
        _unlink(self._by_name, sa.name, sa)
        _unlink(self._by_config, id(sa.config), sa)
        peer = filed.peer
        if peer is not None:
            _unlink(self._by_peer, peer, sa)
            self._unfile_children(sa, peer[1], filed.children, None, ())
        self._half_open.pop(sa, None)
        self.timers.cancel(sa)
        if self._by_peer_ip.get(sa.peer_addr[0]) is sa:
            del self._by_peer_ip[sa.peer_addr[0]]

    def _index(self, sa: IkeSA) -> None:
        """Bring ``sa``'s entries in every index up to date (it is alive)."""
        filed = self.sas.filed(sa)
        assert filed is not None
        if sa.retiring:
            spis = tuple(spi for spi in sa.local_spis() if spi and spi != ZERO_SPI)
        else:  # (the common case, without building lists)
            spi = sa.ch.local_spi
            spis = (spi,) if spi and spi != ZERO_SPI else ()
        old = filed.spis
        if spis != old:
            for spi in old:
                if spi not in spis and self._by_spi.get(spi) is sa:
                    del self._by_spi[spi]
            for spi in spis:
                self._by_spi[spi] = sa
            filed.spis = spis
        old_peer = filed.peer
        peer_ip = sa.peer_addr[0]
        if old_peer is None or old_peer[1] != peer_ip or old_peer[0] is not sa.config.remote_id:
            if old_peer is not None:
                _unlink(self._by_peer, old_peer, sa)
            filed.peer = (sa.config.remote_id, peer_ip)
            _link(self._by_peer, filed.peer, sa)
        children = tuple(sa.children.values()) if sa.children else ()
        if old_peer is None or old_peer[1] != peer_ip or not _same(children, filed.children):
            if old_peer is not None:
                self._unfile_children(sa, old_peer[1], filed.children, peer_ip, children)
            # (peer address, outbound Child SPI) → SA: what an INVALID_SPI is looked
            # up by (§1.5); inbound Child SPIs → SA: new SPIs are unique (_spi_taken)
            for c in children:
                self._child_spis[c.inbound_spi] = sa
                self._by_child_out[(peer_ip, c.outbound_spi)] = sa
            filed.children = children
        if children and sa.established:
            self._by_peer_ip[peer_ip] = sa
        if not sa.initiator and sa.state is _INIT_DONE:
            self._half_open[sa] = None
        else:
            self._half_open.pop(sa, None)
        self.timers.set(sa, sa.get_timer())

    def _unfile_children(
        self,
        sa: IkeSA,
        old_ip: str,
        old: tuple[ChildSA, ...],
        new_ip: str | None,
        new: tuple[ChildSA, ...],
    ) -> None:
        """Remove the entries ``sa`` filed for the Child SAs ``old`` with the peer
        address ``old_ip`` that the ones for ``new`` with ``new_ip`` do not keep
        (and only where they are still its own)."""
        for c in old:
            kept = any(c is n for n in new)
            if not kept and self._child_spis.get(c.inbound_spi) is sa:
                del self._child_spis[c.inbound_spi]
            if not kept or new_ip != old_ip:
                key = (old_ip, c.outbound_spi)
                if self._by_child_out.get(key) is sa:
                    del self._by_child_out[key]


def _same(a: tuple[ChildSA, ...], b: tuple[ChildSA, ...]) -> bool:
    """The same Child SA objects (not equal ones: a ChildSA compares by value)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


PeerKey = tuple[Identity, str]
_K = TypeVar("_K")


# The SAs under one key of an index where one SA per key is the rule (a name, a
# peer, a config as a rule): that SA itself, or a list of them while there are two
# or more (in the order they were linked). A list of one would be ~90 bytes per SA.
Group = IkeSA | list[IkeSA]


def _link(index: dict[_K, Group], key: _K, sa: IkeSA) -> None:
    group = index.get(key)
    if group is None:
        index[key] = sa
    elif isinstance(group, list):
        group.append(sa)
    else:
        index[key] = [group, sa]


def _unlink(index: dict[_K, Group], key: _K, sa: IkeSA) -> None:
    group = index.get(key)
    if group is sa:
        del index[key]
    elif isinstance(group, list) and sa in group:
        group.remove(sa)
        if len(group) == 1:
            index[key] = group[0]


def _linked(index: dict[_K, Group], key: _K) -> Sequence[IkeSA]:
    group = index.get(key)
    if group is None:
        return ()
    return group if isinstance(group, list) else (group,)
