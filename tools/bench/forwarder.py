"""The "Python floor": a bare TUN <-> raw-socket forwarder, for tools/bench/tunnel.py.

Run (root, inside a lab namespace; tunnel.py starts one per side):

    python tools/bench/forwarder.py --tun ipsm0 --peer 198.51.100.2 \\
        --route 203.0.113.49/32 [--src 192.0.2.1] [--address 192.0.2.1/32] [--mtu 1400]

It moves packets exactly where our gateway does, with the same process layout as
``[gateway] datapath = "split"`` (one process per direction) and the same
routing (ipsecmgr.routing: marked sockets, a TUN table), but does nothing else:
no classification, no ESP header, no crypto, no counters. The inner packet read
from the TUN is sent as the payload of an IP protocol 50 packet to ``--peer``;
what arrives on the protocol-50 socket is written to the TUN after the outer
header. It is as fast as plain Python gets here (connected socket, preallocated
receive buffer, ``recv_into``): our gateway's throughput over this one is the
share of the floor that our per-packet work leaves.

Prints ``ready`` once up; SIGTERM removes the TUN, routes and rules.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ipsecmgr import sockets
from ipsecmgr.routing import Routing, TunRoute
from ipsecmgr.tun import Tun

BATCH = 64


def outbound(tun_fd: int, sock: socket.socket) -> None:
    """TUN -> raw socket, a batch per wake-up."""
    read, send = os.read, sock.send
    poller = select.poll()
    poller.register(tun_fd, select.POLLIN)
    while True:
        poller.poll()
        for _ in range(BATCH):
            try:
                packet = read(tun_fd, 65535)
            except BlockingIOError:
                break
            try:  # noqa: SIM105 - try is cheaper than contextlib.suppress per packet
                send(packet)
            except OSError:
                pass  # a full queue or an ICMP error: the floor drops, as ours does


def inbound(tun_fd: int, sock: socket.socket) -> None:
    """Raw socket -> TUN: strip the outer IPv4 header, write the payload."""
    buf = bytearray(65535)
    view = memoryview(buf)
    recv_into, write = sock.recv_into, os.write
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    while True:
        poller.poll()
        for _ in range(BATCH):
            try:
                n = recv_into(buf)
            except BlockingIOError:
                break
            hlen = (buf[0] & 0x0F) * 4
            try:  # noqa: SIM105 - try is cheaper than contextlib.suppress per packet
                write(tun_fd, view[hlen:n])
            except OSError:
                pass


STOP = {signal.SIGTERM, signal.SIGINT}


def _child(run: object, *args: object) -> int:
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP)  # SIGTERM from the parent ends us
        try:
            run(*args)  # type: ignore[operator]
        finally:
            os._exit(0)
    return pid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tun", default="ipsm0")
    p.add_argument("--mtu", type=int, default=1400)
    p.add_argument("--peer", required=True, help="the other forwarder's WAN address (IPv4)")
    p.add_argument("--route", action="append", default=[], help="prefix routed into the TUN")
    p.add_argument("--src", help="source address for the TUN routes")
    p.add_argument("--address", action="append", default=[], help="address on the TUN")
    args = p.parse_args(argv)
    routing = Routing()
    routing.remove_rules()
    routing.flush_table()
    if routing.link_exists(args.tun):
        routing.delete_link(args.tun)
    sock = sockets.esp_socket(socket.AF_INET, routing.mark)
    # A second socket for sending, connected (no address to parse per send); it
    # never reads, so a filter-free receive queue would only fill: shut it.
    send_sock = sockets.esp_socket(socket.AF_INET, routing.mark)
    send_sock.connect((args.peer, 0))
    send_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    routing.install_rules()
    tun = Tun(args.tun, args.mtu)
    pids: list[int] = []
    # Blocked, then waited for: no window where a SIGTERM could be missed.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP)
    try:
        for a in args.address:
            routing.add_address(tun.name, a)
        routing.add_tun_routes(tun.name, [TunRoute(r, args.src) for r in args.route])
        pids = [_child(outbound, tun.fd, send_sock), _child(inbound, tun.fd, sock)]
        print("ready", flush=True)
        signal.sigwait(STOP)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        sock.close()
        send_sock.close()
        tun.close()
        routing.remove_rules()
        routing.flush_table()
        routing.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
