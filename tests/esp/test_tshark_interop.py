"""Wireshark's ESP dissector as a third oracle: it must decrypt our packets and
find the ICV good (tshark with the SA given as an ``esp_sa`` UAT record).

This is also how to read a capture of the daemon's traffic: the same UAT line,
with the SA's SPI, addresses and keying material (key ‖ salt).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw, raw
from scapy.utils import wrpcap

import esp

SRC, DST = "192.0.2.1", "198.51.100.1"
# (SPI, keying material, mode, next header)
SAS = [
    (0x1000A128, bytes(range(16)) + b"salt", "tunnel"),
    (0x1000A256, bytes(range(100, 132)) + b"SALT", "tunnel"),
    (0x2000A128, bytes(range(50, 66)) + b"\x01\x02\x03\x04", "transport"),
    (0x2000A256, bytes(range(200, 232)) + b"\xff\xfe\xfd\xfc", "transport"),
]
TACACS = b"\xc0\x01\x01\x00\x00\x00\x00\x01\x00\x00\x00\x0cTACACS+ body"


def _tshark() -> str:
    path = shutil.which("tshark")
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("tshark missing (tools/install-system-deps installs it)")
        pytest.skip("tshark not installed")
    return path


def test_tshark_decrypts_ours_with_good_icv(tmp_path: Path) -> None:
    tshark = _tshark()
    frames = []
    expected = []
    for spi, keymat, mode in SAS:
        sa = esp.OutboundSA(spi, keymat, mode=mode)
        inner = IP(src="203.0.113.5", dst="203.0.113.9") / TCP(sport=40000, dport=49)
        inner = IP(raw(inner / Raw(TACACS)))
        for _ in range(2):
            if mode == "tunnel":
                packet = sa.encapsulate(raw(inner), 4)
            else:
                packet = sa.encapsulate(raw(inner[TCP]), 6)
            frames.append(IP(src=SRC, dst=DST, proto=50) / Raw(packet))
            expected.append(
                (f"0x{spi:08x}", str(sa.next_seq - 1), "1", "0x04" if mode == "tunnel" else "0x06")
            )
    wrpcap(str(tmp_path / "esp.pcap"), frames)
    command = [
        tshark,
        "-n",
        "-r",
        str(tmp_path / "esp.pcap"),
        "-o",
        "esp.enable_encryption_decode:TRUE",
        "-o",
        "esp.enable_authentication_check:TRUE",
    ]
    for spi, keymat, _ in SAS:
        command += [
            "-o",
            f'uat:esp_sa:"IPv4","{SRC}","{DST}","0x{spi:08x}",'
            f'"AES-GCM with 16 octet ICV [RFC4106]","0x{keymat.hex()}","NULL",""',
        ]
    command += ["-T", "fields", "-E", "separator=|"]
    command += ["-e", "esp.spi", "-e", "esp.sequence", "-e", "esp.icv_good"]
    command += ["-e", "esp.protocol", "-e", "tcp.dstport", "-e", "tcp.payload"]
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}  # no user profile
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|") for line in result.stdout.splitlines()]
    assert [tuple(row[:4]) for row in rows] == expected
    assert all(row[4] == "49" and row[5] == TACACS.hex() for row in rows)
