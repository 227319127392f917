"""What the StarOS reader collects, the report's notes, and the text helpers
the reader and the writer share (tokens, masking, TOML strings)."""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

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


def _is_int(tok: str) -> bool:
    # Not str.isdigit(): it accepts "²", which int() rejects.
    return tok.isascii() and tok.isdigit()


def _arg(toks: list[str], i: int) -> str | None:
    return toks[i] if i < len(toks) else None


def _after(toks: list[str], word: str) -> str | None:
    low = [t.lower() for t in toks]
    return _arg(toks, low.index(word) + 1) if word in low else None


_BARE = re.compile(r"^[A-Za-z0-9_-]+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _key_name(name: str) -> str:
    return name if _BARE.match(name) else _s(name)


def _s(v: object) -> str:
    """A TOML basic string (JSON's escapes are a subset of TOML's)."""
    return json.dumps(str(v))
