"""Timelines, inferred steps, the SVG diagram and the ``ipsecmgr trace`` command on files."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from ipsecmgr.cli import main
from ipsecmgr.trace import Event
from ipsecmgr.trace.io import read_events, record
from ipsecmgr.trace.render import group_flows, pick_flow, render_timelines, with_inferred
from ipsecmgr.trace.svg import LANES, render_svg

from .test_trace import Rig, reply

SVG = "{http://www.w3.org/2000/svg}"


def _cold_start_with_manager_steps() -> list[Event]:
    """The data-path events of a cold start plus the manager's 4 and 5 (as it calls them)."""
    rig = Rig()
    rig.dp.on_no_sa = lambda name, pkt: (
        rig.tracer("4", "ike_triggered", pkt, crypto_map=name, peer=("198.51.100.2", 0)),
        rig.tracer("5", "first_packet_dropped", pkt, crypto_map=name, reason="IKE not up"),
    )
    try:
        return rig.cold_start()
    finally:
        rig.close()


def test_inferred_steps_complete_the_reference_order() -> None:
    evs = list(with_inferred(_cold_start_with_manager_steps()))
    steps = [e["step"] for e in evs]
    assert steps == ["1", "2", "3a", "4", "5", "6", "2", "3a", "7", "8", "9", "10", "11", "12",
                     "13", "2", "3a", "7"]  # fmt: skip
    inferred = [e["step"] for e in evs if e.get("inferred")]
    assert inferred == ["1", "6", "11", "13"]
    assert all("packet" not in e for e in evs if e.get("inferred"))
    assert list(with_inferred(evs)) == evs  # idempotent


def test_responder_pattern_infers_nothing() -> None:
    """On the responder the SYN arrives as ESP and the SYN-ACK leaves via the TUN."""
    rig = Rig()
    rig.install()
    try:
        rig.from_peer(rig.encrypt_reply(reply("S")))  # a SYN from the far side, decrypted
        evs = rig.events()
    finally:
        rig.close()
    assert [e["step"] for e in with_inferred(evs)] == ["8", "9", "10", "12"]


def test_timeline_text_numbers_steps_and_times_from_the_first_packet() -> None:
    text = render_timelines(_cold_start_with_manager_steps())
    lines = text.splitlines()
    assert lines[0].startswith("flow ") and "tcp 192.0.2.1:40001 > 203.0.113.49:49" in lines[0]
    assert re.match(r"\s+\+ 0\.000000s\s+\[1\] application: TCP SYN", lines[1])
    assert any("[3a] NPUSIM: ACL tacacs line 1 matched → encrypt" in ln for ln in lines)
    assert any("[5] IpsecMgr: TCP SYN dropped" in ln for ln in lines)
    assert any("[10] IpsecMgr: decrypted, policy check passed: TCP SYN-ACK" in ln for ln in lines)
    times = [float(m.group(1)) for ln in lines[1:] if (m := re.search(r"\+\s*([\d.]+)s", ln))]
    assert times == sorted(times) and times[0] == 0.0


def test_svg_has_one_lane_per_participant_and_one_arrow_per_step() -> None:
    flows = group_flows(with_inferred(_cold_start_with_manager_steps()))
    flow = pick_flow(flows)
    assert flow is not None
    root = ET.fromstring(render_svg(flows[flow], "cold start"))
    assert root.tag == SVG + "svg"
    lanes = [g.get("data-lane") for g in root.iter(SVG + "g") if g.get("class") == "lane"]
    assert lanes == list(LANES) == ["application", "TUN", "IpsecMgr", "NPUSIM", "network", "peer"]
    arrows = [g for g in root.iter(SVG + "g") if g.get("class") == "arrow"]
    assert [a.get("data-step") for a in arrows] == [e["step"] for e in flows[flow]]
    for a in arrows:  # each arrow is drawn (a line or a loop) and labelled with its step
        assert a.find(SVG + "line") is not None or a.find(SVG + "path") is not None
        label = "".join(a.find(SVG + "text").itertext())  # type: ignore[union-attr]
        assert label.startswith(f"[{a.get('data-step')}] ")


def test_pick_flow_prefers_the_cold_start_or_the_requested_id() -> None:
    flows: dict[str, list[Any]] = {
        "aaaa1111": [{"step": "2"}] * 5,
        "bbbb2222": [{"step": "1"}, {"step": "2"}],
    }
    assert pick_flow(flows) == "bbbb2222"
    assert pick_flow(flows, "aaaa") == "aaaa1111"
    assert pick_flow(flows, "cccc") is None


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    record(path, _cold_start_with_manager_steps())
    return path


def test_record_is_private_and_replays(recording: Path) -> None:
    assert recording.stat().st_mode & 0o777 == 0o600
    evs = read_events(recording)
    assert [e["step"] for e in evs][:4] == ["2", "3a", "4", "5"]
    with open(recording, "a") as f:
        f.write('{"t": 1, "step": "2", "ev')  # cut short by Ctrl-C
    assert read_events(recording) == evs


def test_cli_read_prints_the_timeline(recording: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "--read", str(recording)]) == 0
    out = capsys.readouterr().out
    steps = re.findall(r"\[(\w+)\]", out)
    assert steps[:6] == ["1", "2", "3a", "4", "5", "6"] and "13" in steps


def test_cli_read_json_and_filter(recording: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "--read", str(recording), "--json", "--filter", "spi=0xc0de"]) == 0
    evs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # From the first ESP packet on; without the SYN nothing is inferred.
    assert [e["step"] for e in evs] == ["7", "8", "9", "10", "12", "2", "3a", "7"]
    assert main(["trace", "--read", str(recording), "--filter", "bogus=1"]) == 2


def test_cli_diagram_and_pcap(recording: Path, tmp_path: Path) -> None:
    svg, pcap = tmp_path / "flow.svg", tmp_path / "flow.pcap"
    assert (
        main(["trace", "--read", str(recording), "--diagram", str(svg), "--pcap", str(pcap)]) == 0
    )
    arrows = [g for g in ET.parse(svg).getroot().iter(SVG + "g") if g.get("class") == "arrow"]
    assert len(arrows) == 18
    assert pcap.stat().st_size > 24
    assert main(["trace", "--read", str(recording), "--flow", "nope", "--pcap", str(pcap)]) == 1


def test_cli_follow_prints_one_line_per_step_with_the_flow(
    recording: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["trace", "--read", str(recording), "--follow"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 18  # 14 traced + 4 inferred, no per-flow summary after them
    flow = lines[0].split()[0]
    assert all(line.startswith(flow) for line in lines)
    assert "[1] application: TCP SYN" in lines[0] and "[13]" in lines[14]
