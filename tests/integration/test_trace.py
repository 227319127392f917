"""``ipsecmgr trace`` against our daemon in the netns lab (root), in both data paths.

One lab per data path (``[gateway] datapath = "single"`` and ``"split"``, both
gateways): ``ipsecmgr trace --record`` attaches to the client gateway before
anything happens, then a cold-start TACACS+ login, a login to the bypass
server, and a forged ESP packet from the peer's namespace. Every test runs on
both recordings; the tshark test decrypts each one's ``--pcap`` output with
the ``--wireshark-keys`` files and finds the user name inside, and one test
compares the cold login's steps and events between the two data paths.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipsecmgr.lab.gateways import LabGateways
from ipsecmgr.lab.topology import Lab, python_env
from ipsecmgr.trace import Event
from ipsecmgr.trace.io import read_events
from ipsecmgr.trace.render import group_flows, pick_flow, with_inferred

pytestmark = pytest.mark.root

USER, PASSWORD, SECRET = "alice", "alice-trace-pw", b"trace-tacacs-key"
REFERENCE_ORDER = ["1", "2", "3a", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13"]


@dataclass
class Traced:
    datapath: str
    lab: Lab
    gws: LabGateways
    record: Path
    cli_output: str
    forged_spi: int
    work: Path

    def events(self) -> list[Event]:
        return read_events(self.record)


def _wait_for(predicate: object, path: Path, what: str, timeout: float = 15.0) -> list[Event]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        evs = read_events(path) if path.exists() else []
        if predicate(evs):  # type: ignore[operator]
            return evs
        time.sleep(0.05)  # polling a file the tracer appends to, with a deadline
    raise AssertionError(f"timed out waiting for {what}")


def _forge_from_peer(lab: Lab, wire: bytes, to: str) -> None:
    """Send ESP from the responder's namespace on a raw socket (as the peer would)."""
    code = (
        "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_RAW, 50); "
        "s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], 0))"
    )
    lab.ns("gw").run([sys.executable, "-c", code, wire.hex(), to])


def _start_trace(control: Path, *args: str) -> subprocess.Popen[str]:
    """``ipsecmgr trace ARGS``, returned once it is attached to the daemon."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipsecmgr.cli", "trace", "--socket", str(control), *args],
        env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    # "tracing ..." is printed once the daemon has registered the subscription
    if not select.select([proc.stderr], [], [], 10)[0]:
        proc.kill()
        proc.wait()
        raise AssertionError("ipsecmgr trace did not attach")
    assert proc.stderr.readline().startswith("tracing ")
    return proc


def _trace_a_cold_login(
    tmp_path_factory: pytest.TempPathFactory, datapath: str
) -> Iterator[Traced]:
    work = tmp_path_factory.mktemp(f"trace-{datapath}")
    secret = work / "tacacs-secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    users = work / "users.json"
    users.write_text(json.dumps({USER: {"password": PASSWORD}}))
    record = work / "trace.jsonl"
    with Lab("tunnel") as lab, LabGateways(lab) as gws:
        a = lab.addresses
        lab.start_tacacs_server("server", secret_file=secret, users_file=users)
        lab.start_tacacs_server("bypass", secret_file=secret, users_file=users)
        gws.start_both(gateway_options={"datapath": datapath})
        cli = _start_trace(gws["client"].control, "--record", str(record))
        try:
            login = lab.tacacs_query("client", server=a.server4, secret_file=secret, user=USER,
                                     password=PASSWORD)  # fmt: skip
            assert login["ok"], login
            bypass = lab.tacacs_query("client", server=a.bypass4, secret_file=secret, user=USER,
                                      password=PASSWORD)  # fmt: skip
            assert bypass["ok"], bypass
            evs = _wait_for(
                lambda evs: (
                    any(e["event"] == "bypass" for e in evs)
                    and sum(e["event"] == "tun_write" for e in evs) >= 3
                ),
                record,
                "the logins' events",
            )
            # A real ESP packet from the peer, its sequence number moved ahead (so the
            # anti-replay window lets it through, RFC 4303 §3.4.3) without a new ICV.
            wire = bytearray.fromhex(next(e["wire"] for e in evs if e["event"] == "esp_received"))
            wire[4:8] = (int.from_bytes(wire[4:8], "big") + 1000).to_bytes(4, "big")
            _forge_from_peer(lab, bytes(wire), a.client_wan4)
            _wait_for(
                lambda evs: any(e["event"] == "esp_drop" for e in evs), record, "the ICV drop"
            )
            cli.send_signal(signal.SIGINT)  # Ctrl-C: the tool prints the timelines
            out, _ = cli.communicate(timeout=20)
            assert cli.returncode == 0
            yield Traced(datapath, lab, gws, record, out, int.from_bytes(wire[:4], "big"), work)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()


# Both labs live until the end of the module, for the test that compares them.
@pytest.fixture(scope="module")
def traced_single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    yield from _trace_a_cold_login(tmp_path_factory, "single")


@pytest.fixture(scope="module")
def traced_split(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    yield from _trace_a_cold_login(tmp_path_factory, "split")


@pytest.fixture(scope="module", params=["single", "split"])
def traced(request: pytest.FixtureRequest) -> Traced:
    result: Traced = request.getfixturevalue(f"traced_{request.param}")
    return result


def _cold_login(traced: Traced) -> list[Event]:
    """The events of the login's flow (the first TACACS+ connection), inferred steps too."""
    flows = group_flows(with_inferred(traced.events()))
    flow = pick_flow(flows)
    assert flow is not None
    return flows[flow]


def test_cold_start_login_shows_steps_1_to_13_in_order_with_the_first_syn_dropped(
    traced: Traced,
) -> None:
    evs = _cold_login(traced)
    assert evs[0]["dport"] == 49 and evs[0]["dst"] == traced.lab.addresses.server4
    first_seen: list[str] = []
    for e in evs:
        if e["step"] not in first_seen:
            first_seen.append(e["step"])
    assert first_seen == REFERENCE_ORDER
    drops = [e for e in evs if e["step"] == "5"]
    assert [(e["event"], e["tcp_flags"]) for e in drops] == [("first_packet_dropped", "S")]
    ike = [(e["event"], e.get("exchange")) for e in evs if e["step"] == "4"]
    assert ike == [
        ("ike_triggered", None),
        ("ike_sent", "IKE_SA_INIT"),
        ("ike_received", "IKE_SA_INIT"),
        ("ike_sent", "IKE_AUTH"),
        ("ike_received", "IKE_AUTH"),
        ("ike_sa_up", None),
        ("child_sa_installed", None),
    ]
    # The retransmitted SYN (6) is the one encrypted at 7, with sequence number 1
    sent = next(e for e in evs if e["step"] == "7")
    assert sent["seq"] == 1 and sent["tcp_flags"] == "S"
    # The tool's own output (printed on Ctrl-C) numbers the same steps
    assert "[3a] NPUSIM: ACL tacacs line 1 matched → encrypt" in traced.cli_output
    assert "[5] IpsecMgr: TCP SYN dropped" in traced.cli_output


def test_bypassed_flow_shows_3b(traced: Traced) -> None:
    bypass = traced.lab.addresses.bypass4
    flows = group_flows(traced.events())
    (evs,) = [f for f in flows.values() if any(e.get("dst") == bypass for e in f)]
    assert {e["step"] for e in evs} == {"2", "3b"}
    assert sum(e["step"] == "3b" for e in evs) >= 5  # SYN, ACK, request, ACK, FIN...


def test_forged_esp_with_a_bad_icv_is_dropped_at_step_10(traced: Traced) -> None:
    flows = group_flows(traced.events())
    evs = flows[f"spi:{traced.forged_spi:08x}"]
    assert [(e["step"], e["event"]) for e in evs] == [
        ("8", "esp_received"),
        ("9", "saflow_match"),
        ("10", "esp_drop"),
    ]
    assert evs[-1]["reason"] == "icv_failed" and evs[-1]["spi"] == traced.forged_spi
    assert evs[0]["outer_src"] == traced.lab.addresses.gw_wan4
    assert traced.gws["client"].counter("esp", "in_icv_failed") == 1


def test_tshark_decrypts_the_pcap_with_the_key_files_and_finds_the_user(traced: Traced) -> None:
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.fail("tshark missing (tools/install-system-deps installs it)")
    pcap, keys = traced.work / "login.pcap", traced.work / "cfg" / "wireshark"
    proc = subprocess.run(
        [sys.executable, "-m", "ipsecmgr.cli", "trace", "--read", str(traced.record),
         "--socket", str(traced.gws["client"].control), "--pcap", str(pcap),
         "--wireshark-keys", str(keys)],
        env=python_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "secret" not in proc.stdout and "hold the SA keys" in proc.stderr
    for f in ("esp_sa", "ikev2_decryption_table"):
        assert (keys / f).stat().st_mode & 0o777 == 0o600
    env = {**os.environ, "XDG_CONFIG_HOME": str(traced.work / "cfg")}
    # tcp.analyze_sequence_numbers off: the clear copy of each segment (step 2) would
    # otherwise make the encrypted one (step 7) a "retransmission" left undissected.
    opts = ["-o", "esp.enable_encryption_decode:TRUE",
            "-o", "esp.enable_authentication_check:TRUE",
            "-o", f"tacplus.key:{SECRET.decode()}",
            "-o", "tcp.analyze_sequence_numbers:FALSE"]  # fmt: skip
    users = subprocess.run(
        [tshark, "-r", str(pcap), *opts, "-Y", "esp && tacplus.user",
         "-T", "fields", "-e", "esp.icv_good", "-e", "tacplus.user"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    # The authentication START went out encrypted (ICV good) and carries the user name.
    assert users[:2] == ["1", USER]
    ike = subprocess.run(
        [tshark, "-r", str(pcap), *opts, "-Y", "isakmp.exchangetype == 35", "-V", "-O", "isakmp"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert ike.count("Decrypted Data") == 2  # IKE_AUTH request and response
    assert "Identification - Initiator" in ike and "Traffic Selector - Responder" in ike


def test_live_trace_with_follow_and_duration_sees_a_bypassed_login(traced: Traced) -> None:
    a = traced.lab.addresses
    control = traced.gws["client"].control
    proc = _start_trace(control, "--follow", "--duration", "2", "--filter", f"host={a.bypass4}")
    try:
        secret = traced.work / "tacacs-secret"
        result = traced.lab.tacacs_query("client", server=a.bypass4, secret_file=secret,
                                         user=USER, password=PASSWORD)  # fmt: skip
        assert result["ok"], result
        out, _ = proc.communicate(timeout=20)  # --duration ends it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    lines = out.splitlines()
    assert "[1] application: TCP SYN to " + a.bypass4 + ":49" in lines[0]
    assert all("[3b]" in ln or "[2]" in ln for ln in lines[1:]) and len(lines) >= 11


def test_both_data_paths_trace_the_same_steps_and_events_of_a_cold_login(
    traced_single: Traced, traced_split: Traced
) -> None:
    """The split data path's workers report every packet step through the same
    interface: the same 13 steps, and per step the same kinds of event."""

    def kinds(traced: Traced) -> set[tuple[str, str]]:
        return {(e["step"], e["event"]) for e in _cold_login(traced)}

    single, split = kinds(traced_single), kinds(traced_split)
    assert {step for step, _ in single} == set(REFERENCE_ORDER)
    assert split == single
    # Every packet step of the split data path came from a worker (counted there,
    # not in the control process), and none was lost on the way.
    assert traced_split.gws["client"].counter("esp", "esp_out_packets") >= 1
    assert traced_split.gws["client"].counter("esp", "trace_lost") == 0
