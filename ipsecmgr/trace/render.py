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


# The text of each event, formatted with the fields of :func:`_context`.
_TEXTS = {
    "app_syn": "application: {tcp} to {dst}:{dport} (inferred)",
    "app_syn_retransmit": "application: retransmits the SYN, steps 2-3 again (inferred)",
    "app_syn_ack": "it is the SYN-ACK, the server's answer (inferred)",
    "app_ack": "application: TCP ACK, the connection is up (inferred)",
    "tun_read": "TUN → IpsecMgr: read {tcp} ({len} bytes)",
    "acl_match": "NPUSIM: {rule} matched → encrypt (crypto map {crypto_map})",
    "bypass": "NPUSIM: no crypto ACL matched → bypass, sent in clear",
    "classify_drop": "NPUSIM: dropped: {reason}",
    "ike_triggered": "IpsecMgr: no SA for crypto map {crypto_map} → IKE with {peer}",
    "ike_sent": "IKE → {peer}: {summary}",
    "ike_received": "IKE ← {peer}: {summary}",
    "ike_sa_up": "IKE SA up with {crypto_map} peer ({algorithms})",
    "child_sa_installed": "Child SA installed: SPI in {spi_in}, out {spi_out} ({mode})",
    "first_packet_dropped": "IpsecMgr: {tcp} dropped ({reason})",
    "queue_full_dropped": "IpsecMgr: {tcp} dropped, queue full ({reason})",
    "first_packet_queued": "IpsecMgr: {tcp} queued until the SA is up",
    "hold_down_dropped": "IpsecMgr: {tcp} dropped, no IKE started: {reason}",
    "esp_sent": "IpsecMgr → {peer}: ESP SPI {spi} seq {seq}, {wire_len} bytes",
    "esp_received": "{outer_src} → IpsecMgr: ESP received, {wire_len} bytes",
    "saflow_match": "NPUSIM: SA flow SPI {spi} matched (crypto map {crypto_map})",
    "policy_drop": "IpsecMgr: dropped by the inbound policy ({reason}) of SPI {spi}: {tcp}",
    "decrypted": "IpsecMgr: decrypted, policy check passed: {tcp}",
    "tun_write": "IpsecMgr → TUN: written ({len} bytes)",
    "lost": "({count} events lost: rate limit or slow reader)",
    # step "tls": a flow protected by a [tls_map] (ipsecmgr.tls)
    "capture": "captured {client} → {destination}",
    "classify": "ACL {acl} → TLS map {tls_map}",
    "upstream-chosen": "upstream {server} (priority {priority}) chosen",
    "upstream-failed": "upstream {server} failed: {error}",
    "upstream-reconnect": "upstream {server} closed the idle connection: reconnect",
    "tls-up": "{version} up with {server} (resumed: {resumed})",
    "request": "request → {server}: session {session} seq {seq}",
    "response": "response ← {server}: session {session} seq {seq}",
    "refused": "client {client} refused: {reason}",
}


class _Fields(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "?"


def _context(e: Event) -> _Fields:
    ctx = _Fields(e)
    ctx.update(tcp=_tcp_text(e) or "packet", wire_len=_wire_len(e))
    for key in ("spi", "spi_in", "spi_out"):
        if key in e:
            ctx[key] = _spi(e[key])
    return ctx


def describe(e: Event) -> str:
    """The text after ``[step]`` on a timeline line."""
    ev = str(e.get("event", ""))
    ctx = _context(e)
    if ev == "esp_drop":
        where = "NPUSIM" if e.get("step") == "9" else "IpsecMgr"
        return f"{where}: dropped: {ctx['reason']} (SPI {ctx['spi']})"
    if ev == "unreachable_answered":  # step 5b (issue #20): the client is told at once
        what = {"icmp": "ICMP unreachable, administratively prohibited", "rst": "TCP RST"}
        answer = what.get(str(e.get("answer")), str(e.get("answer")))
        return f"IpsecMgr: {answer} written back into the TUN ({ctx['reason']})"
    if ev in _TEXTS:
        return _TEXTS[ev].format_map(ctx)
    extra = ", ".join(f"{k}={e[k]}" for k in ("reason", "spi_in", "spi_out", "exchange") if k in e)
    return f"{ev.replace('_', ' ')} ({ctx['crypto_map']}){': ' + extra if extra else ''}"


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
    """``events`` with the inferred steps added (unchanged if they are already there).

    In time order: the split data path's two workers report concurrently, so a
    recording's order may put an answer (e.g. the ACK read at step 2) before the
    packet it answers (the SYN-ACK written at step 12) by microseconds."""
    evs = sorted(events, key=lambda x: float(x.get("t", 0.0)))
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
