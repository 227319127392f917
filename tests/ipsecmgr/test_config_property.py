"""Property (issue #15 item 2): any file, valid or broken, gives a config or a ConfigError.

Hypothesis generates TOML documents from a valid configuration by mutating it
(a value replaced by one of any TOML type and range, a key removed, an unknown
key added, a section replaced), plus raw bytes (binary files) and text. For
each, ``load_config`` (what ``run`` does, with the daemon's ACL validator) either
returns a :class:`Config` or raises :class:`ConfigError`, and ``diagnose_config``
(what ``check-config`` does) agrees with it. Nothing else: no AssertionError,
UnicodeDecodeError, RecursionError, TypeError.
"""

from __future__ import annotations

import atexit
import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipsecmgr.config import Config, ConfigError, diagnose_config, load_config
from ipsecmgr.daemon import validate_acl

_DIR = tempfile.mkdtemp(prefix="ipsecmgr-config-prop-")
atexit.register(shutil.rmtree, _DIR, True)
os.chmod(_DIR, 0o700)
PSK = os.path.join(_DIR, "psk")
with open(PSK, "wb") as _f:
    _f.write(b"correct horse battery staple")
os.chmod(PSK, 0o600)

VALID: dict[str, Any] = {
    "access_list": {
        "foo": {
            "rules": [
                "deny tcp host 192.0.2.1 host 203.0.113.49 eq 23",
                "permit tcp host 192.0.2.1 host 203.0.113.49 eq 49",
            ]
        }
    },
    "ike_transform_set": {"ikesa-foo": {"dh_group": 14, "lifetime": 86400}},
    "ipsec_transform_set": {
        "B-foo": {"mode": "tunnel", "lifetime_seconds": 3600, "lifetime_bytes": 1 << 30}
    },
    "crypto_map": {
        "foo": {
            "match_address": "foo",
            "local_psk": {"file": PSK},
            "ike_transform_sets": ["ikesa-foo"],
            "ipsec_transform_sets": ["B-foo"],
            "src_ip": "192.0.2.1",
            "dpd": {"interval": 30, "timeout": 10, "retries": 3},
            "nat_keepalive": 20.0,
            "retransmission_timeout": 2000,
            "queue_size": 8,
            "peers": ["198.51.100.2", "198.51.100.3"],
            "preempt": True,
            "on_unreachable": "icmp",
        }
    },
    "tun": {"tun-foo": {"addresses": ["192.0.2.1/32"], "crypto_maps": ["foo"], "mtu": 1400}},
    "gateway": {
        "local_addresses": ["198.51.100.1"],
        "management_interface": "eth0",
        "control_socket": os.path.join(_DIR, "run", "control.sock"),
        "on_stop": "block",
    },
    "metrics": {"listen": "127.0.0.1:9754"},
}


def _key(k: str) -> str:
    return json.dumps(k)  # a TOML basic string is a JSON string (BMP characters)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(doc: dict[str, Any]) -> str:
    """Top-level tables become ``[a.b]`` headers, the rest inline values."""
    lines: list[str] = []
    for name, section in doc.items():
        if isinstance(section, dict) and all(isinstance(t, dict) for t in section.values()):
            for sub, body in section.items():
                lines.append(f"[{_key(name)}.{_key(sub)}]")
                lines += [f"{_key(k)} = {_value(v)}" for k, v in body.items()]
        elif isinstance(section, dict):
            lines.append(f"[{_key(name)}]")
            lines += [f"{_key(k)} = {_value(v)}" for k, v in section.items()]
        else:
            lines.insert(0, f"{_key(name)} = {_value(section)}")
    return "\n".join(lines) + "\n"


SPECIAL_STRINGS = ["", "x", "/", "/tmp", "::1", "198.51.100.1", "0.0.0.0/0", "none", "queue",
                   "a" * 200, "tun/../x", "\x00", "eth0 ", "aes-gcm-128", "transport",
                   "permit ip any any"]  # fmt: skip
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    st.sampled_from([0, 1, -1, 2, 60, 65535, 65536, 86400, 10**9, (1 << 63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"]), max_size=20),
    st.sampled_from(SPECIAL_STRINGS),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(doc: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    return out


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        else:
            parent[draw(st.text(min_size=1, max_size=8))] = draw(values)
    return doc


def _check(path: Path) -> None:
    try:
        cfg = load_config(path, validate_acl=validate_acl)
    except ConfigError as e:
        assert e.errors and all(isinstance(m, str) and m for m in e.errors)
        d = diagnose_config(path, validate_acl=validate_acl)
        assert d.config is None and d.errors == e.errors
        return
    assert isinstance(cfg, Config)
    d = diagnose_config(path, validate_acl=validate_acl)
    assert d.config is not None and d.errors == []


def _write(data: bytes) -> Path:
    fd, name = tempfile.mkstemp(dir=_DIR, suffix=".toml")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(name)


def _run(data: bytes) -> None:
    path = _write(data)
    try:
        _check(path)
    finally:
        path.unlink()


def test_the_valid_document_loads() -> None:
    path = _write(to_toml(VALID).encode())
    try:
        cfg = load_config(path, validate_acl=validate_acl)
    finally:
        path.unlink()
    assert cfg.crypto_maps["foo"].dpd.interval == 30.0


PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(mutated())
def test_mutated_documents_give_a_config_or_a_config_error(doc: dict[str, Any]) -> None:
    _run(to_toml(doc).encode())


@PROPERTY
@given(st.binary(max_size=300))
def test_binary_files_give_a_config_error(data: bytes) -> None:
    _run(data)


@PROPERTY
@given(st.text(max_size=300))
def test_text_files_give_a_config_or_a_config_error(text: str) -> None:
    _run(text.encode("utf-8", "surrogatepass"))


def test_deep_nesting_and_known_crashes_are_config_errors() -> None:
    for data in (
        b"a = " + b"[" * 100_000 + b"]" * 100_000,  # tomllib recursion
        b"\xff\xfe\x00binary",
        to_toml({**VALID, "gateway": {**VALID["gateway"], "local_addresses": "x"}}).encode(),
    ):
        _run(data)
