"""``--pcap`` and ``--wireshark-keys``: scapy reads the capture, tshark decrypts it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from scapy.layers.inet import IP
from scapy.utils import PcapReader

from ipsecmgr.trace.pcap import LINKTYPE_RAW, esp_sa_rows, ikev2_rows, write_pcap
from ipsecmgr.trace.pcap import write_wireshark_keys as write_keys

from .test_trace import KEY_IN, KEY_OUT, LOCAL, PEER, SPI_IN, SPI_OUT, Rig, reply, syn

KEYS = {
    "esp": [
        {"spi": f"{SPI_OUT:08x}", "key": KEY_OUT.hex(), "src": LOCAL, "dst": PEER},
        {"spi": f"{SPI_IN:08x}", "key": KEY_IN.hex(), "src": PEER, "dst": LOCAL},
        {"spi": "00000999", "key": "00" * 36, "src": LOCAL, "dst": PEER},  # not in the trace
    ],
    "ike": [],
}


def _tshark() -> str:
    path = shutil.which("tshark")  # installed by tools/install-system-deps
    if path is None:
        pytest.fail("tshark missing")
    return path


@pytest.fixture
def traced(tmp_path: Path) -> list[dict[str, object]]:
    rig = Rig()
    try:
        return rig.cold_start()
    finally:
        rig.close()


def test_pcap_holds_clear_and_esp_packets_with_their_times(
    traced: list[dict[str, object]], tmp_path: Path
) -> None:
    path = tmp_path / "flow.pcap"
    assert write_pcap(path, traced) == 7  # 2, 2, 7, 8, 12, 2, 7
    with PcapReader(str(path)) as reader:
        assert reader.linktype == LINKTYPE_RAW
        pkts = list(reader)
    clear = [bytes(p) for p in pkts if p[IP].proto == 6]
    assert clear == [syn(), syn(), reply(), syn(1001, "A")]  # steps 2, 2, 12, 2
    esp = [p for p in pkts if p[IP].proto == 50]
    assert [(p[IP].src, p[IP].dst) for p in esp] == [(LOCAL, PEER), (PEER, LOCAL), (LOCAL, PEER)]
    wires = [bytes.fromhex(str(e["wire"])) for e in traced if e["step"] in ("7", "8")]
    assert [bytes(p[IP].payload) for p in esp] == wires
    walls = [e["wall"] for e in traced if e["event"] in ("tun_read", "tun_write", "esp_sent",
                                                         "esp_received")]  # fmt: skip
    assert [float(p.time) for p in pkts] == pytest.approx(walls, abs=2e-6)


def test_key_files_are_private_and_in_wiresharks_format(
    traced: list[dict[str, object]], tmp_path: Path
) -> None:
    esp_sa, ike_table = write_keys(tmp_path / "keys", KEYS, traced)
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    for f in (esp_sa, ike_table):
        assert f.stat().st_mode & 0o777 == 0o600
    assert esp_sa.read_text().splitlines() == [
        f'"IPv4","{LOCAL}","{PEER}","0x0000c0de","AES-GCM with 16 octet ICV [RFC4106]",'
        f'"0x{KEY_OUT.hex()}","NULL",""',
        f'"IPv4","{PEER}","{LOCAL}","0x0000beef","AES-GCM with 16 octet ICV [RFC4106]",'
        f'"0x{KEY_IN.hex()}","NULL",""',
    ]
    assert ike_table.read_text() == ""
    row = {"spi_i": "01" * 8, "spi_r": "02" * 8, "sk_ei": "aa", "sk_er": "bb", "sk_ai": "",
           "sk_ar": "", "encryption": "AES-GCM-256 with 16 octet ICV [RFC5282]",
           "integrity": "NONE [RFC4306]"}  # fmt: skip
    assert ikev2_rows([row]) == [
        '0101010101010101,0202020202020202,aa,bb,"AES-GCM-256 with 16 octet ICV [RFC5282]",,,'
        '"NONE [RFC4306]"'
    ]
    assert esp_sa_rows([{"spi": "1", "key": "ab", "src": "2001:db8::1", "dst": "2001:db8::2"}])[
        0
    ].startswith('"IPv6","2001:db8::1"')


def test_tshark_decrypts_the_traced_esp_with_the_written_keys(
    traced: list[dict[str, object]], tmp_path: Path
) -> None:
    tshark = _tshark()
    write_pcap(tmp_path / "flow.pcap", traced)
    write_keys(tmp_path / "cfg" / "wireshark", KEYS, traced)
    out = subprocess.run(
        [tshark, "-r", str(tmp_path / "flow.pcap"), "-Y", "esp",
         "-o", "esp.enable_encryption_decode:TRUE", "-o", "esp.enable_authentication_check:TRUE",
         "-o", "tcp.analyze_sequence_numbers:FALSE",
         "-T", "fields", "-e", "esp.spi", "-e", "esp.icv_good", "-e", "tcp.flags.syn",
         "-e", "tcp.flags.ack"],
        env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg")},
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    rows = [line.split("\t") for line in out.splitlines()]
    assert rows == [
        ["0x0000c0de", "1", "1", "0"],  # the retransmitted SYN, step 7
        ["0x0000beef", "1", "1", "1"],  # the SYN-ACK, step 8
        ["0x0000c0de", "1", "0", "1"],  # the ACK, step 7
    ]
