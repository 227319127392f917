"""The configuration's types, names and bounds (see :mod:`ipsecmgr.config`)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from ipsecmgr.secret import Secret
from ipsecmgr.tls.config import TlsMap

if TYPE_CHECKING:
    import npusim

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

#: Hook for ACL rule validation (npusim's parser): ``(acl_name, rules) -> errors``.
#: Each error should name the rule; it is reported under ``access_list.NAME.rules``.
AclValidator = Callable[[str, list[str]], list[str]]

IKE_ENCRYPTIONS = ("aes-gcm-128", "aes-gcm-256", "aes-cbc-256")
PRFS = ("sha256", "sha384", "sha512")
INTEGRITIES = ("sha256", "sha384", "sha512")
DH_GROUPS = (14, 19, 20, 31)
ESP_ENCRYPTIONS = ("aes-gcm-128", "aes-gcm-256")
MODES = ("tunnel", "transport")
REKEY_POLICIES = ("keepalive", "lazy")
FIRST_PACKET = ("drop", "queue")
#: What answers a protected packet whose map has no reachable peer (ipsecmgr.reject)
ON_UNREACHABLE = ("icmp", "rst", "drop")
#: [gateway] datapath: one process, or a control process + one worker per direction.
DATAPATHS = ("single", "split")
#: [gateway] on_stop: what SIGTERM leaves (docs/security.md, fail closed).
ON_STOP = ("block", "clear")
ENCAPSULATIONS = ("auto", "always", "never")
ID_TYPES = ("ipv4", "ipv6", "fqdn", "email")
ROLES = ("initiator", "responder")
DEFAULT_CONTROL_SOCKET = Path("/run/ipsecmgr/control.sock")
# Seconds. Short lifetimes make rekeying testable (the interop tests use a few
# seconds); production configs keep the defaults (hours).
MIN_LIFETIME = 2
# Bounds of lifetimes, timers and counts (docs/configuration.md "Bounds"): a value
# outside is an error naming the key and the range, never a late failure.
MAX_LIFETIME = 7 * 86400  # seconds, IKE and Child SA: rekeying at least weekly
MAX_VOLUME = (1 << 63) - 1  # lifetime_bytes / lifetime_packets: TOML's largest integer
MIN_TIMER, MAX_TIMER = 0.1, 86400.0  # dpd.interval, nat_keepalive (0: off)
MAX_DPD_TIMEOUT = 3600.0
MAX_RETRIES = 20  # dpd.retries, max_retransmission


class ConfigError(ValueError):
    """The configuration is invalid. ``errors`` lists every problem found."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# ---------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class AccessList:
    """``ip access-list NAME``: the rule strings, parsed by npusim."""

    name: str
    rules: tuple[str, ...]


@dataclass(frozen=True)
class IkeTransformSet:
    """``ikev2-ikesa transform-set NAME``: one IKE SA proposal."""

    name: str
    encryption: str = "aes-gcm-256"
    prf: str = "sha256"
    integrity: str | None = None  # only with aes-cbc-*; AEAD carries its own
    dh_group: int = 14
    lifetime: int = 86400  # seconds until the IKE SA is rekeyed


@dataclass(frozen=True)
class IpsecTransformSet:
    """``ipsec transform-set NAME``: one Child SA proposal and its lifetimes."""

    name: str
    esp: str = "aes-gcm-256"
    esn: bool = False
    pfs_group: int | None = None
    mode: str = "tunnel"
    lifetime_seconds: int = 3600
    lifetime_bytes: int | None = None
    lifetime_packets: int | None = None
    rekey: str = "keepalive"  # keepalive: rekey before expiry even when idle


@dataclass(frozen=True)
class Identity:
    """IKE identification (RFC 7296 §3.5): ID type and value."""

    type: str
    value: str

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


@dataclass(frozen=True)
class Dpd:
    """Liveness checks (RFC 7296 §2.4); ``interval = 0`` disables them."""

    interval: float = 30.0
    timeout: float = 10.0
    retries: int = 3


@dataclass(frozen=True)
class CryptoMap:
    """``crypto map NAME ikev2-ipv4``: which traffic is protected, with whom, how."""

    name: str
    peer: IPAddress
    local_address: IPAddress
    match_address: str
    local_id: Identity
    remote_id: Identity
    local_psk: Secret = field(repr=False)
    remote_psk: Secret = field(repr=False)
    ike_transform_sets: tuple[str, ...]
    ipsec_transform_sets: tuple[str, ...]
    mode: str
    src_ip: IPAddress | None = None
    role: str = "initiator"
    retransmission_timeout_ms: int = 2000
    max_retransmission: int = 3
    dpd: Dpd = field(default_factory=Dpd)
    first_packet: str = "drop"
    queue_size: int = 8
    # NAT traversal (RFC 7296 §2.23, RFC 3948). "auto": send NAT_DETECTION
    # notifies; if either side is behind a NAT, IKE moves to UDP 4500 from
    # IKE_AUTH on and ESP goes in UDP 4500. "always": also fake our source hash
    # (as strongSwan's encap = yes), so the peer sees a NAT and both encapsulate.
    # "never": send no NAT_DETECTION notifies, i.e. do not offer NAT-T at all;
    # an RFC peer then stays on port 500 and raw ESP (IP protocol 50). Offering
    # NAT-T but ignoring a detected NAT would break the peer's §2.23 float.
    encapsulation: str = "auto"
    initial_contact: bool = True
    nat_keepalive: float = 20.0  # seconds between NAT keepalives when behind a NAT (0: off)
    # Failover (docs/recovery.md): every peer in order of preference (``peer`` is the
    # first); back to a preferred peer once it answers again; what a packet gets back
    # while no peer is reachable (ipsecmgr.reject).
    peers: tuple[IPAddress, ...] = ()
    preempt: bool = True
    on_unreachable: str = "icmp"


@dataclass(frozen=True)
class TunInterface:
    """A TUN device: the kernel routes protected destinations into it."""

    name: str
    addresses: tuple[IPInterface, ...]
    mtu: int = 1400
    crypto_maps: tuple[str, ...] = ()
    routes: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class Gateway:
    """Host-wide settings: where IKE/ESP is sent from, and the control socket."""

    local_addresses: tuple[IPAddress, ...]
    management_interface: str | None = None
    control_socket: Path = DEFAULT_CONTROL_SOCKET
    ike_port: int = 500
    natt_port: int = 4500
    # "split": TUN -> ESP and ESP -> TUN each in a worker process (ipsecmgr.workers).
    datapath: str = "single"
    # Split data path: lower the MSS of TCP SYNs read from the TUN to fit the TUN MTU
    # (True), to at most this number, or not at all (False).
    mss_clamp: bool | int = True
    # Kernel offloads (docs/performance.md): TUN super-packets (IFF_VNET_HDR + TSO) and
    # UDP GSO/GRO on the ESP-in-UDP socket. One warning and off when the kernel refuses.
    offload: bool = True
    # SIGTERM/SIGINT: "block" leaves the fail-closed routes and rules (protected
    # traffic refused until the next start or `ipsecmgr down`); "clear" removes all.
    on_stop: str = "block"


@dataclass(frozen=True)
class Metrics:
    """``[metrics]``: the Prometheus endpoint (ipsecmgr.metrics); absent: off."""

    host: str
    port: int
    allow_remote: bool = False


@dataclass(frozen=True)
class Config:
    access_lists: Mapping[str, AccessList]
    ike_transform_sets: Mapping[str, IkeTransformSet]
    ipsec_transform_sets: Mapping[str, IpsecTransformSet]
    crypto_maps: Mapping[str, CryptoMap]
    tuns: tuple[TunInterface, ...]
    gateway: Gateway
    warnings: tuple[str, ...] = ()
    metrics: Metrics | None = None
    # [tls_map.NAME]: flows protected by TLS 1.3 instead of ESP (ipsecmgr.tls).
    tls_maps: Mapping[str, TlsMap] = field(default_factory=lambda: MappingProxyType({}))
    # The ACLs as npusim compiled them for the shadowed-line check, so that the daemon
    # does not compile them again (10,000 maps); not part of what the file says.
    compiled_acls: Mapping[str, npusim.Acl] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )


@dataclass(frozen=True)
class ConfigDiagnosis:
    """What ``check-config`` reports: the config if valid, all errors and warnings."""

    config: Config | None
    errors: list[str]
    warnings: list[str]
