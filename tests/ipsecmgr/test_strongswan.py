"""Two strongSwan peers (kernel-libipsec, one charon per namespace) build a tunnel (root)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from ipsecmgr.lab.strongswan import PeerOptions, StrongSwanPeer, pid_alive
from ipsecmgr.netns import NetnsPool
from ipsecmgr.secret import Secret

PSK = Secret(b"strongswan-test-psk\x00\xff")  # non-printable bytes: the hex encoding matters


@pytest.mark.root
@pytest.mark.slow
def test_two_charons_build_a_tunnel_and_carry_ping(netns: NetnsPool, tmp_path: Path) -> None:
    a, b = netns.add("swa"), netns.add("swb")
    netns.link(a, b, ["198.51.100.1/24"], ["198.51.100.2/24"])
    a.add_address("lo", "192.0.2.1/32")
    b.add_address("lo", "203.0.113.49/32")
    resp = StrongSwanPeer(b, tmp_path / "b")
    init = StrongSwanPeer(a, tmp_path / "a")
    try:
        resp.start(
            local="198.51.100.2",
            remote="198.51.100.1",
            psk=PSK,
            options=PeerOptions(local_ts="203.0.113.0/24", remote_ts="192.0.2.0/24"),
        )
        init.start(local="198.51.100.1", remote="198.51.100.2", psk=PSK,
                   options=PeerOptions(local_ts="192.0.2.0/24", remote_ts="203.0.113.0/24"),
                   initiate=True)  # fmt: skip
        assert resp.pid != init.pid and resp.pid and init.pid
        # the PSK is in the 0600 file as hex, never in any argument list
        conf = tmp_path / "a" / "swanctl.conf"
        assert PSK.reveal().hex() in conf.read_text() and conf.stat().st_mode & 0o077 == 0
        for pid in (resp.pid, init.pid):
            assert PSK.reveal().hex() not in Path(f"/proc/{pid}/cmdline").read_text()
        a.run(["ping", "-c3", "-i0.2", "-W2", "-I", "192.0.2.1", "203.0.113.49"])
        sas = init.swanctl("--list-sas", "--raw").stdout
        assert "state=ESTABLISHED" in sas and "state=INSTALLED" in sas
        assert "encap=yes" in sas  # bookworm's libipsec: ESP in UDP 4500
        packets_in = [int(n) for n in re.findall(r"packets-in=(\d+)", sas)]
        packets_out = [int(n) for n in re.findall(r"packets-out=(\d+)", sas)]
        assert sum(packets_in) >= 3 and sum(packets_out) >= 3
        assert "192.0.2.0/24" in init.list_sas()
        # a crash (SIGKILL) leaves charon's policy rule behind; stop() removes it
        killed = init.pid
        init.stop(kill=True)
        assert killed is not None and not pid_alive(killed) and init.pid is None
    finally:
        pids = [p for p in (init.pid, resp.pid) if p]
        init.stop()
        resp.stop()
    assert pids and not any(pid_alive(p) for p in pids)
    for ns in (a, b):
        rules = subprocess.run(["ip", "-n", ns.name, "rule"], capture_output=True, text=True)
        assert "lookup 220" not in rules.stdout
    assert not (tmp_path / "a" / "run" / "charon.pid").exists()


@pytest.mark.root
def test_command_line_start_status_stop(netns: NetnsPool, tmp_path: Path) -> None:
    import os
    import sys

    from ipsecmgr.lab.topology import python_env

    ns = netns.add("swc")
    netns.link(ns, netns.add("swd"), ["198.51.100.1/24"], ["198.51.100.2/24"])
    psk = tmp_path / "psk"
    psk.write_bytes(b"cli-psk\n")
    psk.chmod(0o600)
    env = python_env({"STRONGSWAN_PEER_DIR": str(tmp_path / "sw")})

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ipsecmgr.lab.strongswan", *args], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    r = cli("start", ns.name, "--local", "198.51.100.1", "--remote", "198.51.100.2",
            "--psk-file", str(psk), "--ike", "aes128gcm16-prfsha256-ecp256")  # fmt: skip
    assert r.returncode == 0, r.stderr
    state = Path(cli("dir", ns.name).stdout.strip())
    assert state == tmp_path / "sw" / ns.name
    pid = int((state / "run" / "charon.pid").read_text())
    assert f"pid {pid}" in r.stdout and pid_alive(pid)
    assert "aes128gcm16-prfsha256-ecp256" in (state / "swanctl.conf").read_text()
    assert b"cli-psk".hex() in (state / "swanctl.conf").read_text()  # one newline stripped
    assert cli("status", ns.name).returncode == 0
    again = cli("start", ns.name, "--local", "198.51.100.1", "--remote", "198.51.100.2",
                "--psk-file", str(psk))  # fmt: skip
    assert again.returncode == 1 and "already runs" in again.stderr
    assert cli("stop", ns.name).returncode == 0
    assert not pid_alive(pid) and not os.path.exists(state / "run" / "charon.pid")
