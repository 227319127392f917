"""Trace events as a timeline per flow, numbered as in the reference.

The daemon sees steps 2–5, 7–10 and 12 directly. Steps 1, 6, 11 and 13 happen
in the application (the TACACS+ client's TCP stack), so they are *inferred*
from the packets the daemon saw, and marked ``"inferred": true``:

* [1]  the flow's first TCP SYN (no ACK) read from the TUN at step 2;
* [6]  a later SYN read at step 2 with the same sequence number: the
       application's retransmission (after the first SYN was dropped, step 5);
* [11] a SYN-ACK decrypted at step 10 (the server's answer, before step 12);
* [13] the first pure ACK read at step 2 after [11]: the handshake is done.

Only the initiator's pattern is inferred: on the responder the SYN arrives as
ESP, so none of these rules fire there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ipsecmgr.trace import PROTO_NAMES, Event

_NO_COPY = ("packet", "wire", "event", "step")


def _tcp_text(e: Event) -> str:
    flags = e.get("tcp_flags")
    if flags is None:
        proto = e.get("proto")
        return PROTO_NAMES.get(proto, f"protocol {proto}").upper() if proto is not None else ""
    names = [n for c, n in (("S", "SYN"), ("F", "FIN"), ("R", "RST"), ("P", "PSH"),
                            ("A", "ACK")) if c in flags]  # fmt: skip
    text = "TCP " + "-".join(names or ["(no flags)"])
    if e.get("tcp_payload"):
        text += f" +{e['tcp_payload']} bytes"
    return text


def _spi(value: Any) -> str:
    return f"0x{int(value):08x}" if isinstance(value, int) else str(value)


def _wire_len(e: Event) -> int:
    wire = e.get("wire")
    return len(wire) // 2 if isinstance(wire, str) else int(e.get("size", 0))


def describe(e: Event) -> str:
    """The text after ``[step]`` on a timeline line."""
    ev = e.get("event", "")
    cmap = e.get("crypto_map", "?")
    peer = e.get("peer", "peer")
    if ev == "app_syn":
        return f"application: {_tcp_text(e)} to {e.get('dst')}:{e.get('dport')} (inferred)"
    if ev == "app_syn_retransmit":
        return "application: retransmits the SYN, steps 2-3 again (inferred)"
    if ev == "app_syn_ack":
        return "it is the SYN-ACK, the server's answer (inferred)"
    if ev == "app_ack":
        return "application: TCP ACK, the connection is up (inferred)"
    if ev == "tun_read":
        return f"TUN → IpsecMgr: read {_tcp_text(e)} ({e.get('len', 0)} bytes)"
    if ev == "acl_match":
        return f"NPUSIM: {e.get('rule', 'ACL')} matched → encrypt (crypto map {cmap})"
    if ev == "bypass":
        return "NPUSIM: no crypto ACL matched → bypass, sent in clear"
    if ev == "classify_drop":
        return f"NPUSIM: dropped: {e.get('reason', '?')}"
    if ev == "ike_triggered":
        return f"IpsecMgr: no SA for crypto map {cmap} → IKE with {peer}"
    if ev in ("ike_sent", "ike_received"):
        arrow = "→" if ev == "ike_sent" else "←"
        return f"IKE {arrow} {peer}: {e.get('summary', '?')}"
    if ev == "ike_sa_up":
        return f"IKE SA up with {cmap} peer ({e.get('algorithms', '')})"
    if ev == "child_sa_installed":
        return (
            f"Child SA installed: SPI in {_spi(e.get('spi_in'))}, "
            f"out {_spi(e.get('spi_out'))} ({e.get('mode', '?')})"
        )
    if ev in ("first_packet_dropped", "queue_full_dropped"):
        return f"IpsecMgr: {_tcp_text(e) or 'packet'} dropped ({e.get('reason', '')})"
    if ev == "first_packet_queued":
        return f"IpsecMgr: {_tcp_text(e) or 'packet'} queued until the SA is up"
    if ev == "esp_sent":
        return (
            f"IpsecMgr → {peer}: ESP SPI {_spi(e.get('spi'))} seq {e.get('seq')}, "
            f"{_wire_len(e)} bytes"
        )
    if ev == "esp_received":
        return f"{e.get('outer_src', '?')} → IpsecMgr: ESP received, {_wire_len(e)} bytes"
    if ev == "saflow_match":
        return f"NPUSIM: SA flow SPI {_spi(e.get('spi'))} matched (crypto map {cmap})"
    if ev == "esp_drop":
        where = "NPUSIM" if e.get("step") == "9" else "IpsecMgr"
        return f"{where}: dropped: {e.get('reason', '?')} (SPI {_spi(e.get('spi', '?'))})"
    if ev == "policy_drop":
        return f"IpsecMgr: dropped: outside the selectors of SPI {_spi(e.get('spi'))}"
    if ev == "decrypted":
        return f"IpsecMgr: decrypted, policy check passed: {_tcp_text(e)}"
    if ev == "tun_write":
        return f"IpsecMgr → TUN: written ({e.get('len', 0)} bytes)"
    if ev == "lost":
        return f"({e.get('count', 0)} events lost: rate limit or slow reader)"
    extra = ", ".join(
        f"{k}={v}" for k, v in e.items() if k in ("reason", "spi_in", "spi_out", "exchange")
    )
    return f"{ev.replace('_', ' ')} ({cmap}){': ' + extra if extra else ''}"


# -- inference of the application's steps ----------------------------------------------


@dataclass
class _FlowState:
    syn_seqs: set[int] = field(default_factory=set)
    seen_read: bool = False
    synack_seen: bool = False
    acked: bool = False


class Inferer:
    """Adds the inferred steps 1, 6, 11, 13 to a stream of events (see the module doc)."""

    def __init__(self) -> None:
        self._flows: dict[str, _FlowState] = {}

    @staticmethod
    def _make(base: Event, step: str, event: str) -> Event:
        out = {k: v for k, v in base.items() if k not in _NO_COPY}
        out.update(step=step, event=event, inferred=True)
        return out

    def feed(self, e: Event) -> list[Event]:
        flow = e.get("flow")
        if not flow or e.get("inferred"):
            return [e]
        st = self._flows.setdefault(flow, _FlowState())
        flags = e.get("tcp_flags")
        before: list[Event] = []
        after: list[Event] = []
        if e.get("step") == "2" and isinstance(flags, str):
            seq = e.get("tcp_seq")
            if flags == "S" and not st.seen_read:
                before.append(self._make(e, "1", "app_syn"))
            elif flags == "S" and seq in st.syn_seqs:
                before.append(self._make(e, "6", "app_syn_retransmit"))
            elif flags == "A" and st.synack_seen and not st.acked:
                st.acked = True
                before.append(self._make(e, "13", "app_ack"))
            if flags == "S" and isinstance(seq, int):
                st.syn_seqs.add(seq)
        if e.get("step") == "2":
            st.seen_read = True
        synack = isinstance(flags, str) and {"S", "A"} <= set(flags)
        if e.get("event") == "decrypted" and synack and st.syn_seqs and not st.synack_seen:
            st.synack_seen = True
            after.append(self._make(e, "11", "app_syn_ack"))
        return [*before, e, *after]


def with_inferred(events: Iterable[Event]) -> Iterator[Event]:
    """``events`` with the inferred steps added (unchanged if they are already there)."""
    evs = list(events)
    if any(e.get("inferred") for e in evs):
        yield from evs
        return
    inf = Inferer()
    for e in evs:
        yield from inf.feed(e)


# -- grouping and text -----------------------------------------------------------------


def group_flows(events: Iterable[Event]) -> dict[str, list[Event]]:
    """Events by flow, flows in order of their first event, events in time order."""
    flows: dict[str, list[Event]] = {}
    for e in sorted(events, key=lambda x: float(x.get("t", 0.0))):
        flows.setdefault(str(e.get("flow") or "-"), []).append(e)
    return flows


def flow_title(flow: str, events: list[Event]) -> str:
    tup = next((e["five_tuple"] for e in events if "five_tuple" in e), None)
    if tup:
        return f"flow {flow}: {tup}"
    if flow.startswith("spi:"):
        return f"flow {flow}: ESP that was not decrypted"
    if flow.startswith("ike:"):
        return f"flow {flow}: IKE of crypto map {flow[4:]}"
    return f"flow {flow}"


def timeline_line(e: Event, t0: float) -> str:
    step = str(e.get("step", "-"))
    return f"  +{float(e.get('t', t0)) - t0:9.6f}s {'[' + step + ']':>6} {describe(e)}"


def render_timelines(events: Iterable[Event]) -> str:
    """One block per flow, one line per step, times since the flow's first packet."""
    blocks = []
    for flow, evs in group_flows(with_inferred(_sorted(events))).items():
        t0 = float(evs[0].get("t", 0.0))
        lines = [flow_title(flow, evs)] + [timeline_line(e, t0) for e in evs]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _sorted(events: Iterable[Event]) -> list[Event]:
    return sorted(events, key=lambda x: float(x.get("t", 0.0)))


def pick_flow(flows: dict[str, list[Event]], wanted: str | None = None) -> str | None:
    """``wanted`` (a flow id or its prefix), else the flow with a cold start
    (an inferred step 1), else the one with the most events."""
    if wanted:
        for flow in flows:
            if flow == wanted or flow.startswith(wanted):
                return flow
        return None
    if not flows:
        return None
    cold = [f for f, evs in flows.items() if any(e.get("step") == "1" for e in evs)]
    if cold:
        return cold[0]
    return max(flows, key=lambda f: len(flows[f]))
