"""Gateway configuration: TOML in, frozen dataclasses out.

The concepts are those of the StarOS reference (``ip access-list``,
``ikev2-ikesa transform-set``, ``ipsec transform-set``, ``crypto map``,
``interface ... crypto-map``); the syntax is TOML, read with stdlib
``tomllib``. Example (see ``examples/`` for complete, commented files)::

    [access_list.foo]
    rules = ["permit ip host 192.0.2.1 host 203.0.113.49"]

    [ike_transform_set.ikesa-foo]
    dh_group = 14

    [ipsec_transform_set.B-foo]
    mode = "tunnel"

    [crypto_map.foo]
    peer = "198.51.100.2"
    match_address = "foo"
    local_psk = { file = "/etc/ipsecmgr/psk-foo" }
    ike_transform_sets = ["ikesa-foo"]
    ipsec_transform_sets = ["B-foo"]
    src_ip = "192.0.2.1"

    [tun.tun-foo]
    addresses = ["192.0.2.1/32"]
    crypto_maps = ["foo"]

    [gateway]
    local_addresses = ["198.51.100.1"]
    management_interface = "eth0"

Validation collects every error, each naming the exact key path and saying
what was expected (``crypto_map.foo.peer: '209.165.300.1' is not an IP
address``). Unknown keys are errors: a typo (``retransmision_timeout``) must
not silently fall back to a default. PSKs are read while loading (from a file
or the environment, see :mod:`ipsecmgr.secret`) so a missing key file is
reported by ``check-config``, not at the first IKE exchange.
"""

from __future__ import annotations

import ipaddress
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ipsecmgr.config_checks import (
    MAX_CONFIG_BYTES,
    acl_shadow_warnings,
    control_socket_problem,
    file_problem,
    interface_name_problem,
)
from ipsecmgr.secret import Secret, SecretError, SecretSource, load_secret
from ipsecmgr.tls.config import TlsMap, overlap_errors, parse_tls_map

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


@dataclass(frozen=True)
class ConfigDiagnosis:
    """What ``check-config`` reports: the config if valid, all errors and warnings."""

    config: Config | None
    errors: list[str]
    warnings: list[str]


# ---------------------------------------------------------------- public API


def load_config(
    path: str | Path,
    *,
    environ: Mapping[str, str] | None = None,
    validate_acl: AclValidator | None = None,
) -> Config:
    """Read and validate a config file; raise :class:`ConfigError` listing every error."""
    d = diagnose_config(path, environ=environ, validate_acl=validate_acl)
    if d.config is None:
        raise ConfigError(d.errors)
    return d.config


def check_config(
    path: str | Path,
    *,
    environ: Mapping[str, str] | None = None,
    validate_acl: AclValidator | None = None,
) -> list[str]:
    """All errors of a config file (empty list: valid). Warnings: :func:`diagnose_config`."""
    return diagnose_config(path, environ=environ, validate_acl=validate_acl).errors


def diagnose_config(
    path: str | Path,
    *,
    environ: Mapping[str, str] | None = None,
    validate_acl: AclValidator | None = None,
) -> ConfigDiagnosis:
    """Read a config file and return the config (or None), its errors and warnings."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        return ConfigDiagnosis(None, [f"{path}: cannot read: {getattr(e, 'strerror', 0) or e}"], [])
    problem = file_problem(raw)
    if problem is not None:
        return ConfigDiagnosis(None, [f"{path}: {problem}"], [])
    try:
        data = tomllib.loads(raw.decode())
    except tomllib.TOMLDecodeError as e:
        return ConfigDiagnosis(None, [f"{path}: not valid TOML: {e}"], [])
    except RecursionError:  # tomllib recurses per nesting level of arrays and tables
        return ConfigDiagnosis(None, [f"{path}: not valid TOML: nested too deeply"], [])
    return parse_config(data, base_dir=path.parent, environ=environ, validate_acl=validate_acl)


def parse_config(
    data: Mapping[str, Any],
    *,
    base_dir: Path = Path("."),
    environ: Mapping[str, str] | None = None,
    validate_acl: AclValidator | None = None,
) -> ConfigDiagnosis:
    """Validate an already parsed TOML document (see :func:`diagnose_config`)."""
    p = _Parser(base_dir, environ, validate_acl)
    cfg = p.parse(data)
    return ConfigDiagnosis(cfg if not p.errors else None, p.errors, p.warnings)


# ---------------------------------------------------------------- parser

_MISSING = object()
_SECTIONS = (
    "access_list", "ike_transform_set", "ipsec_transform_set", "crypto_map", "tun", "gateway",
    "metrics", "tls_map",
)  # fmt: skip


def _tname(v: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(v), type(v).__name__)


class _Parser:
    def __init__(
        self,
        base_dir: Path,
        environ: Mapping[str, str] | None,
        validate_acl: AclValidator | None,
    ) -> None:
        self.base_dir = base_dir
        self.environ = environ
        self.validate_acl = validate_acl
        self.errors: list[str] = []
        self.warnings: list[str] = []
        # Names declared, valid or not: a reference to an invalid set is not a
        # second error (the set's own error says what to fix).
        self.declared_ike: set[str] = set()
        self.declared_ipsec: set[str] = set()

    def err(self, path: str, msg: str) -> None:
        self.errors.append(f"{path}: {msg}")

    # --- typed getters: report and return None (or the default) on error

    def table(self, v: object, path: str) -> dict[str, Any] | None:
        if not isinstance(v, dict):
            self.err(path, f"expected a table, got {_tname(v)}")
            return None
        return v

    def keys(self, t: Mapping[str, Any], path: str, allowed: tuple[str, ...]) -> None:
        for k in t:
            if k not in allowed:
                self.err(
                    f"{path}.{k}" if path else k, f"unknown key (allowed: {', '.join(allowed)})"
                )

    def required(self, t: Mapping[str, Any], key: str, path: str) -> Any:
        if key not in t:
            self.err(f"{path}.{key}", "missing (required)")
            return _MISSING
        return t[key]

    def string(self, t: Mapping[str, Any], key: str, path: str, default: Any = None) -> Any:
        v = t.get(key, _MISSING)
        if v is _MISSING:
            return default
        if not isinstance(v, str) or not v:
            self.err(f"{path}.{key}", f"expected a non-empty string, got {v!r}")
            return default
        return v

    def choice(
        self, t: Mapping[str, Any], key: str, path: str, choices: tuple[Any, ...], default: Any
    ) -> Any:
        v = t.get(key, _MISSING)
        if v is _MISSING:
            return default
        if isinstance(v, bool) or v not in choices:
            shown = " | ".join(repr(c) for c in choices)
            self.err(f"{path}.{key}", f"{v!r} is not one of {shown}")
            return default
        return v

    def integer(
        self,
        t: Mapping[str, Any],
        key: str,
        path: str,
        default: Any,
        *,
        lo: int = 0,
        hi: int | None = None,
    ) -> Any:
        v = t.get(key, _MISSING)
        if v is _MISSING:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            self.err(f"{path}.{key}", f"expected an integer, got {_tname(v)} {v!r}")
            return default
        if v < lo or (hi is not None and v > hi):
            rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            self.err(f"{path}.{key}", f"{v} is out of range (expected {rng})")
            return default
        return v

    def number(
        self,
        t: Mapping[str, Any],
        key: str,
        path: str,
        default: float,
        *,
        lo: float = 0.0,
        hi: float = MAX_TIMER,
        off: bool = False,
    ) -> float:
        """A finite number in lo..hi seconds (``off``: 0 is also allowed, meaning off)."""
        v = t.get(key, _MISSING)
        if v is _MISSING:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            self.err(f"{path}.{key}", f"expected a number, got {_tname(v)} {v!r}")
            return default
        if not (lo <= v <= hi or (off and v == 0)):
            rng = ("0 (off) or " if off else "") + f"{lo:g}..{hi:g}"
            self.err(f"{path}.{key}", f"{v!r} is out of range (expected {rng})")
            return default
        return float(v)

    def boolean(self, t: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        v = t.get(key, _MISSING)
        if v is _MISSING:
            return default
        if not isinstance(v, bool):
            self.err(f"{path}.{key}", f"expected true or false, got {v!r}")
            return default
        return v

    def str_list(
        self, t: Mapping[str, Any], key: str, path: str, *, required: bool = False
    ) -> tuple[str, ...] | None:
        v = t.get(key, _MISSING)
        if v is _MISSING:
            if required:
                self.err(f"{path}.{key}", "missing (required)")
                return None
            return ()
        if not isinstance(v, list):
            self.err(f"{path}.{key}", f"expected a list of strings, got {_tname(v)}")
            return None
        ok = True
        for i, item in enumerate(v):
            if not isinstance(item, str) or not item.strip():
                self.err(f"{path}.{key}[{i}]", f"expected a non-empty string, got {item!r}")
                ok = False
        return tuple(v) if ok else None

    def address(self, v: Any, path: str) -> IPAddress | None:
        if not isinstance(v, str):
            self.err(path, f"expected an IP address string, got {_tname(v)}")
            return None
        try:
            return ipaddress.ip_address(v)
        except ValueError:
            self.err(path, f"{v!r} is not an IP address")
            return None

    def named_section(self, data: Mapping[str, Any], key: str) -> dict[str, dict[str, Any]]:
        """``[key.NAME]`` tables, each validated to be a table."""
        v = data.get(key, {})
        top = self.table(v, key)
        out: dict[str, dict[str, Any]] = {}
        for name, body in (top or {}).items():
            t = self.table(body, f"{key}.{name}")
            if t is not None:
                out[name] = t
        return out

    # --- sections

    def parse(self, data: Mapping[str, Any]) -> Config | None:
        self.keys(data, "", _SECTIONS)
        sections = {
            k: self.named_section(data, k)
            for k in ("access_list", "ike_transform_set", "ipsec_transform_set", "crypto_map")
        }
        self.declared_ike = set(sections["ike_transform_set"])
        self.declared_ipsec = set(sections["ipsec_transform_set"])
        acls: dict[str, AccessList] = {}
        for n, t in sections["access_list"].items():
            if (acl := self.acl(n, t)) is not None:
                acls[n] = acl
        ikes: dict[str, IkeTransformSet] = {}
        for n, t in sections["ike_transform_set"].items():
            if (ike := self.ike_set(n, t)) is not None:
                ikes[n] = ike
        ipsecs: dict[str, IpsecTransformSet] = {}
        for n, t in sections["ipsec_transform_set"].items():
            if (ips := self.ipsec_set(n, t)) is not None:
                ipsecs[n] = ips
        # A crypto map without transform-set lists uses "default" (the dataclass
        # defaults); a [..._transform_set.default] table overrides it.
        ikes.setdefault("default", IkeTransformSet("default"))
        ipsecs.setdefault("default", IpsecTransformSet("default"))
        gw = self.gateway(data.get("gateway", _MISSING))
        maps: dict[str, CryptoMap] = {}
        acl_names = set(sections["access_list"])  # once: per map it would be O(maps x ACLs)
        for n, t in sections["crypto_map"].items():
            cm = self.crypto_map(n, t, acls, ikes, ipsecs, gw, acl_names)
            if cm is not None:
                maps[n] = cm
        tuns = self.tuns(data.get("tun", _MISSING), set(sections["crypto_map"]))
        bound = {m for tun in tuns for m in tun.crypto_maps}
        for n in maps:
            if n not in bound:
                self.warnings.append(
                    f"crypto_map.{n}: not bound to any tun (its traffic never reaches it)"
                )
        tls_maps: dict[str, TlsMap] = {}
        acl_rules = {n: a.rules for n, a in acls.items()}
        for n, t in self.named_section(data, "tls_map").items():
            if (tm := parse_tls_map(self, n, t, acl_rules)) is not None:
                tls_maps[n] = tm
        self.errors.extend(overlap_errors(tls_maps))
        used = {cm.match_address for cm in maps.values()}  # a set: not O(ACLs x maps)
        used.update(tm.match_address for tm in tls_maps.values())
        for n in acls:
            if n not in used:
                self.warnings.append(f"access_list.{n}: not used by any crypto map")
        metrics = self.metrics(data.get("metrics", _MISSING))
        if self.errors or gw is None:
            return None
        return Config(
            MappingProxyType(acls), MappingProxyType(ikes), MappingProxyType(ipsecs),
            MappingProxyType(maps), tuple(tuns), gw, tuple(self.warnings),
            metrics=metrics, tls_maps=MappingProxyType(tls_maps),
        )  # fmt: skip

    def acl(self, name: str, t: dict[str, Any]) -> AccessList | None:
        path = f"access_list.{name}"
        self.keys(t, path, ("rules",))
        rules = self.str_list(t, "rules", path, required=True)
        if rules is None:
            return None
        if not rules:
            self.err(f"{path}.rules", "empty: an access list needs at least one rule")
            return None
        if self.validate_acl is not None:
            problems = self.validate_acl(name, list(rules))
            for msg in problems:
                self.err(f"{path}.rules", msg)
            if problems:
                return None
        self.warnings.extend(f"{path}.rules: {w}" for w in acl_shadow_warnings(name, rules))
        return AccessList(name, rules)

    def ike_set(self, name: str, t: dict[str, Any]) -> IkeTransformSet | None:
        path = f"ike_transform_set.{name}"
        self.keys(t, path, ("encryption", "prf", "integrity", "dh_group", "lifetime"))
        n = len(self.errors)
        enc = self.choice(t, "encryption", path, IKE_ENCRYPTIONS, "aes-gcm-256")
        prf = self.choice(t, "prf", path, PRFS, "sha256")
        integ = self.choice(t, "integrity", path, INTEGRITIES, None)
        group = self.choice(t, "dh_group", path, DH_GROUPS, 14)
        life = self.integer(t, "lifetime", path, 86400, lo=MIN_LIFETIME, hi=MAX_LIFETIME)
        self._short_lifetime(f"{path}.lifetime", life)
        if enc.startswith("aes-cbc") and integ is None and "integrity" not in t:
            self.err(
                f"{path}.integrity",
                f"required with encryption {enc!r} (one of {', '.join(INTEGRITIES)})",
            )
        if enc.startswith("aes-gcm") and integ is not None:
            self.err(f"{path}.integrity", f"must not be set with AEAD encryption {enc!r}")
        if len(self.errors) > n:
            return None
        return IkeTransformSet(name, enc, prf, integ, group, life)

    def _short_lifetime(self, path: str, seconds: int) -> None:
        if seconds < 60:
            self.warnings.append(f"{path}: {seconds} s is very short (meant for tests)")

    def ipsec_set(self, name: str, t: dict[str, Any]) -> IpsecTransformSet | None:
        path = f"ipsec_transform_set.{name}"
        self.keys(
            t,
            path,
            (
                "esp",
                "esn",
                "pfs",
                "mode",
                "lifetime_seconds",
                "lifetime_bytes",
                "lifetime_packets",
                "rekey",
            ),
        )
        n = len(self.errors)
        esp = self.choice(t, "esp", path, ESP_ENCRYPTIONS, "aes-gcm-256")
        esn = self.boolean(t, "esn", path, False)
        pfs_raw = t.get("pfs", "none")
        pfs: int | None = None
        if pfs_raw != "none":
            if isinstance(pfs_raw, bool) or pfs_raw not in DH_GROUPS:
                self.err(
                    f"{path}.pfs",
                    f"{pfs_raw!r} is not 'none' or a DH group ({', '.join(map(str, DH_GROUPS))})",
                )
            else:
                pfs = int(pfs_raw)
        mode = self.choice(t, "mode", path, MODES, "tunnel")
        secs = self.integer(t, "lifetime_seconds", path, 3600, lo=MIN_LIFETIME, hi=MAX_LIFETIME)
        self._short_lifetime(f"{path}.lifetime_seconds", secs)
        nbytes = self.integer(t, "lifetime_bytes", path, None, lo=1, hi=MAX_VOLUME)
        npkts = self.integer(t, "lifetime_packets", path, None, lo=1, hi=MAX_VOLUME)
        rekey = self.choice(t, "rekey", path, REKEY_POLICIES, "keepalive")
        if len(self.errors) > n:
            return None
        return IpsecTransformSet(name, esp, esn, pfs, mode, secs, nbytes, npkts, rekey)

    def gateway(self, v: Any) -> Gateway | None:
        if v is _MISSING:
            self.err("gateway", "missing (required: local_addresses)")
            return None
        t = self.table(v, "gateway")
        if t is None:
            return None
        path = "gateway"
        self.keys(
            t,
            path,
            ("local_addresses", "management_interface", "control_socket", "ike_port", "natt_port",
             "datapath", "mss_clamp", "offload", "on_stop"),
        )  # fmt: skip
        n = len(self.errors)
        listed = self.str_list(t, "local_addresses", path, required=True)
        raw = listed or ()
        addrs = [self.address(a, f"{path}.local_addresses[{i}]") for i, a in enumerate(raw)]
        if listed == () and "local_addresses" in t:
            self.err(f"{path}.local_addresses", "empty: at least one address is needed")
        mgmt = self.string(t, "management_interface", path)
        if mgmt is not None and (bad := interface_name_problem(mgmt)) is not None:
            self.err(f"{path}.management_interface", bad)
        sock = self.string(t, "control_socket", path, str(DEFAULT_CONTROL_SOCKET))
        if (bad := control_socket_problem(Path(sock))) is not None:
            self.err(f"{path}.control_socket", bad)
        ike_port = self.integer(t, "ike_port", path, 500, lo=1, hi=65535)
        natt_port = self.integer(t, "natt_port", path, 4500, lo=1, hi=65535)
        if len(self.errors) > n:
            return None
        # After the check: a bad value is reported, the crypto maps still get addresses.
        datapath = self.choice(t, "datapath", path, DATAPATHS, "single")
        mss_clamp = t.get("mss_clamp", True)
        if not isinstance(mss_clamp, bool) and (
            not isinstance(mss_clamp, int) or not 536 <= mss_clamp <= 65495
        ):
            self.err(f"{path}.mss_clamp", f"{mss_clamp!r} is not true, false or 536..65495")
            mss_clamp = True
        offload = self.boolean(t, "offload", path, True)
        on_stop = self.choice(t, "on_stop", path, ON_STOP, "block")
        return Gateway(
            tuple(a for a in addrs if a is not None), mgmt, Path(sock), ike_port, natt_port,
            datapath, mss_clamp, offload, on_stop=on_stop,
        )  # fmt: skip

    def metrics(self, v: Any) -> Metrics | None:
        """``listen = "HOST:PORT"`` (IPv6 as ``[::1]:9754``); loopback only unless
        ``allow_remote = true``: the figures tell who talks to whom and when."""
        if v is _MISSING:
            return None
        t = self.table(v, "metrics")
        if t is None:
            return None
        self.keys(t, "metrics", ("listen", "allow_remote"))
        allow_remote = self.boolean(t, "allow_remote", "metrics", False)
        listen = self.required(t, "listen", "metrics")
        if listen is _MISSING:
            return None
        if not isinstance(listen, str):
            self.err("metrics.listen", f"must be a string HOST:PORT, not {_tname(listen)}")
            return None
        host, sep, port_text = listen.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        host = host[1:-1] if bracketed else host
        try:
            addr = ipaddress.ip_address(host)
            port = int(port_text)
        except ValueError:
            addr, port = None, -1
        if addr is not None and addr.version == 6 and not bracketed:
            addr = None  # "::1:9754" is ambiguous: IPv6 needs [brackets]
        if not sep or addr is None or not 1 <= port <= 65535:
            self.err("metrics.listen", f"{listen!r} is not ADDRESS:PORT (e.g. 127.0.0.1:9754)")
            return None
        if not addr.is_loopback and not allow_remote:
            self.err(
                "metrics.listen",
                f"{host} is not a loopback address; set allow_remote = true to serve "
                "metrics beyond this host",
            )
            return None
        return Metrics(str(addr), port, allow_remote)

    def identity(self, v: Any, path: str, default: IPAddress) -> Identity | None:
        if v is _MISSING:
            return Identity("ipv4" if default.version == 4 else "ipv6", str(default))
        if isinstance(v, str):
            t: dict[str, Any] | None = {"value": v}
        else:
            t = self.table(v, path)
        if t is None:
            return None
        self.keys(t, path, ("type", "value"))
        value = self.string(t, "value", path)
        if value is None:
            if "value" not in t:
                self.err(f"{path}.value", "missing (required)")
            return None
        guessed = _guess_id_type(value)
        typ = self.choice(t, "type", path, ID_TYPES, guessed)
        if typ in ("ipv4", "ipv6"):
            try:
                ip = ipaddress.ip_address(value)
            except ValueError:
                self.err(f"{path}.value", f"{value!r} is not an IP address (type {typ})")
                return None
            if f"ipv{ip.version}" != typ:
                self.err(f"{path}.value", f"{value!r} is not an {typ} address")
                return None
        elif typ == "email" and "@" not in value:
            self.err(f"{path}.value", f"{value!r} is not an email address (type email)")
            return None
        return Identity(typ, value)

    def set_refs(
        self, t: Mapping[str, Any], kind: str, path: str, known: set[str]
    ) -> tuple[str, ...]:
        """A crypto map's ``<kind>s`` list: names that exist; absent means ("default",)."""
        key = f"{kind}s"
        names = self.str_list(t, key, path) or ("default",)
        if t.get(key) == []:
            self.err(f"{path}.{key}", "empty: name at least one (or leave the key out)")
        for i, name in enumerate(names):
            if name not in known:
                self.err(f"{path}.{key}[{i}]", f"no {kind} named {name!r}")
        return names

    def psk(self, v: Any, path: str) -> Secret | None:
        if isinstance(v, str):
            # Do not echo the value: it is probably the key.
            self.err(path, 'inline keys are not allowed; use { file = "/path" } or { env = "VAR" }')
            return None
        t = self.table(v, path)
        if t is None:
            return None
        self.keys(t, path, ("file", "env"))
        f = self.string(t, "file", path)
        e = self.string(t, "env", path)
        if (f is None) == (e is None):
            self.err(path, 'give exactly one of file = "/path" or env = "VAR"')
            return None
        src = SecretSource(file=(self.base_dir / f) if f else None, env=e)
        try:
            secret, warnings = load_secret(src, self.environ)
        except (SecretError, ValueError) as exc:  # ValueError: a NUL in the name
            self.err(f"{path}.{'file' if f else 'env'}", str(exc))
            return None
        self.warnings.extend(f"{path}.file: {w}" for w in warnings)
        return secret

    def crypto_map(
        self,
        name: str,
        t: dict[str, Any],
        acls: Mapping[str, AccessList],
        ikes: Mapping[str, IkeTransformSet],
        ipsecs: Mapping[str, IpsecTransformSet],
        gw: Gateway | None,
        acl_names: set[str],
    ) -> CryptoMap | None:
        path = f"crypto_map.{name}"
        self.keys(
            t,
            path,
            (
                "peer", "local_address", "match_address", "local_id", "remote_id",
                "local_psk", "remote_psk", "ike_transform_sets", "ipsec_transform_sets",
                "src_ip", "role", "retransmission_timeout", "max_retransmission", "dpd",
                "first_packet", "queue_size", "encapsulation", "initial_contact",
                "nat_keepalive", "peers", "preempt", "on_unreachable",
            ),
        )  # fmt: skip
        n = len(self.errors)
        peers = self.peer_list(t, path)
        if peers is not None:
            peer = peers[0] if peers else None
        else:
            peer_raw = self.required(t, "peer", path)
            peer = self.address(peer_raw, f"{path}.peer") if peer_raw is not _MISSING else None

        local: IPAddress | None = None
        if "local_address" in t:
            local = self.address(t["local_address"], f"{path}.local_address")
            if local is not None and gw is not None and local not in gw.local_addresses:
                self.err(f"{path}.local_address", f"{local} is not one of gateway.local_addresses")
        elif peer is not None and gw is not None:
            same = [a for a in gw.local_addresses if a.version == peer.version]
            if same:
                local = same[0]
        if peer is not None and gw is not None and local is None and "local_address" not in t:
            self.err(
                f"{path}.peer",
                f"IPv{peer.version} peer, but gateway.local_addresses has no "
                f"IPv{peer.version} address",
            )
        if peer is not None and local is not None and peer.version != local.version:
            self.err(
                f"{path}.peer",
                f"IPv{peer.version} peer but local address {local} is IPv{local.version}",
            )
        for p in (peers or [])[1:]:
            if local is not None and p.version != local.version:
                self.err(f"{path}.peers", f"IPv{p.version} peer {p} but local address {local} "
                         f"is IPv{local.version}")  # fmt: skip

        acl = self.string(t, "match_address", path)
        if acl is None and "match_address" not in t:
            self.err(f"{path}.match_address", "missing (required: the name of an access_list)")
        elif acl is not None and acl not in acl_names:
            self.err(f"{path}.match_address", f"no access_list named {acl!r}")

        ike_sets = self.set_refs(t, "ike_transform_set", path, set(ikes) | self.declared_ike)
        ipsec_sets = self.set_refs(
            t, "ipsec_transform_set", path, set(ipsecs) | self.declared_ipsec
        )
        modes = {ipsecs[s].mode if s in ipsecs else "tunnel" for s in ipsec_sets}
        if len(modes) > 1:
            self.err(
                f"{path}.ipsec_transform_sets",
                "mixes tunnel and transport mode; use one mode per crypto map",
            )
        mode = modes.pop() if len(modes) == 1 else "tunnel"

        role = self.choice(t, "role", path, ROLES, "initiator")
        src_ip: IPAddress | None = None
        if "src_ip" in t:
            src_ip = self.address(t["src_ip"], f"{path}.src_ip")
            if src_ip is not None and peer is not None and src_ip.version != peer.version:
                # Reference limitation: the inner family follows the tunnel endpoints.
                self.warnings.append(
                    f"{path}.src_ip: IPv{src_ip.version} inside an IPv{peer.version} tunnel"
                )
            if mode == "transport":
                self.warnings.append(
                    f"{path}.src_ip: ignored in transport mode (the local address is the source)"
                )
        elif mode == "tunnel" and role == "initiator":
            self.err(
                f"{path}.src_ip",
                "missing: tunnel mode needs src_ip "
                "(the inner source address of the protected traffic)",
            )

        local_psk_raw = self.required(t, "local_psk", path)
        local_psk = (
            self.psk(local_psk_raw, f"{path}.local_psk") if local_psk_raw is not _MISSING else None
        )
        remote_psk = (
            self.psk(t["remote_psk"], f"{path}.remote_psk") if "remote_psk" in t else local_psk
        )
        local_id = (
            self.identity(t.get("local_id", _MISSING), f"{path}.local_id", local) if local else None
        )
        remote_id = (
            self.identity(t.get("remote_id", _MISSING), f"{path}.remote_id", peer) if peer else None
        )

        rto = self.integer(t, "retransmission_timeout", path, 2000, lo=100, hi=600_000)
        maxr = self.integer(t, "max_retransmission", path, 3, lo=0, hi=MAX_RETRIES)
        dpd = Dpd()
        if "dpd" in t:
            dt = self.table(t["dpd"], f"{path}.dpd")
            if dt is not None:
                self.keys(dt, f"{path}.dpd", ("interval", "timeout", "retries"))
                dpd = Dpd(
                    self.number(dt, "interval", f"{path}.dpd", 30.0, lo=MIN_TIMER, off=True),
                    self.number(
                        dt, "timeout", f"{path}.dpd", 10.0, lo=MIN_TIMER, hi=MAX_DPD_TIMEOUT
                    ),
                    self.integer(dt, "retries", f"{path}.dpd", 3, lo=0, hi=MAX_RETRIES),
                )
        first = self.choice(t, "first_packet", path, FIRST_PACKET, "drop")
        qsize = self.integer(t, "queue_size", path, 8, lo=1, hi=1024)
        if "queue_size" in t and first != "queue":
            self.warnings.append(f'{path}.queue_size: ignored unless first_packet = "queue"')
        encap = self.choice(t, "encapsulation", path, ENCAPSULATIONS, "auto")
        ic = self.boolean(t, "initial_contact", path, True)
        keepalive = self.number(t, "nat_keepalive", path, 20.0, lo=MIN_TIMER, off=True)
        preempt = self.boolean(t, "preempt", path, True)
        on_unreachable = self.choice(t, "on_unreachable", path, ON_UNREACHABLE, "icmp")
        if len(self.errors) > n:
            return None
        if None in (peer, local, acl, local_psk, remote_psk, local_id, remote_id):
            # Only when another section is broken (no valid [gateway]: no local
            # address to pick); that section's error says what to fix.
            if not self.errors:
                self.err(path, "incomplete (peer, local address, match_address or PSK missing)")
            return None
        assert peer is not None and local is not None and acl is not None  # for mypy
        assert local_psk is not None and remote_psk is not None
        assert local_id is not None and remote_id is not None
        return CryptoMap(
            name=name, peer=peer, local_address=local, match_address=acl,
            local_id=local_id, remote_id=remote_id, local_psk=local_psk, remote_psk=remote_psk,
            ike_transform_sets=ike_sets, ipsec_transform_sets=ipsec_sets, mode=mode,
            src_ip=src_ip, role=role, retransmission_timeout_ms=rto, max_retransmission=maxr,
            dpd=dpd, first_packet=first, queue_size=qsize, encapsulation=encap, initial_contact=ic,
            nat_keepalive=keepalive, peers=tuple(peers or (peer,)), preempt=preempt,
            on_unreachable=on_unreachable,
        )  # fmt: skip

    def peer_list(self, t: Mapping[str, Any], path: str) -> list[IPAddress] | None:
        """``peers = ["A", "B"]``: addresses in order of preference (None: not given)."""
        if "peers" not in t:
            return None
        if "peer" in t:
            self.err(f"{path}.peers", "give either peer or peers, not both")
        raw = t["peers"]
        if not isinstance(raw, list) or not raw:
            self.err(f"{path}.peers", "expected a non-empty list of IP addresses")
            return []
        out: list[IPAddress] = []
        for i, v in enumerate(raw):
            addr = self.address(v, f"{path}.peers[{i}]")
            if addr is None:
                continue
            if addr in out:
                self.err(f"{path}.peers[{i}]", f"{addr} is listed twice")
                continue
            out.append(addr)
        return out

    def tuns(self, v: Any, map_names: set[str]) -> list[TunInterface]:
        entries: list[tuple[str, str | None, dict[str, Any]]] = []
        if v is _MISSING:
            return []
        if isinstance(v, list):
            for i, body in enumerate(v):
                t = self.table(body, f"tun[{i}]")
                if t is not None:
                    entries.append((f"tun[{i}]", None, t))
        elif isinstance(v, dict):
            for name, body in v.items():
                t = self.table(body, f"tun.{name}")
                if t is not None:
                    entries.append((f"tun.{name}", name, t))
        else:
            self.err("tun", f"expected [tun.NAME] tables or [[tun]] entries, got {_tname(v)}")
            return []
        out: list[TunInterface] = []
        seen: dict[str, str] = {}
        bound_to: dict[str, str] = {}
        for path, key_name, t in entries:
            allowed = ("addresses", "mtu", "crypto_maps", "routes")
            self.keys(t, path, allowed if key_name else ("name", *allowed))
            n = len(self.errors)
            name = key_name or self.string(t, "name", path)
            if name is None:
                if "name" not in t:
                    self.err(f"{path}.name", "missing (required in [[tun]] entries)")
                continue
            if len(name) > 15:
                self.err(
                    path if key_name else f"{path}.name",
                    f"interface name {name!r} is longer than 15 characters",
                )
            elif (bad := interface_name_problem(name)) is not None:
                self.err(path if key_name else f"{path}.name", bad)
            if name in seen:
                self.err(path, f"tun {name!r} is defined twice (also at {seen[name]})")
            seen[name] = path
            addrs: list[IPInterface] = []
            for i, a in enumerate(self.str_list(t, "addresses", path) or ()):
                try:
                    addrs.append(ipaddress.ip_interface(a))
                except ValueError:
                    self.err(
                        f"{path}.addresses[{i}]",
                        f"{a!r} is not an address with prefix (e.g. 192.0.2.1/32)",
                    )
            routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
            for i, r in enumerate(self.str_list(t, "routes", path) or ()):
                try:
                    routes.append(ipaddress.ip_network(r))
                except ValueError:
                    self.err(
                        f"{path}.routes[{i}]", f"{r!r} is not a network (e.g. 203.0.113.49/32)"
                    )
            mtu = self.integer(t, "mtu", path, 1400, lo=576, hi=65535)
            maps = self.str_list(t, "crypto_maps", path) or ()
            for i, m in enumerate(maps):
                if m not in map_names:
                    self.err(f"{path}.crypto_maps[{i}]", f"no crypto_map named {m!r}")
                elif m in bound_to:
                    # One TUN per crypto map: decrypted packets need one way back.
                    self.err(
                        f"{path}.crypto_maps[{i}]", f"{m!r} is already bound to tun {bound_to[m]!r}"
                    )
                else:
                    bound_to[m] = name
            if len(self.errors) == n:
                out.append(TunInterface(name, tuple(addrs), mtu, maps, tuple(routes)))
        return out


def _guess_id_type(value: str) -> str:
    try:
        return f"ipv{ipaddress.ip_address(value).version}"
    except ValueError:
        return "email" if "@" in value else "fqdn"


def format_diagnosis(path: str | Path, d: ConfigDiagnosis) -> str:
    """``ipsecmgr check-config`` output: errors, then warnings, then a verdict line."""
    lines = [f"error: {e}" for e in d.errors] + [f"warning: {w}" for w in d.warnings]
    if d.errors:
        lines.append(f"{path}: {len(d.errors)} error(s), {len(d.warnings)} warning(s)")
    else:
        lines.append(f"{path}: OK ({len(d.warnings)} warning(s))")
    return "\n".join(lines)
