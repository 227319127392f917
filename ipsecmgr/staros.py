"""``ipsecmgr import-staros``: a StarOS configuration in, our TOML and a report out.

The input is the reference's configuration language (``configure`` / ``context``
/ ``ip access-list`` / ``ipsec transform-set`` / ``ikev2-ikesa transform-set`` /
``crypto map NAME ikev2-ipv4`` with its ``payload`` / ``interface ...
crypto-map`` / ``tacacs mode``), and the IKEv1 lines of its transport-mode
example (``crypto ipsec transform-set``, ``crypto map NAME ipsec-ikev1``,
``ikev1 policy``, ``ikev1 keepalive dpd``), which become IKEv2 here (RFC 9395
deprecates IKEv1; RFC 7296 §1.3.1 gives IKEv2 transport mode).

Parsing follows the StarOS CLI's modes, not the indentation (the reference's
own tunnel example is indented wrongly after its first ``#exit``): a mode
command (``crypto map foo ikev2-ipv4``) enters a mode, ``#exit``/``exit``
leaves one, ``end`` leaves all. A line that the current mode does not know
but an enclosing mode does is taken as leaving the inner mode first (what a
missing ``#exit`` means). A line no mode knows opens an unknown mode, closed
by the next ``#exit`` or by the next line a known mode takes.

Every line that has no equivalent, or is mapped by a choice the operator
should review, is reported with its line number as one :class:`Note`:

* ``ignored``: nothing to configure here (``aaa tacacs+``, ``require crypto
  ... software``: this gateway is always software);
* ``decision``: mapped, but not one to one (``cipher aes-cbc-128`` becomes
  AES-GCM, ``group 2`` becomes 14, IKEv1 becomes IKEv2);
* ``action``: the operator must do something before ``check-config`` passes
  (an ``encrypted key`` cannot be decrypted: put the key into the named file);
* ``error``: not mapped; the output fails ``check-config`` until it is fixed
  (the reference's ACL line with a stray ``1`` is written as is and rejected
  by npusim naming the token: a guess would decide what leaves in clear).

Secrets: a plain-text ``pre-shared-key key K`` goes into a key file beside
the output (mode 0600), referenced from the TOML by a relative path (resolved
against the config's directory, :mod:`ipsecmgr.config`). No key or TACACS+
password is ever in the TOML, the report or a log: reported lines show
``***`` in their place.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ipsecmgr.config import DH_GROUPS, MIN_LIFETIME
from npusim import AclSyntaxError, Rule, parse_acl
from npusim.packet import PORTS_OK, PROTO_TCP

NOTE_KINDS = ("ignored", "decision", "action", "error")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Note:
    """One reported line: where, what kind, the line (secrets masked), why."""

    line: int  # 1-based line of the StarOS file (0: the file as a whole)
    kind: str  # one of NOTE_KINDS
    text: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "file"
        shown = f": {self.text}" if self.text else ""
        return f"{where} [{self.kind}]{shown}\n    {self.message}"


@dataclass(frozen=True)
class Imported:
    """What an import produced; :func:`write_import` puts it on disk."""

    toml: str
    #: key file name (beside the TOML) -> the plain-text key from the StarOS file
    keys: Mapping[str, bytes] = field(repr=False)
    #: key files the TOML names but the import could not fill (encrypted keys)
    missing_keys: tuple[str, ...]
    notes: tuple[Note, ...]

    def count(self, kind: str) -> int:
        return sum(1 for n in self.notes if n.kind == kind)


# ---------------------------------------------------------------- what was read


@dataclass
class _Key:
    line: int
    encrypted: bool
    value: str | None = field(repr=False)  # the key itself: never in a repr or traceback


@dataclass
class _Acl:
    name: str
    line: int
    rules: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class _IkeSet:
    name: str
    line: int
    ikev1: bool = False
    values: dict[str, tuple[int, str]] = field(default_factory=dict)  # key -> (line, value)


@dataclass
class _IpsecSet:
    name: str
    line: int
    ikev1: bool = False
    values: dict[str, tuple[int, str]] = field(default_factory=dict)


@dataclass
class _Payload:
    name: str
    line: int
    sets: list[str] = field(default_factory=list)
    rekey: tuple[int, str] | None = None  # (line, "keepalive" | "lazy")
    lifetime: tuple[int, int, int | None] | None = None  # (line, seconds, kilobytes)


@dataclass
class _Map:
    name: str
    line: int
    ikev1: bool
    acl: str | None = None
    peer: tuple[int, str] | None = None
    local_key: _Key | None = None
    remote_key: _Key | None = None
    max_retransmission: int | None = None
    retransmission_timeout: int | None = None
    ike_sets: list[str] = field(default_factory=list)
    payloads: list[_Payload] = field(default_factory=list)
    ipsec_sets: list[str] = field(default_factory=list)  # IKEv1 "set transform-set"
    pfs: tuple[int, str] | None = None  # IKEv1 "set pfs groupN"
    dpd: tuple[float, float, int] | None = None


@dataclass
class _Interface:
    name: str
    line: int
    addresses: list[IPAddress] = field(default_factory=list)
    maps: list[str] = field(default_factory=list)


@dataclass
class _TacacsServer:
    line: int
    address: IPAddress
    src_ip: IPAddress | None
    port: int = 49


@dataclass
class _Frame:
    kind: str
    obj: object = None


# Tokens after which a secret follows: masked in every reported line.
_SECRET_AFTER = frozenset({"key", "preshared-key", "password"})


def mask_secrets(tokens: Iterable[str]) -> str:
    """The line with the token after ``key``/``preshared-key``/``password`` as ``***``."""
    out: list[str] = []
    hide = False
    for tok in tokens:
        out.append("***" if hide else tok)
        hide = tok.lower() in _SECRET_AFTER and not hide
    return " ".join(out)


def _tokens(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=False, posix=True)
    except ValueError:  # an unbalanced quote: take the words as they are
        return line.split()


# ---------------------------------------------------------------- the reader

Handler = Callable[["_Reader", _Frame, list[str], int], None]


class _Reader:
    """StarOS CLI modes as a stack of frames; one handler table per mode."""

    def __init__(self) -> None:
        self.notes: list[Note] = []
        self.acls: dict[str, _Acl] = {}
        self.ike_sets: dict[str, _IkeSet] = {}
        self.ipsec_sets: dict[str, _IpsecSet] = {}
        self.maps: dict[str, _Map] = {}
        self.interfaces: dict[str, _Interface] = {}
        self.tacacs: list[_TacacsServer] = []
        self.ikev1_dpd: tuple[int, float, float, int] | None = None
        self.stack: list[_Frame] = [_Frame("root")]
        self.text = ""  # the current line, secrets masked
        self.line_texts: dict[int, str] = {}  # every line, secrets masked

    def note(self, line: int, kind: str, message: str, text: str | None = None) -> None:
        self.notes.append(Note(line, kind, self.text if text is None else text, message))

    def read(self, source: str) -> None:
        for lineno, raw in enumerate(source.splitlines(), start=1):
            stripped = raw.strip()
            self.line_texts[lineno] = mask_secrets(_tokens(stripped))
            if not stripped or stripped.startswith("!"):
                continue
            low = stripped.lower()
            if low in ("#exit", "exit"):
                if len(self.stack) > 1:
                    self.stack.pop()
                continue
            if low == "end":
                del self.stack[1:]
                continue
            if stripped.startswith("#"):
                continue  # a comment
            toks = _tokens(stripped)
            self.text = mask_secrets(toks)
            self.dispatch(toks, lineno)

    def dispatch(self, toks: list[str], lineno: int) -> None:
        # The current mode first, then enclosing modes (a missing "#exit").
        for depth in range(len(self.stack) - 1, -1, -1):
            handler = _find(_TABLES[self.stack[depth].kind], toks)
            if handler is not None:
                del self.stack[depth + 1 :]
                handler(self, self.stack[depth], toks, lineno)
                return
        kind = self.stack[-1].kind
        self.note(lineno, "ignored", f"not a command this importer knows (in {kind} mode)")
        # It may enter a mode of its own (``show configuration`` is full of them:
        # ``subscriber default`` ... ``#exit``); that ``#exit`` must close it, not the
        # enclosing known mode. If it was a one-line command, the next known line
        # closes the frame through the search above.
        self.push("unknown", None)

    def push(self, kind: str, obj: object) -> None:
        self.stack.append(_Frame(kind, obj))

    # --- small value readers: report and return None on a bad value

    def integer(self, tok: str | None, lineno: int, what: str, lo: int = 0) -> int | None:
        if tok is None or not _is_int(tok) or int(tok) < lo:
            self.note(lineno, "error", f"{what}: expected an integer >= {lo}, got {tok!r}")
            return None
        return int(tok)

    def address(self, tok: str | None, lineno: int, what: str) -> IPAddress | None:
        try:
            return ipaddress.ip_address(tok or "")
        except ValueError:
            self.note(lineno, "error", f"{what}: {tok!r} is not an IP address")
            return None


def _find(table: list[tuple[tuple[str, ...], Handler]], toks: list[str]) -> Handler | None:
    low = [t.lower() for t in toks]
    for prefix, handler in table:
        if tuple(low[: len(prefix)]) == prefix:
            return handler
    return None


def _is_int(tok: str) -> bool:
    # Not str.isdigit(): it accepts "²", which int() rejects.
    return tok.isascii() and tok.isdigit()


def _arg(toks: list[str], i: int) -> str | None:
    return toks[i] if i < len(toks) else None


def _after(toks: list[str], word: str) -> str | None:
    low = [t.lower() for t in toks]
    return _arg(toks, low.index(word) + 1) if word in low else None


# --- root / configure / context


def _h_configure(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    pass  # global configuration mode is the root here


def _h_context(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    name = _arg(toks, 1) or ""
    if name.lower() != "local":
        r.note(
            n, "decision",
            f"context {name!r}: the reference puts the TACACS+ crypto maps in the local "
            "context; this one's are imported into the same configuration",
        )  # fmt: skip
    r.push("context", name)


def _h_require(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    r.note(n, "ignored", "this gateway handles IKE and ESP in user space always (no equivalent)")


def _h_aaa(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    r.note(
        n, "ignored",
        "TACACS+ itself is the client's business on Linux (pam_tacplus); no equivalent here",
    )  # fmt: skip


def _h_shared_subnet(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    r.note(n, "ignored", "no equivalent: Linux routes a shared subnet as it is")


# --- ip access-list


def _h_acl(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    name = _arg(toks, 2)
    if name is None:
        r.note(n, "error", "ip access-list without a name")
        return
    acl = r.acls.setdefault(name, _Acl(name, n))
    r.push("acl", acl)


def _h_acl_rule(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    assert isinstance(f.obj, _Acl)
    f.obj.rules.append((n, " ".join(toks)))


def _h_acl_other(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    r.note(n, "ignored", "no equivalent in an access list (only permit/deny lines are kept)")


# --- transform sets


def _h_ipsec_set(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    name = _arg(toks, 2)
    if name is None:
        r.note(n, "error", "ipsec transform-set without a name")
        return
    r.push("ipsec-set", r.ipsec_sets.setdefault(name, _IpsecSet(name, n)))


def _h_ike_set(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    name = _arg(toks, 2)
    if name is None:
        r.note(n, "error", "ikev2-ikesa transform-set without a name")
        return
    r.push("ike-set", r.ike_sets.setdefault(name, _IkeSet(name, n)))


def _h_set_value(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    """``group 14``, ``cipher aes-gcm-256``, ``hmac ...``, ``prf ...``, ``lifetime N``, ``mode``."""
    assert isinstance(f.obj, _IkeSet | _IpsecSet)
    value = _arg(toks, 1)
    if value is None:
        r.note(n, "error", f"{toks[0]} without a value")
        return
    key = toks[0].lower()
    # StarOS spells the IKE SA cipher "encryption"; one key here.
    f.obj.values["cipher" if key == "encryption" else key] = (n, value.lower())


def _h_ikev1_ipsec_set(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    # crypto ipsec transform-set NAME esp hmac H cipher C
    name = _arg(toks, 3)
    if name is None:
        r.note(n, "error", "crypto ipsec transform-set without a name")
        return
    s = r.ipsec_sets.setdefault(name, _IpsecSet(name, n, ikev1=True))
    low = [t.lower() for t in toks]
    if "ah" in low:
        r.note(n, "error", "AH is not offered here (ESP only)")
    for key in ("hmac", "cipher"):
        if (v := _after(toks, key)) is not None:
            s.values[key] = (n, v.lower())
    r.push("ipsec-set", s)


def _h_ikev1_policy(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    prio = _arg(toks, 2) or "1"
    name = f"ikev1-policy-{prio}"
    r.note(
        n, "decision",
        f"IKEv1 policy {prio} becomes the IKEv2 proposal ike_transform_set.{name} "
        "(IKEv1 is deprecated, RFC 9395); the peer must run IKEv2",
    )  # fmt: skip
    r.push("ikev1-policy", r.ike_sets.setdefault(name, _IkeSet(name, n, ikev1=True)))


def _h_ikev1_policy_value(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    assert isinstance(f.obj, _IkeSet)
    key = toks[0].lower()
    value = (_arg(toks, 1) or "").lower()
    if key == "encryption":
        f.obj.values["cipher"] = (n, value)
    elif key == "hash":
        f.obj.values["prf"] = (n, value)
    elif key == "group":
        f.obj.values["group"] = (n, value)
    elif key == "lifetime":
        f.obj.values["lifetime"] = (n, value)
    elif key == "authentication" and value not in ("pre-share", "preshared-key", ""):
        r.note(n, "error", f"authentication {value}: only pre-shared keys are offered here")


def _h_ikev1_dpd(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    # ikev1 keepalive dpd interval I timeout T num-retry R
    interval = r.integer(_after(toks, "interval"), n, "interval")
    timeout = r.integer(_after(toks, "timeout") or "10", n, "timeout")
    retries = r.integer(_after(toks, "num-retry") or "3", n, "num-retry")
    if interval is not None and timeout is not None and retries is not None:
        r.ikev1_dpd = (n, float(interval), float(timeout), retries)
        r.note(n, "decision", "IKEv1 DPD: becomes IKEv2 liveness checks (RFC 7296 §2.4)")


# --- crypto map


def _h_map(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    name, kind = _arg(toks, 2), (_arg(toks, 3) or "").lower()
    if name is None:
        r.note(n, "error", "crypto map without a name")
        return
    if kind not in ("ikev2-ipv4", "ikev2-ipv6", "ipsec-ikev1"):
        r.note(n, "error", f"crypto map type {kind!r} is not imported (ikev2-ipv4, ipsec-ikev1)")
        r.push("ignored", None)
        return
    ikev1 = kind == "ipsec-ikev1"
    if ikev1:
        r.note(
            n, "decision",
            "IKEv1 crypto map becomes an IKEv2 crypto map (RFC 9395); transport mode over "
            "IKEv2 uses USE_TRANSPORT_MODE (RFC 7296 §1.3.1): the peer must run IKEv2",
        )  # fmt: skip
    if kind == "ikev2-ipv6":
        r.note(
            n, "decision",
            "IPv6 tunnel endpoints: the reference does not support TACACS+ over them; "
            "imported as given",
        )  # fmt: skip
    r.push("map", r.maps.setdefault(name, _Map(name, n, ikev1)))


def _m(f: _Frame) -> _Map:
    assert isinstance(f.obj, _Map)
    return f.obj


def _h_match_address(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    _m(f).acl = _arg(toks, 2)
    if len(toks) > 3:
        r.note(n, "ignored", "the priority has no equivalent (one access list per crypto map)")


def _h_peer(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    i = 2 if toks[0].lower() == "set" else 1
    if (a := r.address(_arg(toks, i), n, "peer")) is not None:
        _m(f).peer = (n, str(a))


def _key(toks: list[str], n: int) -> _Key:
    low = [t.lower() for t in toks]
    value = _arg(toks, len(toks) - 1) if len(toks) > 1 else None
    return _Key(n, "encrypted" in low, value)


def _h_auth(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    # authentication {local|remote} pre-shared-key [encrypted] key K
    low = [t.lower() for t in toks]
    if "pre-shared-key" not in low or "key" not in low[:-1]:
        r.note(n, "error", "only pre-shared-key authentication is offered here")
        return
    if low[1] == "local":
        _m(f).local_key = _key(toks, n)
    else:
        _m(f).remote_key = _key(toks, n)


def _h_ikev1_key(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    # set ikev1 [encrypted] preshared-key K: one key, both directions
    _m(f).local_key = _key(toks, n)


def _h_ikesa(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    m = _m(f)
    sub = (_arg(toks, 1) or "").lower()
    if sub == "max-retransmission":
        m.max_retransmission = r.integer(_arg(toks, 2), n, "max-retransmission")
    elif sub == "retransmission-timeout":
        m.retransmission_timeout = r.integer(_arg(toks, 2), n, "retransmission-timeout", lo=100)
    elif sub == "transform-set" and (_arg(toks, 2) or "").lower() == "list":
        m.ike_sets = toks[3:]
    elif sub == "rekey":
        r.note(n, "ignored", "the IKE SA is always rekeyed before its lifetime ends (no key)")
    elif sub == "policy" and "error-notification" in (t.lower() for t in toks):
        r.note(n, "ignored", "error notifications are always sent (RFC 7296 §2.21)")
    else:
        r.note(n, "ignored", "no equivalent")


def _h_payload(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    name = _arg(toks, 1) or "payload"
    match = _after(toks, "match")
    if match is not None and match.lower() != "ipv4":
        r.note(n, "decision", f"payload matches {match}: the access list decides what is protected")
    p = _Payload(name, n)
    _m(f).payloads.append(p)
    r.push("payload", p)


def _h_dpd(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    # keepalive|dpd [dpd] interval I [timeout T] [num-retry R]
    interval = r.integer(_after(toks, "interval"), n, "interval")
    timeout = r.integer(_after(toks, "timeout") or "10", n, "timeout")
    retries = r.integer(_after(toks, "num-retry") or "3", n, "num-retry")
    if interval is not None and timeout is not None and retries is not None:
        _m(f).dpd = (float(interval), float(timeout), retries)


def _h_set_transform(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    _m(f).ipsec_sets = toks[2:]


def _h_set_pfs(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    _m(f).pfs = (n, (_arg(toks, 2) or "").lower().removeprefix("group"))


def _h_map_other(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    r.note(n, "ignored", "no equivalent in a crypto map")


def _p(f: _Frame) -> _Payload:
    assert isinstance(f.obj, _Payload)
    return f.obj


def _h_payload_sets(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    _p(f).sets = toks[3:]


def _h_payload_rekey(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    keepalive = "keepalive" in (t.lower() for t in toks)
    _p(f).rekey = (n, "keepalive" if keepalive else "lazy")


def _h_payload_lifetime(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    secs = r.integer(_arg(toks, 1), n, "lifetime", lo=MIN_LIFETIME)
    kb_tok = _after(toks, "kilo-bytes")
    kb = r.integer(kb_tok, n, "kilo-bytes", lo=1) if kb_tok is not None else None
    if secs is not None:
        _p(f).lifetime = (n, secs, kb)


# --- interface


def _h_interface(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    name = _arg(toks, 1)
    if name is None:
        r.note(n, "error", "interface without a name")
        return
    r.push("interface", r.interfaces.setdefault(name, _Interface(name, n)))


def _h_if_address(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    assert isinstance(f.obj, _Interface)
    tok = (_arg(toks, 2) or "").split("/")[0]
    if (a := r.address(tok, n, "address")) is not None:
        f.obj.addresses.append(a)


def _h_if_map(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    assert isinstance(f.obj, _Interface)
    if (name := _arg(toks, 1)) is not None:
        f.obj.maps.append(name)


def _h_if_other(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    r.note(n, "ignored", "no equivalent (the Linux interface is configured outside ipsecmgr)")


# --- tacacs mode


def _h_tacacs(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    r.push("tacacs", None)


def _h_tacacs_server(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    # server priority N ip-address A [encrypted password S] [key K] [password P]
    #   [nas-source-address A] [port P] ...   (the reference calls the source "src_ip")
    r.integer(_after(toks, "priority"), n, "priority", lo=1)
    server = r.address(_after(toks, "ip-address"), n, "ip-address")
    src_tok = _after(toks, "nas-source-address") or _after(toks, "src-ip")
    src_tok = src_tok or _after(toks, "src_ip")
    src = r.address(src_tok, n, "nas-source-address") if src_tok is not None else None
    if "password" in (t.lower() for t in toks) or "key" in (t.lower() for t in toks):
        r.note(
            n, "ignored",
            "the TACACS+ shared secret belongs to the TACACS+ client (pam_tacplus "
            "secret=...), not to ipsecmgr; it is not copied",
        )  # fmt: skip
    port_tok = _after(toks, "port")
    port = r.integer(port_tok, n, "port", lo=1) if port_tok is not None else 49
    if server is not None:
        r.tacacs.append(_TacacsServer(n, server, src, port or 49))


def _h_tacacs_other(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    r.note(n, "ignored", "a TACACS+ client setting (pam_tacplus / tacacs-plus), not ipsecmgr's")


_SET_KEYS = (
    ("group",), ("cipher",), ("hmac",), ("prf",), ("lifetime",), ("mode",), ("encryption",),
)  # fmt: skip

_TABLES: dict[str, list[tuple[tuple[str, ...], Handler]]] = {
    "root": [
        (("configure",), _h_configure),
        (("config",), _h_configure),
        (("context",), _h_context),
        (("require", "crypto"), _h_require),
        (("aaa", "tacacs+"), _h_aaa),
        (("tacacs", "mode"), _h_tacacs),
    ],
    "context": [
        (("ip", "access-list"), _h_acl),
        (("ipsec", "transform-set"), _h_ipsec_set),
        (("ikev2-ikesa", "transform-set"), _h_ike_set),
        (("crypto", "ipsec", "transform-set"), _h_ikev1_ipsec_set),
        (("crypto", "map"), _h_map),
        (("ikev1", "policy"), _h_ikev1_policy),
        (("ikev1", "keepalive", "dpd"), _h_ikev1_dpd),
        (("interface",), _h_interface),
        (("tacacs", "mode"), _h_tacacs),
        (("aaa", "tacacs+"), _h_aaa),
        (("ip", "routing", "shared-subnet"), _h_shared_subnet),
    ],
    "acl": [
        (("permit",), _h_acl_rule),
        (("deny",), _h_acl_rule),
        (("remark",), _h_acl_other),
        (("readdress",), _h_acl_other),
        (("redirect",), _h_acl_other),
    ],
    "ipsec-set": [(k, _h_set_value) for k in _SET_KEYS],
    "ike-set": [(k, _h_set_value) for k in _SET_KEYS],
    "ikev1-policy": [
        (("encryption",), _h_ikev1_policy_value),
        (("hash",), _h_ikev1_policy_value),
        (("group",), _h_ikev1_policy_value),
        (("lifetime",), _h_ikev1_policy_value),
        (("authentication",), _h_ikev1_policy_value),
    ],
    "map": [
        (("match", "address"), _h_match_address),
        (("peer",), _h_peer),
        (("set", "peer"), _h_peer),
        (("authentication",), _h_auth),
        (("set", "ikev1", "encrypted", "preshared-key"), _h_ikev1_key),
        (("set", "ikev1", "preshared-key"), _h_ikev1_key),
        (("set", "transform-set"), _h_set_transform),
        (("set", "pfs"), _h_set_pfs),
        (("ikev2-ikesa",), _h_ikesa),
        (("payload",), _h_payload),
        (("keepalive",), _h_dpd),
        (("dpd",), _h_dpd),
        (("control-dont-fragment",), _h_map_other),
        (("natt",), _h_map_other),
        (("set",), _h_map_other),
    ],
    "payload": [
        (("ipsec", "transform-set", "list"), _h_payload_sets),
        (("rekey",), _h_payload_rekey),
        (("lifetime",), _h_payload_lifetime),
    ],
    "interface": [
        (("ip", "address"), _h_if_address),
        (("ipv6", "address"), _h_if_address),
        (("crypto-map",), _h_if_map),
        (("description",), _h_if_other),
        (("ip", "mtu"), _h_if_other),
    ],
    "tacacs": [
        (("server",), _h_tacacs_server),
        (("accounting",), _h_tacacs_other),
        (("authorization",), _h_tacacs_other),
        (("authentication",), _h_tacacs_other),
        (("on-unknown-user",), _h_tacacs_other),
        (("max-sessions",), _h_tacacs_other),
        (("timeout",), _h_tacacs_other),
        (("retries",), _h_tacacs_other),
        (("priv-lvl",), _h_tacacs_other),
        (("user-id",), _h_tacacs_other),
    ],
    "ignored": [],
    "unknown": [],
}


# ---------------------------------------------------------------- the mapping

# StarOS names -> ours. Ciphers not offered here (ESP is AES-GCM only, RFC 8221
# prefers AEAD) map to the AES-GCM of the same key size, reported as a decision.
_ESP = {"aes-gcm-128": "aes-gcm-128", "aes-gcm-256": "aes-gcm-256"}
_ESP_NEAREST = {"aes-cbc-128": "aes-gcm-128", "aes-cbc-256": "aes-gcm-256"}
_IKE_ENC = {
    "aes-gcm-128": "aes-gcm-128",
    "aes-gcm-256": "aes-gcm-256",
    "aes-cbc-256": "aes-cbc-256",
}
_IKE_ENC_V1 = {"aes256": "aes-cbc-256", "aes-256": "aes-cbc-256"}
_HASH = {
    "sha2-256-128": "sha256", "sha2-384-192": "sha384", "sha2-512-256": "sha512",
    "sha2-256": "sha256", "sha2-384": "sha384", "sha2-512": "sha512",
    "sha256": "sha256", "sha384": "sha384", "sha512": "sha512",
}  # fmt: skip


def _group(r: _Reader, line: int, value: str, what: str, *, allow_none: bool) -> int | str | None:
    if value == "none" and allow_none:
        return "none"
    if _is_int(value) and int(value) in DH_GROUPS:
        return int(value)
    r.note(
        line, "decision",
        f"{what} {value} is not offered here (DH groups {', '.join(map(str, DH_GROUPS))}; "
        "MODP below 2048 bits is deprecated by RFC 8247): group 14 instead, the peer must "
        "offer it",
        text=_line_text(r, line),
    )  # fmt: skip
    return 14


def _line_text(r: _Reader, line: int) -> str:
    return r.line_texts.get(line, "")


class _Writer:
    """Builds the TOML from what :class:`_Reader` collected."""

    def __init__(self, r: _Reader) -> None:
        self.r = r
        self.out: list[str] = []
        self.keys: dict[str, bytes] = {}
        self.missing: list[str] = []

    def note(self, line: int, kind: str, message: str) -> None:
        self.r.note(line, kind, message, text=_line_text(self.r, line))

    def emit(self, *lines: str) -> None:
        # Names from the input also go into comments: a control character there
        # would make the TOML invalid (strings are escaped by _s already).
        self.out.extend(_CONTROL.sub("?", line) for line in lines)

    def build(self) -> str:
        r = self.r
        self.emit(
            "# Imported from a StarOS configuration by `ipsecmgr import-staros`.",
            "# Comments name the StarOS line each setting comes from; the import report",
            "# lists every line that has no equivalent or needs a decision.",
        )
        for acl in r.acls.values():
            self.acl(acl)
        ike_used = self.ike_sets()
        ipsec_extra = self.ipsec_sets()
        bound = {m: i.name for i in r.interfaces.values() for m in i.maps}
        gw_ifaces = [i for i in r.interfaces.values() if i.maps and i.addresses]
        tuns: list[tuple[str, _Map, str | None, list[str]]] = []
        for m in r.maps.values():
            tun = self.crypto_map(m, ike_used, ipsec_extra, bound, len(gw_ifaces) > 1)
            if tun is not None:
                tuns.append(tun)
        used_names: set[str] = set()
        for name, m, src, routes in tuns:
            # Linux interface names have at most 15 characters; keep them unique.
            base, i = name, 1
            while name in used_names:
                i += 1
                name = f"{base[: 15 - len(str(i))]}{i}"
            used_names.add(name)
            self.emit("", f"# line {r.interfaces[bound[m.name]].line}: interface "
                      f"{bound[m.name]} / crypto-map {m.name}")  # fmt: skip
            self.emit(f"[tun.{_key_name(name)}]")
            if src is not None:
                self.emit(f"addresses = [{_s(src + ('/32' if ':' not in src else '/128'))}]")
            self.emit(f"routes = [{', '.join(_s(x) for x in routes)}]")
            self.emit(f"crypto_maps = [{_s(m.name)}]")
        self.gateway(gw_ifaces)
        return "\n".join(self.out) + "\n"

    # --- sections

    def acl(self, acl: _Acl) -> None:
        self.emit("", f"# line {acl.line}: ip access-list {acl.name}")
        if not acl.rules:
            self.note(acl.line, "error", f"access list {acl.name} has no permit/deny line")
        for line, rule in acl.rules:
            try:
                parsed = parse_acl(acl.name, [rule])
            except AclSyntaxError as e:
                self.note(
                    line, "error",
                    f"ACL {acl.name}: unexpected {e.token!r}: expected {e.expected}. Written "
                    "as is: check-config rejects it until the line is corrected (a guess "
                    "would decide what traffic leaves in clear)",
                )  # fmt: skip
                continue
            for w in parsed.warnings:
                self.note(line, "decision", w)
        self.emit(f"[access_list.{_key_name(acl.name)}]")
        self.emit("rules = [")
        self.emit(*(f"    {_s(rule)},  # line {line}" for line, rule in acl.rules))
        self.emit("]")

    def ike_sets(self) -> set[str]:
        used: set[str] = set()
        for s in self.r.ike_sets.values():
            used.add(s.name)
            v = s.values
            self.emit("", f"# line {s.line}: " + (
                f"ikev1 policy (as {s.name})" if s.ikev1 else f"ikev2-ikesa transform-set {s.name}"
            ))  # fmt: skip
            self.emit(f"[ike_transform_set.{_key_name(s.name)}]")
            enc = "aes-gcm-256"
            if "cipher" in v:
                line, c = v["cipher"]
                if c in _IKE_ENC or c in _IKE_ENC_V1:
                    enc = _IKE_ENC.get(c) or _IKE_ENC_V1[c]
                else:
                    self.note(
                        line, "decision",
                        f"IKE cipher {c} is not offered here ({', '.join(_IKE_ENC)}): "
                        f"{enc} instead, the peer must offer it",
                    )  # fmt: skip
            else:
                self.note(
                    s.line, "decision",
                    f"{s.name}: no cipher given; the StarOS default is not assumed: {enc} "
                    "with prf sha256 (RFC 8247), the peer must offer it",
                )  # fmt: skip
            self.emit(f"encryption = {_s(enc)}")
            prf = "sha256"
            if "prf" in v:
                line, p = v["prf"]
                if p in _HASH:
                    prf = _HASH[p]
                else:
                    self.note(line, "decision", f"PRF {p} is not offered here: sha256 instead")
            self.emit(f"prf = {_s(prf)}")
            if enc.startswith("aes-cbc"):
                integ = prf
                if "hmac" in v:
                    line, h = v["hmac"]
                    integ = _HASH.get(h, "sha256")
                    if h not in _HASH:
                        self.note(line, "decision", f"integrity {h} is not offered: sha256")
                self.emit(f"integrity = {_s(integ)}")
            elif "hmac" in v and v["hmac"][1] != "none":
                self.note(v["hmac"][0], "ignored", "AES-GCM carries its own integrity (RFC 5282)")
            group = 14
            if "group" in v:
                line, g = v["group"]
                got = _group(self.r, line, g, "DH group", allow_none=False)
                group = got if isinstance(got, int) else 14
            self.emit(f"dh_group = {group}")
            if "lifetime" in v:
                line, life = v["lifetime"]
                if _is_int(life) and int(life) >= MIN_LIFETIME:
                    self.emit(f"lifetime = {int(life)}  # line {line}")
                else:
                    self.note(line, "error", f"lifetime {life!r} is not a number of seconds")
        return used

    def ipsec_sets(self) -> dict[str, dict[str, str]]:
        """Write the ipsec transform sets; payload and IKEv1 map settings land in them."""
        extra: dict[str, dict[str, str]] = {s: {} for s in self.r.ipsec_sets}
        origin: dict[tuple[str, str], int] = {}

        def put(set_name: str, key: str, value: str, line: int) -> None:
            if set_name not in extra:
                return
            old = extra[set_name].get(key)
            if old is not None and old != value:
                self.note(
                    line, "decision",
                    f"ipsec transform-set {set_name} gets {key} = {old} from line "
                    f"{origin[(set_name, key)]} and {value} here: the first is kept "
                    "(one value per transform set; give each payload its own set)",
                )  # fmt: skip
                return
            extra[set_name][key] = value
            origin[(set_name, key)] = line

        for m in self.r.maps.values():
            for p in m.payloads:
                rekey = p.rekey or (p.line, "lazy")
                if p.rekey is None:
                    self.note(
                        p.line, "decision",
                        f"payload {p.name} has no 'rekey': idle Child SAs are left to expire "
                        "(rekey = \"lazy\"); 'rekey keepalive' would keep them",
                    )  # fmt: skip
                for set_name in p.sets:
                    put(set_name, "rekey", _s(rekey[1]), rekey[0])
                    if p.lifetime is not None:
                        line, secs, kb = p.lifetime
                        put(set_name, "lifetime_seconds", str(secs), line)
                        if kb is not None:
                            put(set_name, "lifetime_bytes", str(kb * 1024), line)
            if m.ikev1 and m.pfs is not None:
                line, g = m.pfs
                got = _group(self.r, line, g, "PFS group", allow_none=True)
                for set_name in m.ipsec_sets:
                    put(set_name, "pfs", _s(got) if got == "none" else str(got), line)

        for s in self.r.ipsec_sets.values():
            v = s.values
            self.emit("", f"# line {s.line}: " + (
                "crypto ipsec transform-set" if s.ikev1 else "ipsec transform-set"
            ) + f" {s.name}")  # fmt: skip
            self.emit(f"[ipsec_transform_set.{_key_name(s.name)}]")
            esp = "aes-gcm-256"
            line, c = v.get("cipher", (s.line, ""))
            hmac = v.get("hmac", (s.line, "none"))[1]
            if c in _ESP:
                esp = _ESP[c]
            elif c:
                esp = _ESP_NEAREST.get(c, "aes-gcm-256")
                self.note(
                    line, "decision",
                    f"ESP {c} with hmac {hmac} is not offered here (AES-GCM only, RFC 8221): "
                    f"{esp} instead, the peer must offer it",
                )  # fmt: skip
            else:
                self.note(
                    s.line, "decision",
                    f"{s.name}: no cipher given; the StarOS default is not assumed: {esp}, "
                    "the peer must offer it",
                )  # fmt: skip
            self.emit(f"esp = {_s(esp)}")
            if "group" in v:
                gl, g = v["group"]
                got = _group(self.r, gl, g, "PFS group", allow_none=True)
                self.emit(f"pfs = {_s(got) if got == 'none' else got}  # line {gl}")
            elif "pfs" in extra[s.name]:
                self.emit(f"pfs = {extra[s.name].pop('pfs')}")
            mode = "tunnel"
            if "mode" in v:
                ml, mv = v["mode"]
                if mv in ("tunnel", "transport"):
                    mode = mv
                else:
                    self.note(ml, "error", f"mode {mv!r} is not tunnel or transport")
            self.emit(f"mode = {_s(mode)}")
            if "lifetime" in v:
                ll, life = v["lifetime"]
                if _is_int(life) and int(life) >= MIN_LIFETIME:
                    extra[s.name].setdefault("lifetime_seconds", life)
                else:
                    self.note(ll, "error", f"lifetime {life!r} is not a number of seconds")
            extra[s.name].pop("pfs", None)
            for key, value in extra[s.name].items():
                self.emit(f"{key} = {value}")
        return extra

    def psk(self, m: _Map, key: _Key | None, side: str) -> str:
        # The file name comes from the map's name: only characters that cannot leave
        # the output directory ("../x" becomes "___x"), and unique.
        base = f"psk-{_UNSAFE.sub('_', m.name)}-{side}"
        fname, i = base, 1
        while fname in self.keys or fname in self.missing:
            i += 1
            fname = f"{base}-{i}"
        if key is None:
            self.note(
                m.line, "action",
                f"crypto map {m.name}: no {side} pre-shared key; write it into {fname} "
                "(beside the TOML, mode 0600)",
            )  # fmt: skip
            self.missing.append(fname)
        elif key.encrypted or not key.value:
            self.note(
                key.line, "action",
                f"an encrypted StarOS key cannot be decrypted here: write the plain {side} "
                f"key of crypto map {m.name} into {fname} (beside the TOML, mode 0600)",
            )  # fmt: skip
            self.missing.append(fname)
        else:
            self.keys[fname] = key.value.encode()
        return f"{{ file = {_s(fname)} }}"

    def crypto_map(
        self,
        m: _Map,
        ike_names: set[str],
        ipsec_extra: Mapping[str, Mapping[str, str]],
        bound: Mapping[str, str],
        pick_local: bool,
    ) -> tuple[str, _Map, str | None, list[str]] | None:
        r = self.r
        kind = "ipsec-ikev1" if m.ikev1 else "ikev2-ipv4"
        self.emit("", f"# line {m.line}: crypto map {m.name} {kind}")
        self.emit(f"[crypto_map.{_key_name(m.name)}]")
        if m.acl is None:
            self.note(m.line, "error", f"crypto map {m.name} has no 'match address'")
        elif m.acl not in r.acls:
            self.note(m.line, "error", f"crypto map {m.name}: no ip access-list {m.acl!r}")
        if m.acl is not None:
            self.emit(f"match_address = {_s(m.acl)}")
        if m.peer is None:
            self.note(m.line, "error", f"crypto map {m.name} has no peer")
        else:
            self.emit(f"peer = {_s(m.peer[1])}  # line {m.peer[0]}")
        self.emit(f"local_psk = {self.psk(m, m.local_key, 'local')}")
        if not m.ikev1:
            if m.remote_key is None and m.local_key is not None:
                self.note(m.line, "decision", "no remote key: the local key is used both ways")
            else:
                self.emit(f"remote_psk = {self.psk(m, m.remote_key, 'remote')}")
        if m.max_retransmission is not None:
            self.emit(f"max_retransmission = {m.max_retransmission}")
        if m.retransmission_timeout is not None:
            self.emit(f"retransmission_timeout = {m.retransmission_timeout}")
        ike = m.ike_sets or [n for n, s in r.ike_sets.items() if s.ikev1 and m.ikev1]
        for name in ike:
            if name not in ike_names:
                self.note(m.line, "error", f"crypto map {m.name}: no IKE transform set {name!r}")
        if ike:
            self.emit(f"ike_transform_sets = [{', '.join(_s(x) for x in ike)}]")
        else:
            self.note(
                m.line, "decision",
                f"crypto map {m.name} names no IKE transform set: the default proposal "
                "(aes-gcm-256, prf sha256, group 14), the peer must offer it",
            )  # fmt: skip
        ipsec = m.ipsec_sets if m.ikev1 else [s for p in m.payloads for s in p.sets]
        if len(m.payloads) > 1:
            self.note(
                m.payloads[1].line, "decision",
                f"crypto map {m.name}: {len(m.payloads)} payloads become one proposal list "
                "(one Child SA per crypto map here)",
            )  # fmt: skip
        for name in ipsec:
            if name not in ipsec_extra:
                self.note(m.line, "error", f"crypto map {m.name}: no ipsec transform-set {name!r}")
        if ipsec:
            self.emit(f"ipsec_transform_sets = [{', '.join(_s(x) for x in dict.fromkeys(ipsec))}]")
        else:
            self.note(
                m.line, "decision",
                f"crypto map {m.name} names no ipsec transform set: the default proposal "
                "(ESP aes-gcm-256, no PFS, tunnel mode), the peer must offer it",
            )  # fmt: skip
        modes = {
            (r.ipsec_sets[s].values.get("mode", (0, "tunnel"))[1]) for s in ipsec
            if s in r.ipsec_sets
        }  # fmt: skip
        mode = "transport" if modes == {"transport"} else "tunnel"
        dpd = m.dpd
        if dpd is None and m.ikev1 and r.ikev1_dpd is not None:
            dpd = r.ikev1_dpd[1:]
        if dpd is not None:
            self.emit(
                f"dpd = {{ interval = {dpd[0]:g}, timeout = {dpd[1]:g}, retries = {dpd[2]} }}"
            )
        src, routes = self.flows(m, mode)
        if src is not None:
            self.emit(f"src_ip = {_s(src)}")
        iface = bound.get(m.name)
        if pick_local and iface is not None and m.peer is not None:
            peer_v = ipaddress.ip_address(m.peer[1]).version
            same = [a for a in r.interfaces[iface].addresses if a.version == peer_v]
            if same:
                self.emit(f"local_address = {_s(str(same[0]))}  # interface {iface}")
        if iface is None:
            self.note(
                m.line, "decision",
                f"crypto map {m.name} is on no interface ('crypto-map {m.name}'): no TUN is "
                "written, so no traffic reaches it",
            )  # fmt: skip
            return None
        name = ("tun-" + _UNSAFE.sub("_", m.name))[:15]  # a Linux interface name
        return name, m, src if mode == "tunnel" else None, routes

    def flows(self, m: _Map, mode: str) -> tuple[str | None, list[str]]:
        """src_ip (tunnel mode) and the routes into the TUN, from the ACL and tacacs mode."""
        acl = self.r.acls.get(m.acl or "")
        if acl is None:
            return None, []
        rules: list[Rule] = []
        for _line, text in acl.rules:
            try:
                rules.extend(parse_acl(acl.name, [text]).rules)
            except AclSyntaxError:
                continue  # reported with the ACL
        permits = [x for x in rules if x.permit]
        routes: list[str] = []
        for x in permits:
            net = _network(x.dst, x.dst_mask, x.version)
            if net is None:
                self.note(
                    acl.line, "action",
                    f"ACL {acl.name}: '{x.text}' has no destination prefix to route into the "
                    "TUN (any or a non-contiguous wildcard): add the routes to the tun by hand",
                )  # fmt: skip
            elif str(net) not in routes:
                routes.append(str(net))
        if mode != "tunnel":
            return None, routes
        # Tunnel mode needs the inner source (reference: "mandatory to provision the
        # src-ip"): the tacacs server whose src_ip -> server flow the ACL permits.
        for srv in self.r.tacacs:
            if srv.src_ip is None:
                continue
            fam = srv.address.version
            for x in permits:
                hit = parse_acl(acl.name, [x.text]).first_match(
                    fam, PROTO_TCP, int(srv.src_ip), int(srv.address), 1024, srv.port, PORTS_OK
                )  # fmt: skip
                if hit is not None and hit.permit:
                    return str(srv.src_ip), routes
        hosts = {
            str(net.network_address)
            for x in permits
            if (net := _network(x.src, x.src_mask, x.version)) is not None
            and net.prefixlen == net.max_prefixlen
        }
        if len(hosts) == 1:
            (src,) = hosts
            self.note(
                m.line, "decision",
                f"crypto map {m.name}: src_ip {src} is the source host of ACL {acl.name} "
                "(no tacacs mode 'server ... nas-source-address' matches it): it must be "
                "the TACACS+ client's source address",
            )  # fmt: skip
            return src, routes
        self.note(
            m.line, "error",
            f"crypto map {m.name}: tunnel mode needs src_ip (the TACACS+ client's source, "
            "tacacs mode 'server ... nas-source-address'); none could be derived",
        )  # fmt: skip
        return None, routes

    def gateway(self, ifaces: list[_Interface]) -> None:
        r = self.r
        if not ifaces:
            ifaces = [i for i in r.interfaces.values() if i.addresses]
            if ifaces and r.maps:
                self.note(
                    ifaces[0].line, "decision",
                    "no interface carries a crypto-map: gateway.local_addresses are every "
                    "interface address",
                )  # fmt: skip
        if not ifaces:
            if r.maps:
                self.note(
                    0, "error",
                    "no interface address: write [gateway] local_addresses by hand",
                )  # fmt: skip
            return
        addrs = list(dict.fromkeys(str(a) for i in ifaces for a in i.addresses))
        self.emit("", f"# line {ifaces[0].line}: interface {ifaces[0].name}")
        self.emit("[gateway]")
        self.emit(f"local_addresses = [{', '.join(_s(a) for a in addrs)}]")
        self.emit(f"management_interface = {_s(ifaces[0].name)}")
        self.note(
            ifaces[0].line, "decision",
            f"interface {ifaces[0].name}: its addresses must be on a Linux interface of "
            "this host; gateway.management_interface names the StarOS interface (rename "
            "it to the Linux one)",
        )  # fmt: skip


def _network(
    value: int, mask: int, version: int
) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    bits = 32 if version in (4, 0) else 128
    full = (1 << bits) - 1
    if mask == 0:
        return None  # "any"
    inv = full ^ mask
    if inv & (inv + 1):
        return None  # non-contiguous wildcard
    prefix = bits - inv.bit_length()
    # By family, not ipaddress.ip_network(): the integer of ::/16 is also 0.0.0.0.
    if bits == 32:
        return ipaddress.IPv4Network((value, prefix))
    return ipaddress.IPv6Network((value, prefix))


_BARE = re.compile(r"^[A-Za-z0-9_-]+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _key_name(name: str) -> str:
    return name if _BARE.match(name) else _s(name)


def _s(v: object) -> str:
    """A TOML basic string (JSON's escapes are a subset of TOML's)."""
    return json.dumps(str(v))


# ---------------------------------------------------------------- public API


def import_staros(text: str) -> Imported:
    """Read a StarOS configuration; return our TOML, the key files and the report."""
    r = _Reader()
    r.read(text)
    w = _Writer(r)
    toml = w.build()
    notes = sorted(r.notes, key=lambda n: (n.line, NOTE_KINDS.index(n.kind)))
    return Imported(toml, dict(w.keys), tuple(w.missing), tuple(notes))


def write_import(result: Imported, out: Path, *, force: bool = False) -> list[Path]:
    """Write the TOML to ``out`` and each plain-text key file beside it (mode 0600).

    Refuses to overwrite existing files unless ``force``. Returns the paths written.
    """
    targets = [out, *(out.parent / name for name in result.keys)]
    if not force:
        existing = [p for p in targets if p.exists()]
        if existing:
            raise FileExistsError(", ".join(map(str, existing)))
    out.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, value in result.keys.items():
        path = out.parent / name
        # Created 0600 (not chmod after writing): the key is never readable by others.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, value + b"\n")
        finally:
            os.close(fd)
        written.append(path)
    out.write_text(result.toml)
    written.insert(0, out)
    return written


def format_report(result: Imported, source: str) -> str:
    """The report: every noted line, then a count per kind."""
    lines = [f"{source}: {n}" for n in result.notes]
    counts = ", ".join(f"{result.count(k)} {k}" for k in NOTE_KINDS)
    lines.append(f"{source}: {len(result.notes)} line(s) reported ({counts})")
    return "\n".join(lines)
