"""TACACS+ codec against published packets (FreeRADIUS's pam_tacplus capture, scapy's tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipsecmgr.lab import tacacs as t

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent.parent / "vectors" / "tacacs.json").read_text()
)


def _decoder(v: dict[str, Any]) -> Any:
    layout = v["body_layout"]
    kind = layout.split(":")[0]
    return {
        "authentication START": t.AuthenStart,
        "authentication REPLY": t.AuthenReply,
        "authentication CONTINUE": t.AuthenContinue,
        "authorization REQUEST": t.AuthorRequest,
        "authorization REPLY": t.AuthorResponse,
        "accounting REQUEST": t.AcctRequest,
        "accounting REPLY": t.AcctReply,
    }[kind]


@pytest.mark.parametrize("v", VECTORS, ids=[v["id"] for v in VECTORS])
def test_pseudo_pad_and_deobfuscation(v: dict[str, Any]) -> None:
    key = bytes.fromhex(v["secret_hex"])
    pad = t.pseudo_pad(v["session_id"], key, v["version"], v["seq_no"], v["length"])
    assert pad.hex() == v["pseudo_pad"]
    packet = bytes.fromhex(v["packet"])
    header = t.Header.unpack(packet[:12])
    assert (header.version, header.type, header.seq_no, header.flags) == (
        v["version"], v["type"], v["seq_no"], v["flags"],
    )  # fmt: skip
    assert (header.session_id, header.length) == (v["session_id"], v["length"])
    assert t.decode_body(header, packet[12:], key).hex() == v["body_plain"]


@pytest.mark.parametrize("v", VECTORS, ids=[v["id"] for v in VECTORS])
def test_body_decode_and_reencode_byte_exact(v: dict[str, Any]) -> None:
    body = bytes.fromhex(v["body_plain"])
    msg = _decoder(v).decode(body)
    assert msg.encode() == body
    # and the whole packet, header and obfuscation included
    wire = t.encode_packet(
        version=v["version"], type=v["type"], seq_no=v["seq_no"], session_id=v["session_id"],
        body=msg.encode(), key=bytes.fromhex(v["secret_hex"]), flags=v["flags"],
    )  # fmt: skip
    assert wire.hex() == v["packet"]


def test_fields_of_the_pap_start() -> None:
    v = next(x for x in VECTORS if x["id"] == "freeradius-tacacs-authen-start-pap")
    s = t.AuthenStart.decode(bytes.fromhex(v["body_plain"]))
    assert (s.action, s.authen_type, s.user, s.port, s.rem_addr) == (
        t.AUTHEN_LOGIN, t.AUTHEN_TYPE_PAP, b"bob", b"tapioca/0", b"localhost",
    )  # fmt: skip
    assert s.data == b"hello" and "hello" not in repr(s)  # the password never prints


def test_wrong_secret_is_a_typed_error() -> None:
    v = next(x for x in VECTORS if x["id"] == "freeradius-tacacs-author-request")
    packet = bytes.fromhex(v["packet"])
    header = t.Header.unpack(packet[:12])
    with pytest.raises(t.TacacsError):
        t.AuthorRequest.decode(t.decode_body(header, packet[12:], b"wrong-secret"))


def test_header_checks() -> None:
    with pytest.raises(t.TacacsError, match="major version"):
        t.Header.unpack(bytes.fromhex("d1010100b70fc80e00000022"))
    with pytest.raises(t.TacacsError, match="packet type"):
        t.Header.unpack(bytes.fromhex("c1090100b70fc80e00000022"))
    h = t.Header.unpack(bytes.fromhex("c1010101b70fc80e00000001"))  # UNENCRYPTED flag
    with pytest.raises(t.TacacsError, match="UNENCRYPTED"):
        t.decode_body(h, b"\0", b"key")
    assert t.decode_body(h, b"\0", None) == b"\0"


@given(st.binary(max_size=300))
def test_decoders_raise_only_tacacs_error(data: bytes) -> None:
    for cls in (t.AuthenStart, t.AuthenReply, t.AuthenContinue, t.AuthorRequest,
                t.AuthorResponse, t.AcctRequest, t.AcctReply):  # fmt: skip
        try:
            msg = cls.decode(data)  # type: ignore[attr-defined]
        except t.TacacsError:
            continue
        assert msg.encode() == data
