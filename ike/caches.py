"""What the engine remembers between handshakes: one object per endpoint.

A responder sees the same identities, traffic selectors, addresses and PSKs in
every IKE_AUTH and CREATE_CHILD_SA of a peer; decoding them (ipaddress objects,
an IntEnum) or deriving prf(PSK, "Key Pad for IKEv2") again costs more than a
lookup. These tables belong to the :class:`ike.IkeEndpoint` that owns the SAs
(``IkeEndpoint.caches``), never to the process: two endpoints never share one,
and the endpoint drops the PSK-derived keys of the configurations it stops
using (all of them when it gets a new set), so a replaced PSK's key does not
outlive its configuration.

Every table is bounded (emptied when full): a peer cannot grow it by sending
other values. Only values are kept, never errors.
"""

from __future__ import annotations

import ipaddress
from typing import TypeVar

from .config import Identity
from .crypto import KeyedHmac, Prf
from .payloads import TrafficSelector

# Sizes: a handful of PSKs and identities per peer, a few selectors per Child SA
PSK_KEYS_MAX = 32
IDENTITIES_MAX = 256
SELECTORS_MAX = 256
ADDRESSES_MAX = 1024
KEY_PAD = b"Key Pad for IKEv2"  # RFC 7296 §2.15


class EngineCaches:
    """Bounded lookup tables of one endpoint (see the module docstring)."""

    __slots__ = ("_addresses", "_encoded", "_hosts", "_identities", "_psk_keys", "selectors")

    def __init__(self) -> None:
        self._psk_keys: dict[tuple[Prf, bytes], KeyedHmac] = {}
        self._identities: dict[tuple[int, bytes], Identity] = {}
        self._encoded: dict[Identity, bytes] = {}
        self._addresses: dict[str, bytes] = {}
        self._hosts: dict[str, TrafficSelector] = {}
        # TS payload wire record (type .. end address) -> TrafficSelector, filled by
        # ``payloads.parse_chain`` (TrafficSelector is immutable: shared safely)
        self.selectors: dict[bytes, TrafficSelector] = {}

    def psk_key(self, prf: Prf, psk: bytes) -> KeyedHmac:
        """prf(PSK, "Key Pad for IKEv2") keyed for the AUTH MAC (§2.15)."""
        key = (prf, psk)
        keyed = self._psk_keys.get(key)
        if keyed is None:
            keyed = prf.keyed(prf(psk, KEY_PAD))
            _bounded_put(self._psk_keys, key, keyed, PSK_KEYS_MAX)
        return keyed

    def forget_secrets(self) -> None:
        """Drop every PSK-derived key (a reload may have replaced the PSKs)."""
        self._psk_keys.clear()

    def forget_psks(self, psks: set[bytes] | frozenset[bytes]) -> None:
        """Drop the keys derived from these PSKs (the configs that held them were
        removed by a reload); the table is bounded, so this is a short pass."""
        if psks:
            for key in [k for k in self._psk_keys if k[1] in psks]:
                del self._psk_keys[key]

    def identity(self, id_type: int, data: bytes) -> Identity:
        """``Identity.decode`` once per (type, octets); ValueError is raised every time."""
        key = (id_type, data)
        ident = self._identities.get(key)
        if ident is None:
            ident = Identity.decode(id_type, data)
            _bounded_put(self._identities, key, ident, IDENTITIES_MAX)
        return ident

    def encoded(self, ident: Identity) -> bytes:
        """``ident.encode()`` once per identity (sent in every IKE_AUTH, §3.5)."""
        octets = self._encoded.get(ident)
        if octets is None:
            octets = ident.encode()
            _bounded_put(self._encoded, ident, octets, IDENTITIES_MAX)
        return octets

    def packed_ip(self, text: str) -> bytes:
        """An address as octets (NAT detection hashes, §2.23)."""
        packed = self._addresses.get(text)
        if packed is None:
            # (ip_address() tries IPv4 first and pays for an exception on IPv6 text)
            cls = ipaddress.IPv6Address if ":" in text else ipaddress.IPv4Address
            packed = cls(text).packed
            _bounded_put(self._addresses, text, packed, ADDRESSES_MAX)
        return packed

    def host_ts(self, addr: str) -> TrafficSelector:
        """The selector of one host, all protocols (a config's default selectors)."""
        ts = self._hosts.get(addr)
        if ts is None:
            ts = TrafficSelector.from_network(addr)
            _bounded_put(self._hosts, addr, ts, ADDRESSES_MAX)
        return ts

    def sizes(self) -> dict[str, int]:
        """Entries per table (tests and memory breakdowns)."""
        return {
            "psk_keys": len(self._psk_keys),
            "identities": len(self._identities),
            "addresses": len(self._addresses),
            "hosts": len(self._hosts),
            "selectors": len(self.selectors),
        }


_K = TypeVar("_K")
_V = TypeVar("_V")


def _bounded_put(table: dict[_K, _V], key: _K, value: _V, limit: int) -> None:
    if len(table) >= limit:
        table.clear()
    table[key] = value
