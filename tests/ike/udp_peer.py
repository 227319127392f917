"""Our IKE engine on real UDP sockets (500 and 4500), for the strongSwan interop test.

Runs inside a network namespace as a child process of the test:

    python udp_peer.py init|resp LOCAL_IP PEER_IP GROUP PSK_HEX

Commands arrive on stdin, one per line (live, newchild, rekeychild, rekeyike,
delchild, delete, quit; hold, release1 [request|response] and release delay what
we send); every
event goes to stdout as one JSON line (keys left out). The loop is the whole
"daemon": a selector over both sockets and stdin, and
``IkeEndpoint.get_timer()`` as the only timeout.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from ike import (
    DhGroup,
    EncrId,
    Identity,
    IkeConfig,
    IkeEndpoint,
    IkeProposal,
    IkeSA,
    IntegId,
    PrfId,
)
from ike.constants import NON_ESP_MARKER
from ike.payloads import parse_header


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, int | str | bool) or v is None:
        return v
    if isinstance(v, list):
        return [str(x) for x in v]
    return str(v)


def _kind(data: bytes) -> str:
    """Held datagram: "request" or "response", from the R flag in the IKE header (§3.1)."""
    if data[:4] == NON_ESP_MARKER:
        data = data[4:]
    return "response" if parse_header(data).is_response else "request"


def command(sa: IkeSA, cmd: str, now: float) -> None:
    first, last = min(sa.children, default=0), max(sa.children, default=0)
    if cmd == "live":
        sa.liveness_check(now)
    elif cmd == "newchild":
        sa.create_child(now)
    elif cmd == "rekeychild":
        sa.rekey_child(first, now)
    elif cmd == "rekeyike":
        sa.rekey_ike(now)
    elif cmd == "delchild":
        sa.delete_child(last, now)
    elif cmd == "delete":
        sa.delete(now)


def main() -> None:
    role, local, peer, group, psk = sys.argv[1:6]
    prop = IkeProposal(
        EncrId.AES_GCM_16, 256, PrfId.HMAC_SHA2_256, IntegId.NONE, DhGroup(int(group))
    )
    cfg = IkeConfig(
        (local, 500), (peer, 500), Identity.address(local), Identity.address(peer),
        bytes.fromhex(psk), ike_proposals=(prop,), name="sw",
    )  # fmt: skip
    sel = selectors.DefaultSelector()
    socks: dict[int, socket.socket] = {}
    for port in (500, 4500):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((local, port))
        s.setblocking(False)
        socks[port] = s
        sel.register(s, selectors.EVENT_READ, port)
    sel.register(sys.stdin, selectors.EVENT_READ, "cmd")
    t0 = time.monotonic()

    def now() -> float:
        return time.monotonic() - t0

    def out(**kw: Any) -> None:
        print(json.dumps(kw), flush=True)

    ep = IkeEndpoint([cfg], log=lambda line: out(log=line))
    holding = False
    held: list[tuple[bytes, tuple[str, int]]] = []
    if role == "init":
        ep.initiate(cfg, now())
    out(ready=True)
    pending = ""
    while True:
        for data, (ip, port) in ep.datagrams_to_send(now()):
            if holding:  # test hook: datagrams wait "in the network" until release
                held.append((data, (ip, port)))
                continue
            socks[4500 if port == 4500 else 500].sendto(data, (ip, port))
        while (e := ep.next_event()) is not None:
            fields = {k: _plain(v) for k, v in vars(e).items() if not k.endswith("_key")}
            out(event=type(e).__name__, **fields)
        timer = ep.get_timer()
        timeout = None if timer is None else max(0.0, timer - now())
        for key, _ in sel.select(timeout):
            if key.data == "cmd":
                # raw reads: a buffered readline() could leave a second command unseen
                chunk = os.read(0, 4096)
                pending += chunk.decode()
                while "\n" in pending or not chunk:
                    cmd, _, pending = pending.partition("\n")
                    if cmd in ("", "quit"):
                        out(counters=ep.counters)
                        return
                    if cmd == "hold":
                        holding = True
                        continue
                    if cmd.startswith("release1"):
                        # Only the oldest held datagram, or with a kind the oldest held
                        # request or response: our retransmissions are held too, so
                        # which datagram is oldest depends on how long the test took.
                        want = cmd.partition(" ")[2].strip()
                        i = next((i for i, h in enumerate(held) if want in ("", _kind(h[0]))), -1)
                        if i < 0:
                            out(error=f"nothing held for {cmd}")
                            continue
                        data, (ip, port) = held.pop(i)
                        socks[4500 if port == 4500 else 500].sendto(data, (ip, port))
                        continue
                    if cmd == "release":
                        holding = False
                        for data, (ip, port) in held:
                            socks[4500 if port == 4500 else 500].sendto(data, (ip, port))
                        held.clear()
                        continue
                    if not ep.sas:
                        out(error=f"no IKE SA for {cmd}")
                        continue
                    command(ep.sas[0], cmd.strip(), now())
                continue
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            data, addr = sock.recvfrom(65535)
            if key.data == 4500 and data[:4] != NON_ESP_MARKER:
                continue  # ESP-in-UDP or a NAT keepalive: the data path's business
            ep.receive_datagram(data, addr, now(), (local, key.data))
        if (t := ep.get_timer()) is not None and t <= now():
            ep.handle_timer(now())


if __name__ == "__main__":
    main()
