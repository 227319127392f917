"""Traffic selectors and the TS payload (RFC 7296 §3.13), parsed and built.

:mod:`ike.payloads` parses and builds the chain and calls ``_parse_ts`` /
``_build_ts`` for a TSi or TSr payload (and re-exports these names).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from .buffer import DecodeError, _underrun
from .constants import PayloadType, TsType

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)  # one or more per IKE SA
class TrafficSelector:
    start_addr: IPAddress
    end_addr: IPAddress
    ip_proto: int = 0
    start_port: int = 0
    end_port: int = 65535
    # IP version, start and end as ints, for narrowing (ipaddress converts on every
    # int() call; these are the address objects' own ints, in slots rather than a
    # tuple: 48 bytes less per selector, one or two per peer), and the hash, computed
    # once: the manager looks selectors up in caches for every Child SA, and
    # ipaddress hashes each address through hex() every time. Ints only, so the hash
    # is the same in every process (str hashes are salted per process; selectors
    # travel pickled to the data path workers).
    version: int = field(init=False, repr=False, compare=False)
    start: int = field(init=False, repr=False, compare=False)
    end: int = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        version = self.start_addr.version
        start = int(self.start_addr)
        end = start if self.end_addr is self.start_addr else int(self.end_addr)
        # frozen: set once, here
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)
        object.__setattr__(
            self,
            "_hash",
            hash((version, start, end, self.ip_proto, self.start_port, self.end_port)),
        )

    def __hash__(self) -> int:
        return self._hash

    @property
    def span(self) -> tuple[int, int, int]:
        """(IP version, start, end) as ints."""
        return self.version, self.start, self.end

    @property
    def ts_type(self) -> int:
        if self.start_addr.version == 4:
            return TsType.TS_IPV4_ADDR_RANGE
        return TsType.TS_IPV6_ADDR_RANGE

    @classmethod
    def from_network(
        cls, net: str, ip_proto: int = 0, start_port: int = 0, end_port: int = 65535
    ) -> TrafficSelector:
        n = ipaddress.ip_network(net, strict=False)
        return cls(n.network_address, n.broadcast_address, ip_proto, start_port, end_port)

    def __str__(self) -> str:
        ports = (
            ""
            if (self.start_port, self.end_port) == (0, 65535)
            else (f"[{self.start_port}-{self.end_port}]")
        )
        return f"{self.start_addr}-{self.end_addr}/{self.ip_proto}{ports}"


@dataclass
class TSPayload:
    """TSi (``type`` = 44) or TSr (45)."""

    selectors: list[TrafficSelector]
    type: int = PayloadType.TSi


_GENERIC = struct.Struct("!BBH")  # TS type, IP protocol, selector length
_TS_HEAD = struct.Struct("!BBHHH")  # type, protocol, length, start port, end port


# A peer sends the same selectors in every IKE_AUTH and CREATE_CHILD_SA, and
# building the two ipaddress objects costs more than the rest of the TS payload.
# TrafficSelector and the addresses are immutable, so one object can be shared:
# the caller may pass a table wire record (type .. end address) -> TrafficSelector
# (its endpoint's, ``EngineCaches.selectors``), bounded here (emptied when full)
# whatever a peer sends.
TS_CACHE_MAX = 256


def _parse_ts(
    data: bytes, pos: int, end: int, ptype: int, cache: dict[bytes, TrafficSelector] | None
) -> TSPayload:
    if pos + 4 > end:
        raise _underrun(pos, 4 if pos < end else 1, end)
    count = data[pos]
    pos += 4
    selectors: list[TrafficSelector] = []
    if cache is None:
        cache = {}
    for _ in range(count):
        if pos + 4 > end:
            raise _underrun(pos, 4, end)
        ts_type, proto, slen = _GENERIC.unpack_from(data, pos)
        if ts_type == TsType.TS_IPV4_ADDR_RANGE and slen == 16:
            cls: type[IPAddress] = ipaddress.IPv4Address
            alen = 4
        elif ts_type == TsType.TS_IPV6_ADDR_RANGE and slen == 40:
            cls, alen = ipaddress.IPv6Address, 16
        else:
            raise DecodeError(f"unsupported traffic selector type {ts_type}/len {slen}")
        if pos + slen > end:
            raise _underrun(pos + 4, slen - 4, end)
        record = data[pos : pos + slen]
        ts = cache.get(record)
        if ts is None:
            _, _, _, sp, ep = _TS_HEAD.unpack_from(record)
            a = cls(record[8 : 8 + alen])
            # A host (start = end, the usual peer selector) holds one address object
            b = a if record[8 : 8 + alen] == record[8 + alen :] else cls(record[8 + alen :])
            ts = TrafficSelector(a, b, proto, sp, ep)
            if len(cache) >= TS_CACHE_MAX:
                cache.clear()
            cache[record] = ts
        pos += slen
        selectors.append(ts)
    if pos != end:
        raise DecodeError("trailing bytes in TS payload")
    return TSPayload(selectors, ptype)


def _build_ts(p: TSPayload) -> bytes:
    parts = [bytes([len(p.selectors), 0, 0, 0])]
    for ts in p.selectors:
        alen = 4 if ts.start_addr.version == 4 else 16
        parts.append(_TS_HEAD.pack(ts.ts_type, ts.ip_proto, 8 + 2 * alen, ts.start_port,
                                   ts.end_port))  # fmt: skip
        parts.append(ts.start_addr.packed)
        parts.append(ts.end_addr.packed)
    return b"".join(parts)
