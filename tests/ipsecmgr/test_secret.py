"""Secrets never print: not via repr, str, format, f-strings, pickling or a traceback."""

from __future__ import annotations

import copy
import logging
import pickle
import traceback
from pathlib import Path

import pytest

from ipsecmgr.config import load_config
from ipsecmgr.secret import Secret, SecretError, read_secret_env, read_secret_file

KEY = b"s3cr3t-PSK-value-0123"


def test_secret_masks_every_text_form() -> None:
    s = Secret(KEY)
    forms = [repr(s), str(s), f"{s}", f"{s!r}", f"{s:>40}", "%s %r" % (s, s), "{}".format(s)]  # noqa: UP031, UP032
    assert all("s3cr3t" not in f for f in forms)
    assert set(f.strip() for f in forms[:5]) == {"Secret(***)"}
    assert s.reveal() == KEY and len(s) == len(KEY)
    assert s == Secret(KEY) and s != Secret(b"other")


def test_secret_cannot_be_pickled_and_copies_stay_masked() -> None:
    s = Secret(KEY)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(s)
    assert copy.deepcopy(s) is s


def test_secret_absent_from_logs_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    s = Secret(KEY)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("t").debug("psk is %s / %r", s, s)
    try:
        raise ValueError(f"bad key {s}")
    except ValueError:
        tb = traceback.format_exc()
    text = caplog.text + tb + "".join(traceback.format_stack())
    assert "Secret(***)" in caplog.text and KEY.decode() not in text


def test_file_reading_rules(tmp_path: Path) -> None:
    p = tmp_path / "k"
    p.write_bytes(KEY + b"\n\n")
    p.chmod(0o400)
    s, warnings = read_secret_file(p)
    assert s.reveal() == KEY + b"\n" and warnings == []  # only ONE newline is stripped
    p.chmod(0o640)
    _, warnings = read_secret_file(p)
    assert warnings == [
        f"{p} has mode 0640; a key file should be 0600 or 0400 (readable by its owner only)"
    ]
    with pytest.raises(SecretError, match="is not a regular file"):
        read_secret_file(Path("/dev/null"))
    with pytest.raises(SecretError, match="not set"):
        read_secret_env("X", {})


def test_config_objects_never_show_the_psk(tmp_path: Path) -> None:
    psk = tmp_path / "psk"
    psk.write_bytes(KEY)
    psk.chmod(0o600)
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(
        f"""
[access_list.a]
rules = ["permit ip host 192.0.2.1 host 203.0.113.49"]
[crypto_map.m]
peer = "198.51.100.2"
match_address = "a"
local_psk = {{ file = "{psk}" }}
remote_psk = {{ env = "REMOTE" }}
src_ip = "192.0.2.1"
[gateway]
local_addresses = ["198.51.100.1"]
"""
    )
    cfg = load_config(cfg_path, environ={"REMOTE": "remote-" + KEY.decode()})
    cm = cfg.crypto_maps["m"]
    assert cm.remote_psk.reveal() == b"remote-" + KEY
    for obj in (cfg, cm):
        for text in (repr(obj), str(obj), f"{obj}", f"{obj!r}", "%s" % (obj,)):  # noqa: UP031
            assert KEY.decode() not in text and KEY.hex() not in text
    assert "local_psk" not in repr(cm)  # the field is left out of repr altogether
