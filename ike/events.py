"""Events the engine reports; the daemon pops them with ``IkeSA.next_event()``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .payloads import TrafficSelector


@dataclass
class IkeEvent:
    """Base class. ``ike_sa`` is the engine's stable name for the connection."""

    ike_sa: str


@dataclass
class IkeSaEstablished(IkeEvent):
    spi_i: bytes
    spi_r: bytes
    initiator: bool
    local_id: str
    remote_id: str
    algorithms: str  # e.g. "AES_GCM_16_256/PRF_HMAC_SHA2_256/CURVE25519"


@dataclass
class IkeSaRekeyed(IkeEvent):
    """The IKE SA now has new SPIs and keys; Child SAs moved over (§2.18)."""

    old_spi_i: bytes
    old_spi_r: bytes
    spi_i: bytes
    spi_r: bytes


@dataclass
class IkeSaDeleted(IkeEvent):
    """The IKE SA and every Child SA under it are gone (no ChildSaDeleted follow)."""

    reason: str  # "deleted-by-peer", "deleted", "peer-dead", "auth-failed", "failed: <NOTIFY>"
    child_ids: list[int] = field(default_factory=list)


@dataclass
class ChildSaInstalled(IkeEvent):
    """Install a Child SA. Keys are AES key ‖ 4-byte salt (RFC 4106 §8.1).

    With ``rekeyed_from`` set this is the make-before-break half of a rekey:
    install both directions, start sending on the new outbound SA, keep the
    old inbound SA until ``ChildSaDeleted`` for the old id arrives.
    """

    child_id: int
    inbound_spi: int
    outbound_spi: int
    inbound_key: bytes = field(repr=False)
    outbound_key: bytes = field(repr=False)
    mode: str = "tunnel"
    esn: bool = False
    local_ts: Sequence[TrafficSelector] = ()  # (the Child SA's own tuples)
    remote_ts: Sequence[TrafficSelector] = ()
    protocol: str = "ESP"
    encryption: str = "AES_GCM_16"
    key_bits: int = 256
    rekeyed_from: int | None = None


@dataclass
class ChildSaRekeyed(IkeEvent):
    """``old_child_id`` was replaced by ``new_child_id`` (installed just before)."""

    old_child_id: int
    new_child_id: int


@dataclass
class ChildSaDeleted(IkeEvent):
    child_id: int
    inbound_spi: int
    outbound_spi: int
    reason: str


@dataclass
class LifetimeExpired(IkeEvent):
    """A lifetime limit was reached and the engine acted on it (``ike.lifetimes``).

    ``child_id`` None: the IKE SA itself. ``hard``: the hard limit (else the
    soft one). ``limits``: what was reached, "seconds" or a comma-separated
    subset of "bytes", "packets", "seq". ``action``: "rekey" (started), "delete"
    (started), or "idle" (``rekey_lazy``: an SA that carried nothing is not
    rekeyed and goes at its hard lifetime).
    """

    child_id: int | None
    hard: bool
    limits: str
    action: str


@dataclass
class PeerDead(IkeEvent):
    """Retransmissions exhausted (§2.4); an IkeSaDeleted follows."""


@dataclass
class InitialContactReceived(IkeEvent):
    """§2.4: drop every other IKE/Child SA with this peer identity."""

    remote_id: str


@dataclass
class InvalidSpiReceived(IkeEvent):
    """The peer says it does not know ``spi``, the SPI of our Child SA ``child_id``
    (RFC 7296 §1.5, §3.10.1 INVALID_SPI).

    ``authenticated`` False: an unprotected message outside any IKE SA (the peer
    restarted, or someone forged it): only a hint; check liveness, never tear
    down on it alone. True: it came inside this IKE SA, from the peer itself.
    """

    spi: int
    child_id: int
    authenticated: bool


@dataclass
class NatDetected(IkeEvent):
    local_behind_nat: bool
    remote_behind_nat: bool


@dataclass
class AuthenticationFailed(IkeEvent):
    """PSK AUTH mismatch, by us or reported by the peer (AUTHENTICATION_FAILED)."""

    detail: str


@dataclass
class ExchangeFailed(IkeEvent):
    """An exchange ended with an error notify (sent or received)."""

    exchange: str
    notify: str  # e.g. "NO_PROPOSAL_CHOSEN"
    by_peer: bool
