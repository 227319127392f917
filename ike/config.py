"""Configuration of one IKE peer (what a crypto map gives the engine)."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .constants import DhGroup, EncrId, IdType, IntegId, PrfId
from .lifetimes import REKEY_JITTER
from .payloads import TrafficSelector


@dataclass(frozen=True, slots=True)  # one or more per IKE SA
class Identity:
    """An IKE identity (§3.5). ``value`` is text: an address, FQDN or e-mail."""

    id_type: IdType
    value: str

    def encode(self) -> bytes:
        """The ID payload's octets (§3.5; the endpoint keeps them:
        ``EngineCaches.encoded``)."""
        if self.id_type in (IdType.ID_IPV4_ADDR, IdType.ID_IPV6_ADDR):
            return ipaddress.ip_address(self.value).packed
        return self.value.encode()

    @classmethod
    def decode(cls, id_type: int, data: bytes) -> Identity:
        """Raises ValueError on an unknown type or bad encoding (the endpoint keeps
        decoded identities: ``EngineCaches.identity``)."""
        t = IdType(id_type)
        if (t == IdType.ID_IPV4_ADDR and len(data) == 4) or (
            t == IdType.ID_IPV6_ADDR and len(data) == 16
        ):
            return cls(t, str(ipaddress.ip_address(data)))
        if t in (IdType.ID_FQDN, IdType.ID_RFC822_ADDR, IdType.ID_KEY_ID):
            return cls(t, data.decode("utf-8", "strict"))
        raise ValueError(f"unsupported identity {t.name}/{len(data)}")

    @classmethod
    def address(cls, addr: str) -> Identity:
        ip = ipaddress.ip_address(addr)
        return cls(IdType.ID_IPV4_ADDR if ip.version == 4 else IdType.ID_IPV6_ADDR, str(ip))

    def __str__(self) -> str:
        return f"{self.id_type.name}:{self.value}"


@dataclass(frozen=True)
class IkeProposal:
    """One IKE SA proposal: (encr, key bits, prf, integ, dh). integ is NONE with GCM."""

    encr: EncrId = EncrId.AES_GCM_16
    key_bits: int = 256
    prf: PrfId = PrfId.HMAC_SHA2_256
    integ: IntegId = IntegId.NONE
    dh: DhGroup = DhGroup.CURVE25519


@dataclass(frozen=True)
class EspProposal:
    """One ESP proposal: AES-GCM-16 with ``key_bits`` (128/256), ESN yes/no."""

    key_bits: int = 256
    esn: bool = False
    encr: EncrId = EncrId.AES_GCM_16


DEFAULT_IKE_PROPOSALS = (
    IkeProposal(EncrId.AES_GCM_16, 256, PrfId.HMAC_SHA2_256, IntegId.NONE, DhGroup.CURVE25519),
    IkeProposal(EncrId.AES_GCM_16, 256, PrfId.HMAC_SHA2_256, IntegId.NONE, DhGroup.ECP_256),
    IkeProposal(EncrId.AES_GCM_16, 128, PrfId.HMAC_SHA2_256, IntegId.NONE, DhGroup.MODP_2048),
    IkeProposal(
        EncrId.AES_CBC, 256, PrfId.HMAC_SHA2_256, IntegId.HMAC_SHA2_256_128, DhGroup.MODP_2048
    ),
)


@dataclass
class IkeConfig:
    """Everything the engine needs to know about one peer.

    Addresses are (host, port) tuples as the daemon's sockets use them.
    """

    local_addr: tuple[str, int]
    peer_addr: tuple[str, int]
    local_id: Identity
    remote_id: Identity
    local_psk: bytes = field(repr=False)
    remote_psk: bytes | None = field(default=None, repr=False)  # None: same as local_psk
    ike_proposals: tuple[IkeProposal, ...] = DEFAULT_IKE_PROPOSALS
    esp_proposals: tuple[EspProposal, ...] = (EspProposal(256, False), EspProposal(128, False))
    pfs_group: DhGroup | None = None  # KE in CREATE_CHILD_SA for Child SAs (§1.3.1)
    local_ts: tuple[TrafficSelector, ...] = ()  # empty: our address, all protocols
    remote_ts: tuple[TrafficSelector, ...] = ()  # empty: peer address
    mode: str = "tunnel"  # or "transport" (USE_TRANSPORT_MODE, §1.3.1)
    retransmit_timeout: float = 2.0  # §2.1: first timeout, doubled at every retry
    retransmit_tries: int = 3  # retransmissions after the first send, then give up
    # Lifetimes (0 = none): the engine's policy, see ike.lifetimes. In seconds it
    # rekeys at a soft share of them (REKEY_SHARE minus jitter) and deletes an SA
    # that reaches the hard one; in packets and bytes (a Child SA, either
    # direction, as counted by the data path: IkeSA.check_usage) likewise.
    ike_lifetime: float = 86400.0
    child_lifetime: float = 3600.0
    child_lifetime_packets: int = 0
    child_lifetime_bytes: int = 0
    # §2.8: a soft limit comes earlier by a random share of up to this much of the
    # lifetime; ``jitter`` draws that share, uniform in [0, 1) (tests inject a constant)
    rekey_jitter: float = REKEY_JITTER
    jitter: Callable[[], float] = field(default=random.random, repr=False, compare=False)
    # StarOS "rekey lazy": a Child SA idle at its soft lifetime is left to expire
    rekey_lazy: bool = False
    initial_contact: bool = True  # §2.4: on the first IKE SA to this peer
    fake_nat: bool = False  # strongSwan encap=yes: send a bogus NAT_DETECTION_SOURCE_IP
    # False: no NAT_DETECTION notifies, never float to 4500 (encapsulation = "never")
    nat_traversal: bool = True
    half_open_timeout: float = 30.0  # responder forgets an SA without IKE_AUTH after this
    cookie_threshold: int = 64  # half-open SAs before a responder demands COOKIEs (§2.6)
    name: str = ""

    @property
    def peer_psk(self) -> bytes:
        return self.local_psk if self.remote_psk is None else self.remote_psk

    def traffic_selectors(
        self, host_ts: Callable[[str], TrafficSelector] = TrafficSelector.from_network
    ) -> tuple[list[TrafficSelector], list[TrafficSelector]]:
        """(local, remote); by default the two hosts' own addresses, all protocols
        (``host_ts``: one host's selector, e.g. ``EngineCaches.host_ts``)."""
        local = list(self.local_ts) or [host_ts(self.local_addr[0])]
        remote = list(self.remote_ts) or [host_ts(self.peer_addr[0])]
        return local, remote
