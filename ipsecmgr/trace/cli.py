"""``ipsecmgr trace``: the packet-flow tracing tool.

ipsecmgr trace [--filter K=V] [--rate N]          attach; on Ctrl-C (or --count,
                                                  --duration) print a timeline per flow
ipsecmgr trace --follow                           print each step as it happens
ipsecmgr trace --record FILE                      also write the events (JSON lines)
ipsecmgr trace --read FILE                        replay a recording
  --json                                          events as JSON lines
  --diagram OUT.svg [--flow ID]                   sequence diagram of one flow
  --pcap OUT.pcap [--flow ID]                     the flows' packets (clear, ESP, IKE)
  --wireshark-keys DIR                            Wireshark key tables (SECRET, 0600)
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import IO

from ipsecmgr.config import DEFAULT_CONTROL_SOCKET
from ipsecmgr.control import ControlError
from ipsecmgr.trace import Event, TraceFilter
from ipsecmgr.trace.io import TraceClient, fetch_keys, open_private, read_events, write_event
from ipsecmgr.trace.render import (
    Inferer,
    describe,
    flow_title,
    group_flows,
    pick_flow,
    render_timelines,
    with_inferred,
)

KEYS_WARNING = (
    "warning: {files} hold the SA keys: anyone who has them (and a capture) can "
    "decrypt the traffic. Keep them private and delete them when done."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", type=Path, default=DEFAULT_CONTROL_SOCKET, help="daemon socket")
    p.add_argument("--follow", "-f", action="store_true", help="print each step as it happens")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="K=V",
        help="crypto_map, spi, proto, host, port, src, dst, sport, dport, flow (repeatable)",
    )
    p.add_argument("--rate", type=float, help="at most N events per second (excess is counted)")
    p.add_argument("--record", type=Path, metavar="FILE", help="write the events (JSON lines)")
    p.add_argument("--read", type=Path, metavar="FILE", help="replay a recording")
    p.add_argument("--json", action="store_true", help="events as JSON lines")
    p.add_argument("--count", type=int, help="stop after N events")
    p.add_argument("--duration", type=float, help="stop after S seconds")
    p.add_argument("--flow", help="flow id (or prefix) for --diagram and --pcap")
    p.add_argument("--diagram", type=Path, metavar="OUT.svg", help="sequence diagram of a flow")
    p.add_argument("--pcap", type=Path, metavar="OUT.pcap", help="the flows' packets")
    p.add_argument(
        "--wireshark-keys",
        type=Path,
        metavar="DIR",
        help="write esp_sa and ikev2_decryption_table (secret!) from the running daemon",
    )


class _Follower:
    """Prints events as they arrive, numbered, with the time since the flow began."""

    def __init__(self, out: IO[str], as_json: bool) -> None:
        self.out, self.as_json = out, as_json
        self.inferer = Inferer()
        self.t0: dict[str, float] = {}

    def __call__(self, e: Event) -> None:
        for x in self.inferer.feed(e):
            if self.as_json:
                self.out.write(json.dumps(x, sort_keys=True) + "\n")
                continue
            flow = str(x.get("flow") or "-")
            t0 = self.t0.setdefault(flow, float(x.get("t", 0.0)))
            rel = float(x.get("t", t0)) - t0
            step = "[" + str(x.get("step", "-")) + "]"
            self.out.write(f"{flow:<12} +{rel:9.6f}s {step:>6} {describe(x)}\n")
        self.out.flush()


def _collect_live(args: argparse.Namespace, tfilter: TraceFilter) -> list[Event]:
    client = TraceClient(args.socket, tfilter.terms, args.rate)
    # Ctrl-C (SIGINT) is how a live trace ends, also when a shell started us in the
    # background, where SIGINT arrives ignored (POSIX: asynchronous lists).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"tracing {args.socket} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    timer = None
    if args.duration:
        timer = threading.Timer(args.duration, client.close)
        timer.daemon = True
        timer.start()
    events: list[Event] = []
    record = open_private(args.record) if args.record else None
    follow = _Follower(sys.stdout, args.json) if args.follow else None
    try:
        for e in client:
            events.append(e)
            if record is not None:
                write_event(record, e)
                record.flush()
            if follow is not None:
                follow(e)
            if args.count and len(events) >= args.count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        if timer is not None:
            timer.cancel()
        client.close()
        if record is not None:
            record.close()
    return events


def run_trace(args: argparse.Namespace) -> int:
    try:
        tfilter = TraceFilter.parse(args.filter)
    except ValueError as exc:
        print(f"ipsecmgr trace: {exc}", file=sys.stderr)
        return 2
    try:
        if args.read:
            matched: set[str] = set()
            events = [e for e in read_events(args.read) if not tfilter or tfilter.match(e, matched)]
            if args.follow:
                follow = _Follower(sys.stdout, args.json)
                for e in events:
                    follow(e)
        else:
            events = _collect_live(args, tfilter)
    except (ControlError, OSError) as exc:
        print(f"ipsecmgr trace: {exc}", file=sys.stderr)
        return 1
    if not args.follow:
        if args.json:
            for e in with_inferred(events):
                sys.stdout.write(json.dumps(e, sort_keys=True) + "\n")
        elif events:
            print(render_timelines(events))
        else:
            print("no events", file=sys.stderr)
    return _outputs(args, events)


def _outputs(args: argparse.Namespace, events: list[Event]) -> int:
    from ipsecmgr.trace.pcap import write_pcap, write_wireshark_keys
    from ipsecmgr.trace.svg import render_svg

    flows = group_flows(with_inferred(events))
    chosen = pick_flow(flows, args.flow)
    if args.flow and chosen is None:
        print(f"ipsecmgr trace: no flow {args.flow!r} in the trace", file=sys.stderr)
        return 1
    selected = flows[chosen] if args.flow and chosen else [e for f in flows.values() for e in f]
    if args.diagram:
        if chosen is None:
            print("ipsecmgr trace: no flow to draw", file=sys.stderr)
            return 1
        args.diagram.write_text(render_svg(flows[chosen], flow_title(chosen, flows[chosen])))
        print(f"diagram of flow {chosen}: {args.diagram}", file=sys.stderr)
    if args.pcap:
        n = write_pcap(args.pcap, selected)
        print(f"{n} packets: {args.pcap}", file=sys.stderr)
    if args.wireshark_keys:
        try:
            keys = fetch_keys(args.socket)
        except ControlError as exc:
            print(f"ipsecmgr trace: --wireshark-keys needs the running daemon: {exc}",
                  file=sys.stderr)  # fmt: skip
            return 1
        files = write_wireshark_keys(args.wireshark_keys, keys, selected)
        print(KEYS_WARNING.format(files=" and ".join(map(str, files))), file=sys.stderr)
    return 0
