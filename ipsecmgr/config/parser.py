"""The sections of a configuration document, validated into :mod:`.model` objects."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ipsecmgr.config.crypto_map import parse_crypto_map
from ipsecmgr.config.getters import _MISSING, Getters, _tname
from ipsecmgr.config.model import (
    DATAPATHS,
    DEFAULT_CONTROL_SOCKET,
    DH_GROUPS,
    ESP_ENCRYPTIONS,
    IKE_ENCRYPTIONS,
    INTEGRITIES,
    MAX_LIFETIME,
    MAX_VOLUME,
    MIN_LIFETIME,
    MODES,
    ON_STOP,
    PRFS,
    REKEY_POLICIES,
    AccessList,
    Config,
    CryptoMap,
    Gateway,
    IkeTransformSet,
    IPInterface,
    IpsecTransformSet,
    Metrics,
    TunInterface,
)
from ipsecmgr.config_checks import (
    compile_acl,
    control_socket_problem,
    interface_name_problem,
    shadow_warnings,
)
from ipsecmgr.tls.config import TlsMap, overlap_errors, parse_tls_map

_SECTIONS = (
    "access_list", "ike_transform_set", "ipsec_transform_set", "crypto_map", "tun", "gateway",
    "metrics", "tls_map",
)  # fmt: skip


class _Parser(Getters):
    # --- sections

    def parse(self, data: Mapping[str, Any]) -> Config | None:
        self.keys(data, "", _SECTIONS)
        sections = {
            k: self.named_section(data, k)
            for k in ("access_list", "ike_transform_set", "ipsec_transform_set", "crypto_map")
        }
        self.declared_ike = set(sections["ike_transform_set"])
        self.declared_ipsec = set(sections["ipsec_transform_set"])
        acls, ikes, ipsecs = self._named_sets(sections)
        # A crypto map without transform-set lists uses "default" (the dataclass
        # defaults); a [..._transform_set.default] table overrides it.
        ikes.setdefault("default", IkeTransformSet("default"))
        ipsecs.setdefault("default", IpsecTransformSet("default"))
        gw = self.gateway(data.get("gateway", _MISSING))
        maps: dict[str, CryptoMap] = {}
        acl_names = set(sections["access_list"])  # once: per map it would be O(maps x ACLs)
        for n, t in sections["crypto_map"].items():
            cm = parse_crypto_map(self, n, t, ikes, ipsecs, gw, acl_names)
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
        self._unused_acls(acls, maps, tls_maps)
        metrics = self.metrics(data.get("metrics", _MISSING))
        if self.errors or gw is None:
            return None
        return Config(
            MappingProxyType(acls), MappingProxyType(ikes), MappingProxyType(ipsecs),
            MappingProxyType(maps), tuple(tuns), gw, tuple(self.warnings),
            metrics=metrics, tls_maps=MappingProxyType(tls_maps),
            compiled_acls=MappingProxyType(self.compiled_acls),
        )  # fmt: skip

    def _named_sets(
        self, sections: Mapping[str, dict[str, dict[str, Any]]]
    ) -> tuple[dict[str, AccessList], dict[str, IkeTransformSet], dict[str, IpsecTransformSet]]:
        """The valid access lists and transform sets, by name."""
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
        return acls, ikes, ipsecs

    def _unused_acls(
        self,
        acls: Mapping[str, AccessList],
        maps: Mapping[str, CryptoMap],
        tls_maps: Mapping[str, TlsMap],
    ) -> None:
        used = {cm.match_address for cm in maps.values()}  # a set: not O(ACLs x maps)
        used.update(tm.match_address for tm in tls_maps.values())
        for n in acls:
            if n not in used:
                self.warnings.append(f"access_list.{n}: not used by any crypto map")

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
        compiled = compile_acl(name, rules)
        if compiled is not None:
            self.compiled_acls[name] = compiled
        self.warnings.extend(f"{path}.rules: {w}" for w in shadow_warnings(compiled))
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

    def tuns(self, v: Any, map_names: set[str]) -> list[TunInterface]:
        entries = self._tun_entries(v)
        out: list[TunInterface] = []
        seen: dict[str, str] = {}
        bound_to: dict[str, str] = {}  # crypto map -> its TUN
        for path, key_name, t in entries:
            tun = self._tun(path, key_name, t, map_names, seen, bound_to)
            if tun is not None:
                out.append(tun)
        return out

    def _tun_entries(self, v: Any) -> list[tuple[str, str | None, dict[str, Any]]]:
        """(path, name from the key or None, table) of ``[tun.NAME]`` or ``[[tun]]``."""
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
        return entries

    def _tun(
        self,
        path: str,
        key_name: str | None,
        t: dict[str, Any],
        map_names: set[str],
        seen: dict[str, str],
        bound_to: dict[str, str],
    ) -> TunInterface | None:
        allowed = ("addresses", "mtu", "crypto_maps", "routes")
        self.keys(t, path, allowed if key_name else ("name", *allowed))
        n = len(self.errors)
        name = key_name or self.string(t, "name", path)
        if name is None:
            if "name" not in t:
                self.err(f"{path}.name", "missing (required in [[tun]] entries)")
            return None
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
        addrs, routes = self._tun_networks(t, path)
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
        if len(self.errors) > n:
            return None
        return TunInterface(name, tuple(addrs), mtu, maps, tuple(routes))

    def _tun_networks(
        self, t: dict[str, Any], path: str
    ) -> tuple[list[IPInterface], list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
        """A TUN's ``addresses`` (with prefix) and ``routes`` (networks)."""
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
                self.err(f"{path}.routes[{i}]", f"{r!r} is not a network (e.g. 203.0.113.49/32)")
        return addrs, routes
