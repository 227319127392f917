"""Known-answer tests: NIST CAVP IKEv2 KDF and RFC 5903/7748/8031 DH vectors."""

from __future__ import annotations

import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ike.constants import DhGroup, EncrId, IntegId, PrfId
from ike.crypto import (
    SUPPORTED_GROUPS,
    IkeSuite,
    IntegrityError,
    InvalidKeyExchange,
    SkCipher,
    child_keymat,
    derive_ike_keys,
    dh_from_private,
    dh_generate,
    get_prf,
    skeyseed,
    skeyseed_rekey,
)

VECTORS = Path(__file__).parent.parent / "vectors"
KDF = json.loads((VECTORS / "ikev2_kdf.json").read_text())
DH = json.loads((VECTORS / "ikev2_dh.json").read_text())
PRF_BY_HASH = {
    "SHA-1": PrfId.HMAC_SHA1,
    "SHA-256": PrfId.HMAC_SHA2_256,
    "SHA-384": PrfId.HMAC_SHA2_384,
    "SHA-512": PrfId.HMAC_SHA2_512,
}


def h(v: str) -> bytes:
    return bytes.fromhex(v)


@pytest.mark.parametrize("v", KDF, ids=[v["id"] for v in KDF])
def test_kdf_cavp(v: dict[str, Any]) -> None:
    prf = get_prf(PRF_BY_HASH[v["hash"]])
    ni, nr = h(v["ni"]), h(v["nr"])
    seed = skeyseed(prf, ni, nr, h(v["g_ir"]))
    assert seed.hex() == v["skeyseed"]
    dkm_len = int(v["dkm_bits"]) // 8
    dkm = prf.plus(seed, ni + nr + h(v["spi_i"]) + h(v["spi_r"]), dkm_len)
    assert dkm.hex() == v["dkm"]
    if v["dkm_child_sa"] is None:
        return
    sk_d = dkm[: prf.size]
    clen = int(v["child_dkm_bits"]) // 8
    assert child_keymat(prf, sk_d, ni, nr, clen).hex() == v["dkm_child_sa"]
    g_new = h(v["g_ir_new"])
    assert child_keymat(prf, sk_d, ni, nr, clen, g_new).hex() == v["dkm_child_sa_dh"]
    assert skeyseed_rekey(prf, sk_d, g_new, ni, nr).hex() == v["skeyseed_rekey"]


# RFC 4231 §4.7 (test case 6): a 131-byte key, longer than the SHA-2 block, is
# hashed first (RFC 2104 §2). The PRF is HMAC on hashlib states, not ``hmac``.
RFC4231_CASE6 = {
    PrfId.HMAC_SHA2_256: "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
    PrfId.HMAC_SHA2_384: "4ece084485813e9088d2c63a041bc5b44f9ef1012a2b588f3cd11f05033ac4c6"
    "0c2ef6ab4030fe8296248df163f44952",
    PrfId.HMAC_SHA2_512: "80b24263c7c1a3ebb71493c1dd7be8b49b46d1f41b4aeec1121b013783f8f352"
    "6b56d037e05f2598bd0fd2215d6a1e5295e64f73f63f0aec8b915a985d786598",
}


@pytest.mark.parametrize("prf_id", list(RFC4231_CASE6), ids=lambda p: p.name)
def test_prf_rfc4231_long_key(prf_id: PrfId) -> None:
    data = b"Test Using Larger Than Block-Size Key - Hash Key First"
    assert get_prf(prf_id)(b"\xaa" * 131, data).hex() == RFC4231_CASE6[prf_id]


@pytest.mark.parametrize("prf_id", list(PRF_BY_HASH.values()), ids=lambda p: p.name)
@pytest.mark.parametrize("key_len", [0, 1, 20, 32, 63, 64, 65, 127, 128, 129, 300])
def test_prf_matches_stdlib_hmac(prf_id: PrfId, key_len: int) -> None:
    """Every key length around the block sizes (64 and 128 bytes), one-shot and prf+."""
    prf = get_prf(prf_id)
    key = bytes(range(256))[::-1][:key_len] + bytes(max(0, key_len - 256))
    data = b"IKEv2 PRF check " * 5
    assert prf(key, data) == hmac.digest(key, data, prf.hash_name)
    t1 = hmac.digest(key, data + b"\x01", prf.hash_name)
    t2 = hmac.digest(key, t1 + data + b"\x02", prf.hash_name)
    assert prf.plus(key, data, prf.size + 5) == (t1 + t2)[: prf.size + 5]


def test_derive_ike_keys_splits_dkm_in_rfc_order() -> None:
    """§2.14: SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr, from one prf+ stream."""
    v = next(x for x in KDF if x["hash"] == "SHA-256" and x["dkm_child_sa"])
    prf = get_prf(PrfId.HMAC_SHA2_256)
    suite = IkeSuite(EncrId.AES_CBC, 128, PrfId.HMAC_SHA2_256, IntegId.HMAC_SHA2_256_128, 14)
    seed = h(v["skeyseed"])
    ni, nr, si, sr = h(v["ni"]), h(v["nr"]), h(v["spi_i"]), h(v["spi_r"])
    k = derive_ike_keys(prf, seed, suite, ni, nr, si, sr)
    stream = prf.plus(seed, ni + nr + si + sr, 32 * 3 + 32 * 2 + 16 * 2)
    assert k.sk_d + k.sk_ai + k.sk_ar + k.sk_ei + k.sk_er + k.sk_pi + k.sk_pr == stream
    assert stream[:32].hex() == v["dkm"][:64]  # SK_d = first prf-length bytes of the DKM
    assert "secret" in repr(k) and k.sk_d.hex() not in repr(k)


SUPPORTED_DH = [v for v in DH if int(v["group"]) in SUPPORTED_GROUPS]


@pytest.mark.parametrize("v", SUPPORTED_DH, ids=[v["id"] for v in SUPPORTED_DH])
def test_dh_vectors(v: dict[str, Any]) -> None:
    g = int(v["group"])
    a = dh_from_private(g, h(v["priv_i"]))
    b = dh_from_private(g, h(v["priv_r"]))
    assert a.public.hex() == v["ke_data_i"]
    assert b.public.hex() == v["ke_data_r"]
    assert a.shared_secret(b.public).hex() == v["shared_secret"]
    assert b.shared_secret(a.public).hex() == v["shared_secret"]


@pytest.mark.parametrize("v", SUPPORTED_DH, ids=[v["id"] for v in SUPPORTED_DH])
def test_ke_payload_bytes(v: dict[str, Any]) -> None:
    from ike.payloads import KEPayload, build_chain

    a = dh_from_private(int(v["group"]), h(v["priv_i"]))
    assert build_chain([KEPayload(a.group, a.public)]).hex() == v["ke_payload_i"]


@pytest.mark.parametrize("group", SUPPORTED_GROUPS)
def test_dh_rejects_bad_public_values(group: int) -> None:
    k = dh_generate(group)
    with pytest.raises(InvalidKeyExchange):
        k.shared_secret(b"\x01" * 5)  # wrong length
    if group == DhGroup.MODP_2048:
        bad = [b"\x00" * 256, b"\x00" * 255 + b"\x01", b"\xff" * 256]
    elif group == DhGroup.CURVE25519:
        bad = [b"\x00" * 32]  # small-order point: all-zero shared secret (RFC 8031 §2)
    else:
        bad = [b"\x00" * len(k.public), b"\x01" * len(k.public)]  # not on the curve
    for b in bad:
        with pytest.raises(InvalidKeyExchange):
            k.shared_secret(b)


def _prefix(total: int) -> bytes:
    return b"H" * 28 + bytes([41, 0]) + max(total - 28, 0).to_bytes(2, "big")


def test_sk_gcm_matches_rfc5282_construction() -> None:
    """Nonce = salt | IV, AAD = IKE header .. SK header, Pad Length byte inside (RFC 5282 §3-5)."""
    key = bytes(range(36))
    c = SkCipher(EncrId.AES_GCM_16, key)
    msg = c.seal(b"inner", _prefix)
    assert int.from_bytes(msg[30:32], "big") == len(msg) - 28
    iv = msg[32:40]
    want = AESGCM(key[:32]).encrypt(key[32:] + iv, b"inner\x00", msg[:32])
    assert msg[40:] == want
    assert SkCipher(EncrId.AES_GCM_16, key).open(msg, 28) == b"inner"


@pytest.mark.parametrize(
    "integ", [IntegId.HMAC_SHA2_256_128, IntegId.HMAC_SHA2_384_192, IntegId.HMAC_SHA2_512_256]
)
def test_sk_cbc_round_trip_and_tamper(integ: int) -> None:
    ka = {12: 32, 13: 48, 14: 64}[integ]
    c = SkCipher(EncrId.AES_CBC, b"k" * 32, integ, b"a" * ka)
    for n in (0, 1, 15, 16, 17, 100):
        msg = c.seal(b"x" * n, _prefix)
        assert (len(msg) - 28 - 4 - 16 - ka // 2) % 16 == 0
        assert c.open(msg, 28) == b"x" * n
        for pos in (0, 31, 40, len(msg) - 1):
            bad = bytearray(msg)
            bad[pos] ^= 1
            with pytest.raises(IntegrityError):
                c.open(bytes(bad), 28)


def test_sk_gcm_rejects_tamper_and_truncation() -> None:
    c = SkCipher(EncrId.AES_GCM_16, b"k" * 20)
    msg = c.seal(b"hello", _prefix)
    for pos in range(len(msg)):
        bad = bytearray(msg)
        bad[pos] ^= 0x80
        with pytest.raises(IntegrityError):
            c.open(bytes(bad), 28)
    for cut in (29, 40, 56):
        with pytest.raises(IntegrityError):
            c.open(msg[:cut], 28)
