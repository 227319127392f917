"""``[tls_map.NAME]``: TACACS+ flows protected by TLS 1.3 (RFC 9887) instead of ESP.

Why a section of its own rather than ``protection = "tls"`` on a crypto map: a
crypto map's required keys (peer, PSKs, IKE and IPsec transform sets, mode) mean
nothing for TLS, and a TLS map's (servers, CA, client certificate, downstream
secret) mean nothing for IKE. One section kind with two disjoint sets of keys
would need "required unless" rules for half its keys and would let a typo in
``protection`` silently turn a TLS map into an IPsec one. Two sections share
what they really share, the access list (``match_address``)::

    [access_list.tls-b]
    rules = ["permit tcp any host 203.0.113.49 eq 49"]

    [tls_map.b]
    match_address = "tls-b"
    servers = [
        { address = "203.0.113.49", name = "tacacs-b.example" },   # priority 1
        { address = "203.0.113.50", port = 300 },                   # priority 2
    ]
    ca_file = "/etc/ipsecmgr/tls/ca.crt"
    client_cert = "/etc/ipsecmgr/tls/client.crt"
    client_key = "/etc/ipsecmgr/tls/client.key"          # mode 0600 or 0400
    downstream_secret = { file = "/etc/ipsecmgr/tacacs-secret" }
    listen = "127.0.0.1:9049"                             # optional

The access list's permit lines name the captured destinations: each must be a
single host (``host A.B.C.D``), TCP or ``ip``, with at most one destination port
(default 49). Paths are relative to the config file's directory.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ipsecmgr.secret import Secret
from ipsecmgr.tls.files import check_key_file, check_readable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

TLS_PORT = 300  # RFC 9887 §3.1: the "tacacss" port
TACACS_PORT = 49
TCP = 6

TLS_MAP_KEYS = (
    "match_address", "servers", "ca_file", "client_cert", "client_key", "downstream_secret",
    "listen", "transparent", "connect_timeout", "handshake_timeout", "hold_down",
    "hold_down_max", "idle_timeout", "response_timeout", "keylog_file", "psk_file",
)  # fmt: skip
SERVER_KEYS = ("address", "port", "name")


@dataclass(frozen=True)
class TlsServer:
    """One upstream server; its position in ``servers`` is its priority (first = 1)."""

    address: IPAddress
    port: int = TLS_PORT
    # The identity checked in its certificate: a DNS name or an IP address (RFC 9887
    # §3.4, RFC 9525 DNS-ID or IP-ID). Default: the address, matched as an IP SAN.
    name: str | None = None

    @property
    def identity(self) -> str:
        return self.name if self.name is not None else str(self.address)

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class TlsMap:
    name: str
    match_address: str
    servers: tuple[TlsServer, ...]
    ca_file: Path
    client_cert: Path
    client_key: Path
    downstream_secret: Secret = field(repr=False)
    # Destinations captured transparently: (server address, TACACS+ port) from the ACL.
    capture: tuple[tuple[IPAddress, int], ...] = ()
    listen: tuple[IPAddress, int] | None = None
    transparent: bool = True
    connect_timeout: float = 3.0
    handshake_timeout: float = 5.0
    hold_down: float = 10.0  # first hold-down of a failed server; doubles per failure
    hold_down_max: float = 300.0
    idle_timeout: float = 60.0  # a silent client connection is closed after this
    keylog_file: Path | None = None  # SSLKEYLOGFILE export, only when configured
    # A server that took the request but has not answered after this is failed
    # (the next one gets a session's first packet; clients wait ~5-10 s at most).
    response_timeout: float = 5.0


class ParserLike(Protocol):
    """The getters of :class:`ipsecmgr.config.getters.Getters` this module uses."""

    base_dir: Path

    def err(self, path: str, msg: str) -> None: ...
    def keys(self, t: Mapping[str, Any], path: str, allowed: tuple[str, ...]) -> None: ...
    def string(self, t: Mapping[str, Any], key: str, path: str, default: Any = None) -> Any: ...
    def number(self, t: Mapping[str, Any], key: str, path: str, default: float) -> float: ...
    def boolean(self, t: Mapping[str, Any], key: str, path: str, default: bool) -> bool: ...
    def psk(self, v: Any, path: str) -> Secret | None: ...


def parse_tls_map(
    p: ParserLike, name: str, t: Mapping[str, Any], acls: Mapping[str, tuple[str, ...]]
) -> TlsMap | None:
    """Validate one ``[tls_map.NAME]``; errors go to ``p.err``. ``acls``: name -> rules."""
    path = f"tls_map.{name}"
    n_errors = len(_errors_of(p))
    p.keys(t, path, TLS_MAP_KEYS)
    if "psk_file" in t:
        # RFC 9887 allows TLS external PSK (optional). Python 3.11's ssl module has no
        # external-PSK API (3.13 adds it), and pyOpenSSL (26.4.0, checked) has no
        # PSK callbacks: refuse rather than silently fall back to certificates.
        p.err(
            f"{path}.psk_file",
            "TLS external PSK is not supported (Python 3.11's ssl module and pyOpenSSL "
            "have no PSK API); use ca_file + client_cert + client_key",
        )
    match = p.string(t, "match_address", path)
    if match is None:
        p.err(f"{path}.match_address", "missing (required)")
    elif match not in acls:
        p.err(f"{path}.match_address", f"no access_list named {match!r}")
    capture = _capture(p, path, match, acls) if match in acls else ()
    servers = _servers(p, path, t.get("servers"))
    files = _files(p, path, t)
    secret = None
    if "downstream_secret" not in t:
        p.err(f"{path}.downstream_secret", 'missing (required): { file = "/path" }')
    else:
        secret = p.psk(t["downstream_secret"], f"{path}.downstream_secret")
    listen = _listen(p, path, t)
    transparent = p.boolean(t, "transparent", path, True)
    if not transparent and listen is None:
        p.err(path, "transparent = false needs a listen address (no client could reach it)")
    timeouts = _timeouts(p, path, t)
    keylog = p.string(t, "keylog_file", path)
    if len(_errors_of(p)) == n_errors:
        _check_loadable(p, path, files)
    if len(_errors_of(p)) != n_errors or secret is None or match is None:
        return None
    assert files["ca_file"] and files["client_cert"] and files["client_key"]
    return TlsMap(
        name, match, servers, files["ca_file"], files["client_cert"], files["client_key"],
        secret, capture, listen, transparent, timeouts["connect_timeout"],
        timeouts["handshake_timeout"], timeouts["hold_down"], timeouts["hold_down_max"],
        timeouts["idle_timeout"], (p.base_dir / keylog) if keylog else None,
        timeouts["response_timeout"],
    )  # fmt: skip


def _files(p: ParserLike, path: str, t: Mapping[str, Any]) -> dict[str, Path | None]:
    """``ca_file``, ``client_cert``, ``client_key``: relative to the config, checked."""
    files: dict[str, Path | None] = {}
    for key in ("ca_file", "client_cert", "client_key"):
        v = p.string(t, key, path)
        if v is None:
            p.err(f"{path}.{key}", "missing (required)")
            files[key] = None
            continue
        f = p.base_dir / v
        problems = check_key_file(f) if key == "client_key" else check_readable(f)
        for msg in problems:
            p.err(f"{path}.{key}", msg)
        files[key] = f
    return files


def _listen(p: ParserLike, path: str, t: Mapping[str, Any]) -> tuple[IPAddress, int] | None:
    listen = None
    lv = p.string(t, "listen", path)
    if lv is not None:
        listen = _host_port(lv)
        if listen is None:
            p.err(f"{path}.listen", f"{lv!r} is not ADDRESS:PORT (e.g. '127.0.0.1:9049')")
    return listen


def _timeouts(p: ParserLike, path: str, t: Mapping[str, Any]) -> dict[str, float]:
    timeouts = {
        k: p.number(t, k, path, d)
        for k, d in (
            ("connect_timeout", 3.0), ("handshake_timeout", 5.0), ("hold_down", 10.0),
            ("hold_down_max", 300.0), ("idle_timeout", 60.0), ("response_timeout", 5.0),
        )
    }  # fmt: skip
    for k in ("connect_timeout", "handshake_timeout", "idle_timeout", "response_timeout"):
        if k in t and timeouts[k] == 0:
            p.err(f"{path}.{k}", "must be greater than 0")
    if timeouts["hold_down_max"] < timeouts["hold_down"]:
        p.err(f"{path}.hold_down_max", "must be at least hold_down")
    return timeouts


def overlap_errors(maps: Mapping[str, TlsMap]) -> list[str]:
    """Two TLS maps capturing the same server address and port (or listening on the
    same address): the second could never receive a connection."""
    seen: dict[tuple[str, IPAddress, int], str] = {}
    errors = []
    for name, m in maps.items():
        keys = [("capture", a, p) for a, p in m.capture] if m.transparent else []
        keys += [("listen", *m.listen)] if m.listen is not None else []
        for key in keys:
            other = seen.setdefault(key, name)
            if other != name:
                errors.append(
                    f"tls_map.{name}: {key[0]} {key[1]}:{key[2]} is already tls_map.{other}'s"
                )
    return errors


def _check_loadable(p: ParserLike, path: str, files: Mapping[str, Path | None]) -> None:
    """Load the CA, certificate and key the way the relay will (check-config reports
    a bad PEM or a key that does not match the certificate, not the first login)."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cafile=str(files["ca_file"]))
    except (ssl.SSLError, OSError) as e:
        p.err(f"{path}.ca_file", f"not a usable CA certificate file: {_reason(e)}")
    try:
        ctx.load_cert_chain(str(files["client_cert"]), str(files["client_key"]))
    except (ssl.SSLError, OSError) as e:
        # Never echo the key: OpenSSL's reason names the problem, not the content.
        p.err(f"{path}.client_cert", f"certificate and key do not load together: {_reason(e)}")


def _reason(e: OSError) -> str:
    return str(getattr(e, "reason", None) or e.strerror or e)


def _errors_of(p: ParserLike) -> list[str]:
    errors: list[str] = getattr(p, "errors", [])
    return errors


def _host_port(v: str) -> tuple[IPAddress, int] | None:
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    try:
        return ipaddress.ip_address(host.strip("[]")), int(port)
    except ValueError:
        return None


def _servers(p: ParserLike, path: str, v: Any) -> tuple[TlsServer, ...]:
    path = f"{path}.servers"
    if v is None:
        p.err(path, "missing (required): a list of { address = ..., port = 300, name = ... }")
        return ()
    if not isinstance(v, list) or not v:
        p.err(path, "expected a non-empty list of tables, in priority order")
        return ()
    out = []
    for i, item in enumerate(v):
        ip = f"{path}[{i}]"
        if not isinstance(item, dict):
            p.err(ip, "expected a table { address = ..., port = ..., name = ... }")
            continue
        p.keys(item, ip, SERVER_KEYS)
        addr = p.string(item, "address", ip)
        if addr is None:
            p.err(f"{ip}.address", "missing (required)")
            continue
        try:
            address = ipaddress.ip_address(addr)
        except ValueError:
            p.err(f"{ip}.address", f"{addr!r} is not an IP address")
            continue
        port = item.get("port", TLS_PORT)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            p.err(f"{ip}.port", f"expected a port number 1..65535, got {port!r}")
            continue
        out.append(TlsServer(address, port, p.string(item, "name", ip)))
    return tuple(out)


def _capture(
    p: ParserLike, path: str, acl_name: str, acls: Mapping[str, tuple[str, ...]]
) -> tuple[tuple[IPAddress, int], ...]:
    """The (address, port) pairs the ACL's permit lines select."""
    # Imported here: ipsecmgr.config imports this module, and scripts run from
    # tools/bench/ (which has an npusim.py of its own first on sys.path) import
    # ipsecmgr.config without needing the ACL parser.
    import npusim

    try:
        acl = npusim.parse_acl(acl_name, list(acls[acl_name]))
    except npusim.AclSyntaxError:
        return ()  # reported under access_list.NAME.rules
    out: list[tuple[IPAddress, int]] = []
    for rule in acl.rules:
        if not rule.permit:
            continue
        full = (1 << (32 if rule.version == 4 else 128)) - 1
        where = f"{path}.match_address"
        if rule.dst_mask != full:
            p.err(where, f"{rule.text.strip()!r}: a TLS map captures single hosts (use 'host')")
            continue
        if rule.protocol not in (TCP, npusim.acl.ANY_PROTOCOL):
            p.err(where, f"{rule.text.strip()!r}: TACACS+ is TCP; use 'tcp' or 'ip'")
            continue
        port = TACACS_PORT
        if rule.dst_ports is not None:
            if len(rule.dst_ports) != 1 or rule.dst_ports[0][0] != rule.dst_ports[0][1]:
                p.err(where, f"{rule.text.strip()!r}: at most one destination port ('eq 49')")
                continue
            port = rule.dst_ports[0][0]
        address = (
            ipaddress.ip_address(rule.dst) if rule.version == 4 else ipaddress.IPv6Address(rule.dst)
        )
        if (address, port) not in out:
            out.append((address, port))
    if not out:
        p.err(f"{path}.match_address", f"access_list {acl_name!r} permits no destination")
    return tuple(out)
