"""TACACS+ packet codec (RFC 8907): header, body obfuscation and the six bodies.

This is the payload the gateway protects. The lab's server (``tacacs_server``)
uses it; nothing in the data path does (ESP carries TACACS+ as opaque bytes).

Every length read from the wire is checked against what is left before it is
used; a body whose field lengths do not add up to the header's length is a
:class:`TacacsError`, which is also what a wrong shared secret usually looks
like (the de-obfuscated body is noise).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

# RFC 8907 §4.1: major version 0xc; minor 0 (default) or 1 (PAP/CHAP).
MAJOR = 0xC
VERSION_DEFAULT = 0xC0
VERSION_ONE = 0xC1

# packet types (§4.1)
AUTHEN, AUTHOR, ACCT = 0x01, 0x02, 0x03

# header flags (§4.1)
FLAG_UNENCRYPTED = 0x01
FLAG_SINGLE_CONNECT = 0x04

HEADER_LEN = 12
MAX_BODY = 0xFFFF  # lab limit; RFC 8907 §4.1 allows 2^32-1 but no real body is this large

# authentication (§5)
AUTHEN_LOGIN, AUTHEN_CHPASS, AUTHEN_SENDAUTH = 0x01, 0x02, 0x04
AUTHEN_TYPE_ASCII, AUTHEN_TYPE_PAP, AUTHEN_TYPE_CHAP = 0x01, 0x02, 0x03
AUTHEN_TYPE_NAMES = {0x01: "ascii", 0x02: "pap", 0x03: "chap", 0x05: "mschap", 0x06: "mschapv2"}
AUTHEN_STATUS_PASS = 0x01
AUTHEN_STATUS_FAIL = 0x02
AUTHEN_STATUS_GETDATA = 0x03
AUTHEN_STATUS_GETUSER = 0x04
AUTHEN_STATUS_GETPASS = 0x05
AUTHEN_STATUS_RESTART = 0x06
AUTHEN_STATUS_ERROR = 0x07
AUTHEN_STATUS_FOLLOW = 0x21
AUTHEN_STATUS_NAMES = {
    0x01: "PASS", 0x02: "FAIL", 0x03: "GETDATA", 0x04: "GETUSER",
    0x05: "GETPASS", 0x06: "RESTART", 0x07: "ERROR", 0x21: "FOLLOW",
}  # fmt: skip
REPLY_FLAG_NOECHO = 0x01
CONTINUE_FLAG_ABORT = 0x01

# authorization (§6)
AUTHOR_STATUS_PASS_ADD = 0x01
AUTHOR_STATUS_PASS_REPL = 0x02
AUTHOR_STATUS_FAIL = 0x10
AUTHOR_STATUS_ERROR = 0x11
AUTHOR_STATUS_NAMES = {
    0x01: "PASS_ADD",
    0x02: "PASS_REPL",
    0x10: "FAIL",
    0x11: "ERROR",
    0x21: "FOLLOW",
}

# accounting (§7)
ACCT_FLAG_START = 0x02
ACCT_FLAG_STOP = 0x04
ACCT_FLAG_WATCHDOG = 0x08
ACCT_STATUS_SUCCESS = 0x01
ACCT_STATUS_ERROR = 0x02
ACCT_STATUS_NAMES = {0x01: "SUCCESS", 0x02: "ERROR", 0x21: "FOLLOW"}

AUTHEN_METH_TACACSPLUS = 0x06
AUTHEN_SVC_LOGIN = 0x01


class TacacsError(ValueError):
    """A malformed TACACS+ packet (or one obfuscated with another secret)."""


class _Reader:
    """Bounds-checked reads from a body; any underrun is a TacacsError."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise TacacsError(f"{self.what}: truncated (need {n} bytes at offset {self.pos})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        v: int = struct.unpack("!H", self.take(2))[0]
        return v

    def end(self) -> None:
        if self.pos != len(self.data):
            raise TacacsError(
                f"{self.what}: {len(self.data) - self.pos} bytes after the last field "
                "(lengths inconsistent; wrong shared secret?)"
            )


# ---------------------------------------------------------------- header


@dataclass(frozen=True)
class Header:
    """The 12-byte cleartext header (RFC 8907 §4.1)."""

    version: int
    type: int
    seq_no: int
    flags: int
    session_id: int
    length: int

    def pack(self) -> bytes:
        return struct.pack(
            "!BBBBII",
            self.version,
            self.type,
            self.seq_no,
            self.flags,
            self.session_id,
            self.length,
        )

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        if len(data) != HEADER_LEN:
            raise TacacsError(f"header: need {HEADER_LEN} bytes, got {len(data)}")
        version, type_, seq_no, flags, session_id, length = struct.unpack("!BBBBII", data)
        if version >> 4 != MAJOR:
            raise TacacsError(f"header: major version {version >> 4:#x}, expected 0xc")
        if type_ not in (AUTHEN, AUTHOR, ACCT):
            raise TacacsError(f"header: unknown packet type {type_:#x}")
        return cls(version, type_, seq_no, flags, session_id, length)


def pseudo_pad(session_id: int, key: bytes, version: int, seq_no: int, length: int) -> bytes:
    """RFC 8907 §4.5: MD5_1 = MD5(session_id‖key‖version‖seq_no), MD5_n appends MD5_n-1."""
    seed = struct.pack("!I", session_id) + key + bytes((version, seq_no))
    out = bytearray()
    prev = b""
    while len(out) < length:
        prev = hashlib.md5(seed + prev).digest()
        out += prev
    return bytes(out[:length])


def obfuscate(header: Header, body: bytes, key: bytes) -> bytes:
    """XOR the body with the pseudo-pad; the same call de-obfuscates."""
    pad = pseudo_pad(header.session_id, key, header.version, header.seq_no, len(body))
    return (int.from_bytes(body, "big") ^ int.from_bytes(pad, "big")).to_bytes(len(body), "big")


def encode_packet(
    *,
    version: int,
    type: int,
    seq_no: int,
    session_id: int,
    body: bytes,
    key: bytes | None,
    flags: int = 0,
) -> bytes:
    """Header ‖ body, obfuscated with ``key`` (or sent with UNENCRYPTED set if None)."""
    if key is None:
        flags |= FLAG_UNENCRYPTED
    else:
        flags &= ~FLAG_UNENCRYPTED
    header = Header(version, type, seq_no, flags, session_id, len(body))
    wire = body if key is None else obfuscate(header, body, key)
    return header.pack() + wire


def decode_body(header: Header, wire_body: bytes, key: bytes | None) -> bytes:
    """Recover the cleartext body; the UNENCRYPTED flag must agree with ``key``."""
    if len(wire_body) != header.length:
        raise TacacsError(f"body: header says {header.length} bytes, got {len(wire_body)}")
    unencrypted = bool(header.flags & FLAG_UNENCRYPTED)
    # RFC 8907 §4.5: a key is configured but the peer sent cleartext (or the
    # reverse): never accept it, the session is ended.
    if key is not None and unencrypted:
        raise TacacsError("body: UNENCRYPTED flag set but a shared secret is configured")
    if key is None and not unencrypted:
        raise TacacsError("body: obfuscated but no shared secret is configured")
    return wire_body if key is None else obfuscate(header, wire_body, key)


# ---------------------------------------------------------------- bodies


def _args_pack(args: tuple[bytes, ...]) -> bytes:
    if len(args) > 255 or any(len(a) > 255 for a in args):
        raise ValueError("at most 255 arguments of at most 255 bytes each")
    return bytes(len(a) for a in args)


def _check8(*fields: bytes) -> None:
    if any(len(f) > 255 for f in fields):
        raise ValueError("user, port and rem_addr are at most 255 bytes")


# Authentication CONTINUE (§5.3) and accounting REPLY (§7.2) share a layout:
# msg_len(2), data_len(2), one octet (flags / status), msg, data.


def _pack_two_fields(msg: bytes, data: bytes, octet: int) -> bytes:
    return struct.pack("!HHB", len(msg), len(data), octet) + msg + data


def _unpack_two_fields(body: bytes, what: str) -> tuple[bytes, bytes, int]:
    r = _Reader(body, what)
    ml, dl, octet = r.u16(), r.u16(), r.u8()
    msg, data = r.take(ml), r.take(dl)
    r.end()
    return msg, data, octet


# Authorization REQUEST (§6.1) and accounting REQUEST (§7.1) share one layout
# after their leading octets: user_len, port_len, rem_addr_len, arg_cnt,
# arg_N_len..., user, port, rem_addr, args.


def _pack_request(
    head: tuple[int, ...], user: bytes, port: bytes, rem_addr: bytes, args: tuple[bytes, ...]
) -> bytes:
    _check8(user, port, rem_addr)
    lens = bytes((*head, len(user), len(port), len(rem_addr), len(args)))
    return lens + _args_pack(args) + user + port + rem_addr + b"".join(args)


def _unpack_request(
    body: bytes, what: str, n_head: int
) -> tuple[bytes, bytes, bytes, bytes, tuple[bytes, ...]]:
    r = _Reader(body, what)
    head = r.take(n_head)
    ul, pl, rl, n = r.take(4)
    lens = r.take(n)
    user, port, rem = r.take(ul), r.take(pl), r.take(rl)
    args = tuple(r.take(x) for x in lens)
    r.end()
    return head, user, port, rem, args


@dataclass(frozen=True)
class AuthenStart:
    """§5.1. ``data`` carries the PAP password or the CHAP response: never printed."""

    action: int
    priv_lvl: int
    authen_type: int
    authen_service: int
    user: bytes
    port: bytes
    rem_addr: bytes
    data: bytes = field(default=b"", repr=False)

    def encode(self) -> bytes:
        _check8(self.user, self.port, self.rem_addr, self.data)
        head = bytes((self.action, self.priv_lvl, self.authen_type, self.authen_service))
        lens = bytes((len(self.user), len(self.port), len(self.rem_addr), len(self.data)))
        return head + lens + self.user + self.port + self.rem_addr + self.data

    @classmethod
    def decode(cls, body: bytes) -> AuthenStart:
        r = _Reader(body, "authentication START")
        action, priv, atype, svc, ul, pl, rl, dl = r.take(8)
        out = cls(action, priv, atype, svc, r.take(ul), r.take(pl), r.take(rl), r.take(dl))
        r.end()
        return out


@dataclass(frozen=True)
class AuthenReply:
    """§5.2."""

    status: int
    flags: int = 0
    server_msg: bytes = b""
    data: bytes = b""

    def encode(self) -> bytes:
        return (
            struct.pack("!BBHH", self.status, self.flags, len(self.server_msg), len(self.data))
            + self.server_msg
            + self.data
        )

    @classmethod
    def decode(cls, body: bytes) -> AuthenReply:
        r = _Reader(body, "authentication REPLY")
        status, flags = r.u8(), r.u8()
        ml, dl = r.u16(), r.u16()
        out = cls(status, flags, r.take(ml), r.take(dl))
        r.end()
        return out


@dataclass(frozen=True)
class AuthenContinue:
    """§5.3. ``user_msg`` is the password answering GETPASS: never printed."""

    user_msg: bytes = field(repr=False)
    data: bytes = b""
    flags: int = 0

    def encode(self) -> bytes:
        return _pack_two_fields(self.user_msg, self.data, self.flags)

    @classmethod
    def decode(cls, body: bytes) -> AuthenContinue:
        user_msg, data, flags = _unpack_two_fields(body, "authentication CONTINUE")
        return cls(user_msg, data, flags)


@dataclass(frozen=True)
class AuthorRequest:
    """§6.1."""

    authen_method: int
    priv_lvl: int
    authen_type: int
    authen_service: int
    user: bytes
    port: bytes
    rem_addr: bytes
    args: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        head = (self.authen_method, self.priv_lvl, self.authen_type, self.authen_service)
        return _pack_request(head, self.user, self.port, self.rem_addr, self.args)

    @classmethod
    def decode(cls, body: bytes) -> AuthorRequest:
        (meth, priv, atype, svc), user, port, rem, args = _unpack_request(
            body, "authorization REQUEST", 4
        )
        return cls(meth, priv, atype, svc, user, port, rem, args)


@dataclass(frozen=True)
class AuthorResponse:
    """§6.2."""

    status: int
    args: tuple[bytes, ...] = ()
    server_msg: bytes = b""
    data: bytes = b""

    def encode(self) -> bytes:
        return (
            struct.pack("!BBHH", self.status, len(self.args), len(self.server_msg), len(self.data))
            + _args_pack(self.args)
            + self.server_msg
            + self.data
            + b"".join(self.args)
        )

    @classmethod
    def decode(cls, body: bytes) -> AuthorResponse:
        r = _Reader(body, "authorization RESPONSE")
        status, n = r.u8(), r.u8()
        ml, dl = r.u16(), r.u16()
        lens = r.take(n)
        msg, data = r.take(ml), r.take(dl)
        args = tuple(r.take(x) for x in lens)
        r.end()
        return cls(status, args, msg, data)


@dataclass(frozen=True)
class AcctRequest:
    """§7.1."""

    flags: int
    authen_method: int
    priv_lvl: int
    authen_type: int
    authen_service: int
    user: bytes
    port: bytes
    rem_addr: bytes
    args: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        head = (
            self.flags,
            self.authen_method,
            self.priv_lvl,
            self.authen_type,
            self.authen_service,
        )
        return _pack_request(head, self.user, self.port, self.rem_addr, self.args)

    @classmethod
    def decode(cls, body: bytes) -> AcctRequest:
        (flags, meth, priv, atype, svc), user, port, rem, args = _unpack_request(
            body, "accounting REQUEST", 5
        )
        return cls(flags, meth, priv, atype, svc, user, port, rem, args)


@dataclass(frozen=True)
class AcctReply:
    """§7.2."""

    status: int
    server_msg: bytes = b""
    data: bytes = b""

    def encode(self) -> bytes:
        return _pack_two_fields(self.server_msg, self.data, self.status)

    @classmethod
    def decode(cls, body: bytes) -> AcctReply:
        server_msg, data, status = _unpack_two_fields(body, "accounting REPLY")
        return cls(status, server_msg, data)
