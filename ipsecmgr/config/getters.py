"""The parser's typed getters: each reports a problem under its exact key path
and returns None (or the default), so that validation collects every error."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipsecmgr.config.model import (
    ID_TYPES,
    MAX_TIMER,
    AclValidator,
    Identity,
    IPAddress,
)
from ipsecmgr.secret import Secret, SecretError, SecretSource, load_secret

if TYPE_CHECKING:
    import npusim

_MISSING = object()


def _tname(v: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(v), type(v).__name__)


class Getters:
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
        # The ACLs npusim compiled (the shadowed-line check), handed on in the Config
        self.compiled_acls: dict[str, npusim.Acl] = {}

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


def _guess_id_type(value: str) -> str:
    try:
        return f"ipv{ipaddress.ip_address(value).version}"
    except ValueError:
        return "email" if "@" in value else "fqdn"
