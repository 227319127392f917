"""Pre-shared keys and other secrets: where they come from and how they are kept.

A PSK is configured by reference, never inline: ``{ file = "/etc/ipsecmgr/psk-foo" }``
or ``{ env = "IPSECMGR_PSK_FOO" }``. Command-line arguments are visible to every
user in ``/proc/*/cmdline``, and config files are copied around, so neither may
carry the key itself (the same rule operators apply to TACACS+ shared secrets).

The value lives in a :class:`Secret`. Its ``repr``, ``str`` and ``format`` are
``Secret(***)``, so a PSK that ends up in a log line, a traceback's locals, a
``show`` output or an f-string prints as stars. Only :meth:`Secret.reveal`
returns the bytes, and the few callers that need them (the IKE AUTH payload,
strongSwan's config file) call it explicitly.
"""

from __future__ import annotations

import hmac
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

_MASK = "Secret(***)"


class SecretError(ValueError):
    """A secret could not be read (missing file, unset variable, empty value)."""


class Secret:
    """Bytes that never print. Compare in constant time; cannot be pickled."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        if not isinstance(value, bytes):
            raise TypeError("Secret holds bytes")
        self._value = value

    def reveal(self) -> bytes:
        """The secret bytes. Call only where the key is used, never to print it."""
        return self._value

    def __repr__(self) -> str:
        return _MASK

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return _MASK

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __len__(self) -> int:
        return len(self._value)

    def __reduce__(self) -> NoReturn:
        # Pickling would write the key into whatever stores the pickle.
        raise TypeError("a Secret cannot be pickled")

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Secret:
        return self


@dataclass(frozen=True)
class SecretSource:
    """Where a secret comes from: exactly one of ``file`` and ``env`` is set."""

    file: Path | None = None
    env: str | None = None

    def describe(self) -> str:
        return f"file {self.file}" if self.file is not None else f"environment variable {self.env}"


def key_mode_error(path: Path, mode: int) -> str | None:
    """The one rule for the gateway's key files (PSKs, the TLS client key): a file
    group or others may read or change is refused, as ssh refuses such a private
    key. The message names the file and the fix; ``None``: the mode is fine."""
    if mode & 0o077:
        return (
            f"{path} has mode {mode:04o}: group or others may read or change this key; "
            f"refusing to use it (fix: chmod 600 {path})"
        )
    return None


def read_secret_file(path: Path, *, strict: bool = False) -> tuple[Secret, list[str]]:
    """Read a secret from ``path``; return it and warnings about the file's permissions.

    ``strict`` (the gateway's own keys): a file readable or writable by group or
    others is refused, as ssh refuses such a private key; the message names the
    file and the fix. The lab's tools keep the warning.

    One trailing newline (``\\n`` or ``\\r\\n``) is stripped: editors add it, and
    a key that differs from the peer's by a newline fails IKE AUTH with no hint.
    """
    warnings: list[str] = []
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError as e:
        raise SecretError(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SecretError(f"{path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if strict and (refusal := key_mode_error(path, mode)) is not None:
        raise SecretError(refusal)
    if mode & 0o077:
        warnings.append(
            f"{path} has mode {mode:04o}; "
            "a key file should be 0600 or 0400 (readable by its owner only)"
        )
    if st.st_uid not in (0, os.geteuid()):
        warnings.append(f"{path} is owned by uid {st.st_uid}, neither root nor this user")
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise SecretError(f"{path} is empty")
    return Secret(data), warnings


def read_secret_env(name: str, environ: Mapping[str, str] | None = None) -> Secret:
    """Read a secret from an environment variable (UTF-8 encoded)."""
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value is None:
        raise SecretError(f"environment variable {name} is not set")
    if value == "":
        raise SecretError(f"environment variable {name} is empty")
    return Secret(value.encode("utf-8", "surrogateescape"))


def load_secret(
    source: SecretSource, environ: Mapping[str, str] | None = None
) -> tuple[Secret, list[str]]:
    """Resolve a :class:`SecretSource` of the gateway's config (key files strictly:
    mode 0600/0400 or refused); return the secret and any warnings."""
    if source.file is not None:
        return read_secret_file(source.file, strict=True)
    if source.env is not None:
        return read_secret_env(source.env, environ), []
    raise SecretError("no secret source given")
