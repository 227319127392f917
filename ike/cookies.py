"""Stateless COOKIEs (RFC 7296 §2.6): what a responder under load asks an
initiator to echo before it keeps any state for it.

:class:`CookieJar` makes and checks them; :func:`_cookie_and_nonce` reads what
an IKE_SA_INIT request echoes. :class:`ike.endpoint.IkeEndpoint` uses both.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable

from .buffer import DecodeError
from .constants import IKE_HEADER_LEN, NotifyType, PayloadType


class CookieJar:
    """Stateless COOKIEs (§2.6): Cookie = VersionIDofSecret | Hash(Ni | IPi | SPIi | secret).

    The secret is replaced every ``rotation`` seconds; cookies made with the
    previous secret stay valid for one more period.
    """

    def __init__(self, rng: Callable[[int], bytes], rotation: float = 300.0) -> None:
        self._rng = rng
        self.rotation = rotation
        self._version = 0
        self._secrets: dict[int, bytes] = {}
        self._rotated_at: float | None = None

    def _rotate(self, now: float) -> None:
        if self._rotated_at is None or now - self._rotated_at >= self.rotation:
            self._version = (self._version + 1) & 0xFFFFFFFF
            self._secrets = {
                self._version: self._rng(32),
                **{k: v for k, v in self._secrets.items() if k == self._version - 1},
            }
            self._rotated_at = now

    def _make(self, version: int, ni: bytes, ip: str, spi_i: bytes) -> bytes | None:
        secret = self._secrets.get(version)
        if secret is None:
            return None
        digest = hashlib.sha256(ni + ipaddress.ip_address(ip).packed + spi_i + secret).digest()
        return version.to_bytes(4, "big") + digest

    def make(self, ni: bytes, ip: str, spi_i: bytes, now: float) -> bytes:
        self._rotate(now)
        cookie = self._make(self._version, ni, ip, spi_i)
        assert cookie is not None
        return cookie

    def check(self, cookie: bytes, ni: bytes, ip: str, spi_i: bytes, now: float) -> bool:
        self._rotate(now)
        if len(cookie) != 36:
            return False
        want = self._make(int.from_bytes(cookie[:4], "big"), ni, ip, spi_i)
        return want is not None and hmac.compare_digest(want, cookie)


_NOTIFY = int(PayloadType.NOTIFY)
_NONCE = int(PayloadType.NONCE)
_COOKIE = int(NotifyType.COOKIE)


def _cookie_and_nonce(body: bytes) -> tuple[bytes | None, bytes]:
    """The data of a leading N(COOKIE) (§2.6: it is the first payload) and the first
    nonce of an IKE_SA_INIT request, read from the generic payload headers (§3.2)
    only: during a storm every request is checked, and the SA and KE payloads
    need not be decoded for that (the new SA decodes the request once it is let in)."""
    nxt = body[16]  # (parse_header checked the length: at least the header is there)
    pos = IKE_HEADER_LEN
    cookie: bytes | None = None
    nonce: bytes | None = None
    first = True
    while nxt != 0:
        if pos + 4 > len(body):
            raise DecodeError("truncated payload header")
        following = body[pos]
        length = int.from_bytes(body[pos + 2 : pos + 4], "big")
        if length < 4 or pos + length > len(body):
            raise DecodeError(f"payload length {length} at {pos}")
        if first and nxt == _NOTIFY and length >= 8:
            spi_size = body[pos + 5]
            if int.from_bytes(body[pos + 6 : pos + 8], "big") == _COOKIE and 8 + spi_size <= length:
                cookie = body[pos + 8 + spi_size : pos + length]
        elif nxt == _NONCE and nonce is None:
            nonce = body[pos + 4 : pos + length]
        nxt, pos, first = following, pos + length, False
    if nonce is None:
        raise DecodeError("no nonce")
    return cookie, nonce
