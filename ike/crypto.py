"""IKEv2 cryptography: DH groups, PRF/prf+, key derivation and the SK payload.

Everything goes through pyca/cryptography, except the PRF: HMAC built on
``hashlib`` (the same HMAC, cheaper per call; see ``KeyedHmac``).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import dh, ec, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.utils import CryptographyDeprecationWarning

from .constants import DhGroup, EncrId, IntegId, PrfId


class CryptoError(Exception):
    """Base for the typed crypto errors below."""


class InvalidKeyExchange(CryptoError):
    """The peer's KE data is not a valid public value for its group."""


class IntegrityError(CryptoError):
    """An SK payload failed its ICV / integrity check (or is malformed inside)."""


# --- Diffie-Hellman ----------------------------------------------------------

# RFC 3526 §3: the 2048-bit MODP group, generator 2
MODP_2048_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A0879"
    "8E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0B"
    "FF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55"
    "D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C"
    "08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16,
)


@contextmanager
def _ffdh() -> Iterator[None]:
    # cryptography >= 50 warns that FFDH is deprecated on every use of the dh
    # module; group 14 is still the RFC 8247 MUST, so silence exactly that here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        yield


with _ffdh():
    _MODP_2048_PARAMS = dh.DHParameterNumbers(MODP_2048_P, 2).parameters()
_MODP_LEN = 256
_CURVES: dict[int, tuple[ec.EllipticCurve, int]] = {
    DhGroup.ECP_256: (ec.SECP256R1(), 32),
    DhGroup.ECP_384: (ec.SECP384R1(), 48),
}
SUPPORTED_GROUPS = (DhGroup.MODP_2048, DhGroup.ECP_256, DhGroup.ECP_384, DhGroup.CURVE25519)


class DhKey:
    """One side's ephemeral key: ``public`` is the KE payload data (§3.4)."""

    __slots__ = ("_ec", "_modp", "_x", "group", "public")

    def __init__(
        self,
        group: int,
        priv: dh.DHPrivateKey | ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey,
    ) -> None:
        self.group = group
        self._modp: dh.DHPrivateKey | None = None
        self._ec: ec.EllipticCurvePrivateKey | None = None
        self._x: x25519.X25519PrivateKey | None = None
        if isinstance(priv, ec.EllipticCurvePrivateKey):
            self._ec = priv
            n = priv.public_key().public_numbers()
            size = _CURVES[group][1]
            # RFC 5903 §7: x || y, no point-format octet
            self.public = n.x.to_bytes(size, "big") + n.y.to_bytes(size, "big")
        elif isinstance(priv, x25519.X25519PrivateKey):
            self._x = priv
            self.public = priv.public_key().public_bytes_raw()  # RFC 8031 §3
        else:
            self._modp = priv
            with _ffdh():
                y = priv.public_key().public_numbers().y
            self.public = y.to_bytes(_MODP_LEN, "big")  # padded to the prime size

    def __repr__(self) -> str:
        return f"DhKey(group={self.group})"

    def shared_secret(self, peer: bytes) -> bytes:
        """g^ir as it enters SKEYSEED; raises InvalidKeyExchange on a bad peer value."""
        try:
            if self._modp is not None:
                if len(peer) != _MODP_LEN:
                    raise InvalidKeyExchange("MODP KE data must be 256 bytes")
                y = int.from_bytes(peer, "big")
                if not 1 < y < MODP_2048_P - 1:  # RFC 7296 §5 / SP 800-56A range check
                    raise InvalidKeyExchange("MODP public value out of range")
                with _ffdh():
                    pn = _MODP_2048_PARAMS.parameter_numbers()
                    out = self._modp.exchange(dh.DHPublicNumbers(y, pn).public_key())
                return out.rjust(_MODP_LEN, b"\x00")
            if self._ec is not None:
                curve, size = _CURVES[self.group]
                if len(peer) != 2 * size:
                    raise InvalidKeyExchange("ECP KE data has the wrong length")
                # from_encoded_point checks that the point is on the curve
                pub_ec = ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + peer)
                return self._ec.exchange(ec.ECDH(), pub_ec)
            assert self._x is not None
            if len(peer) != 32:
                raise InvalidKeyExchange("Curve25519 KE data must be 32 bytes")
            pub_x = x25519.X25519PublicKey.from_public_bytes(peer)
            return self._x.exchange(pub_x)  # raises on an all-zero result (RFC 8031 §2)
        except InvalidKeyExchange:
            raise
        except ValueError as exc:
            raise InvalidKeyExchange(str(exc)) from exc


def dh_generate(group: int) -> DhKey:
    if group == DhGroup.MODP_2048:
        with _ffdh():
            return DhKey(group, _MODP_2048_PARAMS.generate_private_key())
    if group in _CURVES:
        return DhKey(group, ec.generate_private_key(_CURVES[group][0]))
    if group == DhGroup.CURVE25519:
        return DhKey(group, x25519.X25519PrivateKey.generate())
    raise ValueError(f"unsupported DH group {group}")


def dh_from_private(group: int, priv: bytes) -> DhKey:
    """A key from known private bytes (known-answer tests)."""
    if group == DhGroup.MODP_2048:
        x = int.from_bytes(priv, "big")
        with _ffdh():
            pn = _MODP_2048_PARAMS.parameter_numbers()
            pub = dh.DHPublicNumbers(pow(2, x, MODP_2048_P), pn)
            return DhKey(group, dh.DHPrivateNumbers(x, pub).private_key())
    if group in _CURVES:
        return DhKey(group, ec.derive_private_key(int.from_bytes(priv, "big"), _CURVES[group][0]))
    if group == DhGroup.CURVE25519:
        return DhKey(group, x25519.X25519PrivateKey.from_private_bytes(priv))
    raise ValueError(f"unsupported DH group {group}")


# --- PRF (§2.13) ---------------------------------------------------------------

_PRF_HASH = {
    PrfId.HMAC_SHA1: "sha1",
    PrfId.HMAC_SHA2_256: "sha256",
    PrfId.HMAC_SHA2_384: "sha384",
    PrfId.HMAC_SHA2_512: "sha512",
}


# HMAC (RFC 2104) from hashlib objects: the key XOR ipad / opad are hashed
# once, and each MAC under that key copies the two states. In CPython 3.11 with
# OpenSSL 3 ``hmac.digest`` costs ~2.6 us per call (a digest fetch and a key
# schedule every time); a keyed copy costs ~0.65 us, a one-shot ~1.5 us. An IKE
# handshake makes ~16 PRF calls per side, 9 of them prf+ blocks under one key.
_IPAD = bytes(b ^ 0x36 for b in range(256))  # bytes.translate tables: XOR each octet
_OPAD = bytes(b ^ 0x5C for b in range(256))


class KeyedHmac:
    """HMAC under one key: the hash states after the ipad and opad blocks."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, new: Callable[[], Any], block: int, key: bytes) -> None:
        if len(key) > block:  # RFC 2104 §2: a key longer than a block is hashed first
            h = new()
            h.update(key)
            key = h.digest()
        key = key.ljust(block, b"\x00")
        self._inner = new()
        self._inner.update(key.translate(_IPAD))
        self._outer = new()
        self._outer.update(key.translate(_OPAD))

    def mac(self, data: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Prf:
    prf_id: int
    hash_name: str
    size: int
    _new: Callable[[], Any] = field(repr=False, compare=False)  # e.g. hashlib.sha256
    _block: int = field(repr=False, compare=False)

    def __call__(self, key: bytes, data: bytes) -> bytes:
        return KeyedHmac(self._new, self._block, key).mac(data)

    def keyed(self, key: bytes) -> KeyedHmac:
        """This PRF under ``key``, for several messages (``.mac(data)``)."""
        return KeyedHmac(self._new, self._block, key)

    def plus(self, key: bytes, seed: bytes, length: int) -> bytes:
        """prf+ (§2.13): T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n)."""
        if length > 255 * self.size:
            raise ValueError("prf+ output limited to 255 blocks")
        keyed = KeyedHmac(self._new, self._block, key)
        out = bytearray()
        t = b""
        n = 1
        while len(out) < length:
            t = keyed.mac(t + seed + bytes([n]))
            out += t
            n += 1
        return bytes(out[:length])


@functools.cache  # a handful of PRFs; Prf is frozen
def get_prf(prf_id: int) -> Prf:
    name = _PRF_HASH[PrfId(prf_id)]
    new = getattr(hashlib, name)  # the named constructor: cheaper than hashlib.new(name)
    h = new()
    return Prf(prf_id, name, h.digest_size, new, h.block_size)


def skeyseed(prf: Prf, ni: bytes, nr: bytes, g_ir: bytes) -> bytes:
    """§2.14: SKEYSEED = prf(Ni | Nr, g^ir)."""
    return prf(ni + nr, g_ir)


def skeyseed_rekey(prf: Prf, sk_d: bytes, g_ir_new: bytes, ni: bytes, nr: bytes) -> bytes:
    """§2.18: SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr), old SA's PRF."""
    return prf(sk_d, g_ir_new + ni + nr)


def child_keymat(
    prf: Prf, sk_d: bytes, ni: bytes, nr: bytes, length: int, g_ir: bytes = b""
) -> bytes:
    """§2.17: KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr)."""
    return prf.plus(sk_d, g_ir + ni + nr, length)


# --- Algorithms of the IKE SA ----------------------------------------------------

_INTEG = {
    IntegId.HMAC_SHA2_256_128: ("sha256", 32, 16),
    IntegId.HMAC_SHA2_384_192: ("sha384", 48, 24),
    IntegId.HMAC_SHA2_512_256: ("sha512", 64, 32),
}

GCM_SALT = 4
GCM_IV = 8
GCM_ICV = 16


def encr_key_size(encr: int, key_bits: int) -> int:
    """Bytes of SK_e (or one direction of ESP KEYMAT): GCM adds the salt (RFC 5282 §7.1)."""
    return key_bits // 8 + (GCM_SALT if encr == EncrId.AES_GCM_16 else 0)


def integ_key_size(integ: int) -> int:
    return 0 if integ == IntegId.NONE else _INTEG[IntegId(integ)][1]


@dataclass(frozen=True, slots=True)  # one or more per IKE SA
class IkeSuite:
    """The negotiated IKE SA transforms."""

    encr: int
    key_bits: int
    prf: int
    integ: int
    dh: int

    @property
    def aead(self) -> bool:
        return self.encr == EncrId.AES_GCM_16


@dataclass(repr=False, slots=True)
class IkeKeys:
    """SK_d, SK_ai, SK_ar, SK_ei, SK_er, SK_pi, SK_pr (§2.14), in that order."""

    sk_d: bytes
    sk_ai: bytes
    sk_ar: bytes
    sk_ei: bytes
    sk_er: bytes
    sk_pi: bytes
    sk_pr: bytes

    def __repr__(self) -> str:
        return "IkeKeys(<secret>)"

    def after_auth(self) -> IkeKeys:
        """The keys without SK_pi and SK_pr, which only the AUTH payloads use (§2.15)."""
        return replace(self, sk_pi=b"", sk_pr=b"")


def derive_ike_keys(
    prf: Prf, seed: bytes, suite: IkeSuite, ni: bytes, nr: bytes, spi_i: bytes, spi_r: bytes
) -> IkeKeys:
    """§2.14: {SK_d | SK_ai | ...} = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr)."""
    e = encr_key_size(suite.encr, suite.key_bits)
    a = integ_key_size(suite.integ)
    sizes = [prf.size, a, a, e, e, prf.size, prf.size]
    km = prf.plus(seed, ni + nr + spi_i + spi_r, sum(sizes))
    parts: list[bytes] = []
    pos = 0
    for s in sizes:
        parts.append(km[pos : pos + s])
        pos += s
    return IkeKeys(*parts)


# --- SK payload protection (§3.14, RFC 5282) -----------------------------------------


@dataclass(repr=False, slots=True)
class SkCipher:
    """Protects SK payloads in one direction.

    One per direction of every IKE SA, so 10,000s on a responder: no AESGCM object is
    kept. Each holds two OpenSSL cipher contexts (~1.3 KB outside Python's heap, the
    largest single cost of an idle IKE SA); building one costs ~1 µs, nothing next to
    an IKE message, which is rare once the SA is up (liveness, rekey).
    """

    encr: int
    enc_key: bytes = field(repr=False)
    integ: int = IntegId.NONE
    integ_key: bytes = field(default=b"", repr=False)
    _iv_counter: int = 0
    _gcm: bool = field(default=False, init=False)
    _hash: str = field(default="", init=False)
    _trunc: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.encr == EncrId.AES_GCM_16:
            AESGCM(self.enc_key[:-GCM_SALT])  # a bad key length fails here, not later
            self._gcm = True
        else:
            name, _, trunc = _INTEG[IntegId(self.integ)]
            self._hash, self._trunc = name, trunc

    def __repr__(self) -> str:
        return f"SkCipher(encr={self.encr}, integ={self.integ})"

    def seal(self, inner: bytes, prefix: Callable[[int], bytes]) -> bytes:
        """Whole message: ``prefix(total_len)`` (IKE header ... SK header), IV, ciphertext, ICV."""
        if self._gcm:
            # RFC 5282 §3: 8-byte IV, unique per key; a counter cannot repeat
            self._iv_counter += 1
            iv = self._iv_counter.to_bytes(GCM_IV, "big")
            pt = inner + b"\x00"  # Pad Length 0: GCM needs no block padding
            aad = prefix(len_prefix_probe(prefix) + GCM_IV + len(pt) + GCM_ICV)
            key, salt = self.enc_key[:-GCM_SALT], self.enc_key[-GCM_SALT:]
            return aad + iv + AESGCM(key).encrypt(salt + iv, pt, aad)
        iv = os.urandom(16)  # §3.14: CBC IVs must be unpredictable
        padlen = 15 - len(inner) % 16
        pt = inner + bytes(padlen) + bytes([padlen])
        enc = Cipher(algorithms.AES(self.enc_key), modes.CBC(iv)).encryptor()
        ct = enc.update(pt) + enc.finalize()
        head = prefix(len_prefix_probe(prefix) + 16 + len(ct) + self._trunc)
        body = head + iv + ct
        return body + hmac.digest(self.integ_key, body, self._hash)[: self._trunc]

    def open(self, data: bytes, sk_offset: int) -> bytes:
        """Decrypt the SK payload at ``sk_offset``; return the inner payload chain."""
        start = sk_offset + 4
        try:
            if self._gcm:
                if len(data) - start < GCM_IV + GCM_ICV + 1:
                    raise IntegrityError("SK payload too short")
                iv = data[start : start + GCM_IV]
                gcm = AESGCM(self.enc_key[:-GCM_SALT])
                pt = gcm.decrypt(
                    self.enc_key[-GCM_SALT:] + iv, data[start + GCM_IV :], data[:start]
                )
            else:
                n = len(data) - start - 16 - self._trunc
                if n <= 0 or n % 16:
                    raise IntegrityError("SK payload length not a block multiple")
                icv = data[-self._trunc :]
                want = hmac.digest(self.integ_key, data[: -self._trunc], self._hash)
                # §3.14: verify integrity before decrypting
                if not hmac.compare_digest(icv, want[: self._trunc]):
                    raise IntegrityError("integrity check failed")
                iv = data[start : start + 16]
                dec = Cipher(algorithms.AES(self.enc_key), modes.CBC(iv)).decryptor()
                pt = dec.update(data[start + 16 : -self._trunc]) + dec.finalize()
        except InvalidTag as exc:
            raise IntegrityError("ICV check failed") from exc
        padlen = pt[-1]
        if padlen + 1 > len(pt):
            raise IntegrityError("pad length exceeds plaintext")
        return pt[: len(pt) - padlen - 1]


def len_prefix_probe(prefix: Callable[[int], bytes]) -> int:
    """Length of the prefix (it does not depend on the total length passed in)."""
    return len(prefix(0))
