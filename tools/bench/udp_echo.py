"""A tiny UDP echo server and round-trip client, for tools/bench/tunnel.py.

    python tools/bench/udp_echo.py server --bind 203.0.113.49 [--port 7007] [--max-seconds 600]
    python tools/bench/udp_echo.py client --server 203.0.113.49 --bind 192.0.2.1 \
        [--count 1000] [--warmup 10] [--size 32] [--max-seconds 30]

The server prints ``{"event": "listening", ...}`` once bound (a readiness line the
caller waits for, no sleeping) and echoes every datagram back until it is killed
or ``--max-seconds`` have passed. The client sends one datagram, waits for its echo
(1 s at most), and repeats: ``count`` round trips after ``warmup`` unmeasured ones,
never longer than ``--max-seconds`` in all. It prints one JSON line with the median,
p90, min and max round-trip time in µs and how many were lost (with
``--samples``, every round trip too, in the order measured). Each datagram
carries its sequence number, so a late echo of an earlier one is not taken for the
current one.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import struct
import sys
import time
from collections.abc import Sequence

PORT = 7007
_SEQ = struct.Struct("!Q")


def serve(bind: str, port: int, max_seconds: float) -> int:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((bind, port))
    sock.settimeout(1.0)
    print(json.dumps({"event": "listening", "address": bind, "port": port}), flush=True)
    deadline = time.monotonic() + max_seconds
    buf = bytearray(65535)
    while time.monotonic() < deadline:
        try:
            n, addr = sock.recvfrom_into(buf)
        except TimeoutError:
            continue
        sock.sendto(memoryview(buf)[:n], addr)
    return 0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted, non-empty list."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def ping(
    server: str,
    port: int,
    bind: str | None,
    count: int,
    warmup: int,
    size: int,
    max_seconds: float,
    samples: bool = False,
) -> dict[str, object]:
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if bind:
        sock.bind((bind, 0))
    sock.connect((server, port))
    sock.settimeout(1.0)
    pad = bytes(max(0, size - _SEQ.size))
    rtts: list[float] = []
    lost = 0
    deadline = time.monotonic() + max_seconds
    clock = time.perf_counter_ns
    seq = 0
    while seq < warmup + count and time.monotonic() < deadline:
        seq += 1
        msg = _SEQ.pack(seq) + pad
        t0 = clock()
        sock.send(msg)
        while True:
            try:
                reply = sock.recv(65535)
            except (TimeoutError, ConnectionRefusedError):
                # No echo within 1 s (or an ICMP error): this round trip is lost.
                reply = b""
                break
            if reply[: _SEQ.size] == msg[: _SEQ.size]:
                break  # a late echo of an earlier datagram is skipped
        t1 = clock()
        if seq <= warmup:
            continue
        if reply:
            rtts.append((t1 - t0) / 1000)
        else:
            lost += 1
    result: dict[str, object] = {"samples_us": [round(x, 1) for x in rtts]} if samples else {}
    rtts.sort()
    result |= {
        "count": len(rtts) + lost,
        "received": len(rtts),
        "lost": lost,
        "size": size,
    }
    if rtts:
        result.update(
            median_us=statistics.median(rtts),
            p90_us=percentile(rtts, 90),
            min_us=rtts[0],
            max_us=rtts[-1],
        )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, default=PORT)
    s.add_argument("--max-seconds", type=float, default=600.0)
    c = sub.add_parser("client")
    c.add_argument("--server", required=True)
    c.add_argument("--port", type=int, default=PORT)
    c.add_argument("--bind")
    c.add_argument("--count", type=int, default=1000)
    c.add_argument("--warmup", type=int, default=10)
    c.add_argument("--size", type=int, default=32)
    c.add_argument("--max-seconds", type=float, default=30.0)
    c.add_argument("--samples", action="store_true", help="also print every round trip, µs")
    a = p.parse_args(argv)
    if a.cmd == "server":
        return serve(a.bind, a.port, a.max_seconds)
    result = ping(a.server, a.port, a.bind, a.count, a.warmup, a.size, a.max_seconds, a.samples)
    print(json.dumps(result), flush=True)
    return 0 if result["received"] else 1


if __name__ == "__main__":
    sys.exit(main())
