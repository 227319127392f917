"""UDP GSO sends of the data path (``Datapath._flush_out``) against the real kernel (root).

Two namespaces joined by a veth pair. In one, the data path sends a batch of
ESP-in-UDP payloads of mixed sizes. In the other, a plain UDP socket (no
UDP_GRO, so the kernel cuts every GSO packet back into datagrams,
net/ipv4/udp.c ``udp_rcv_segment``) reports each datagram's size and index.
The receiver is the oracle: every payload arrives once, in order, with its own
size. The counters say how many ``sendmsg`` calls carried more than one
datagram, and how many ESP packets went out.
"""

from __future__ import annotations

import json
import sys

import pytest

from ipsecmgr.lab.topology import LabProcess, python_env
from ipsecmgr.netns import NetnsPool

pytestmark = pytest.mark.root

A, B = "198.51.100.1", "198.51.100.2"

SENDER = """
import json, socket, sys
import esp, npusim
from ipsecmgr.datapath import Datapath
from ipsecmgr.packets import OutboundBinding
from ipsecmgr.sockets import enable_udp_offload, udp_socket
sizes = json.loads(sys.argv[1])
sock = udp_socket(socket.AF_INET, sys.argv[2], 4500, 0)
gso, _gro = enable_udp_offload(sock)
dp = Datapath(npusim.Classifier([]), npusim.SaFlowTable(), {}, {}, lambda name, packet: None)
if gso:
    dp.gso_socks.add(sock)
binding = OutboundBinding(esp.OutboundSA(1, bytes(36)), sock, (sys.argv[3], 4500), "tunnel")
# Payload i starts with its index: the receiver reports order and size.
datas = [i.to_bytes(4, "big") + bytes(n - 4) for i, n in enumerate(sizes)]
dp._flush_out({id(binding): (binding, datas, [])})
print(json.dumps({"gso": gso, "counters": dp.counters}), flush=True)
"""

RECEIVER = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind((sys.argv[1], 4500))
s.settimeout(5)
want, got = int(sys.argv[2]), []
print(json.dumps({"event": "listening"}), flush=True)
try:
    while len(got) < want:
        data = s.recv(65535)
        got.append([int.from_bytes(data[:4], "big"), len(data)])
except TimeoutError:
    pass
print(json.dumps({"event": "done", "got": got}), flush=True)
"""


def send_batch(netns: NetnsPool, sizes: list[int], mtu: int | None = None) -> tuple[dict, list]:  # type: ignore[type-arg]
    a, b = netns.add("a"), netns.add("b")
    netns.link(a, b, [f"{A}/24"], [f"{B}/24"], mtu=mtu)
    rx = LabProcess(b.popen([sys.executable, "-c", RECEIVER, B, str(len(sizes))],
                            env=python_env()), "receiver")  # fmt: skip
    rx.wait_for(lambda e: e.get("event") == "listening", timeout=10)
    out = a.run([sys.executable, "-c", SENDER, json.dumps(sizes), A, B])
    sent = json.loads(out.stdout)
    got = rx.wait_for(lambda e: e.get("event") == "done", timeout=15)["got"]
    return sent, got


def test_runs_of_equal_size_go_out_as_gso_and_arrive_as_sent(netns: NetnsPool) -> None:
    # 50 x 1400 then a shorter one: 46 (65000-byte limit) + 4 with the short one last;
    # 70 x 1400: 46 + 24; then 1200, 1200, 600: one more. A bigger packet after a
    # smaller one starts a new run.
    sizes = [1400] * 50 + [900] + [1400] * 70 + [1200, 1200, 600] + [1300]
    sent, got = send_batch(netns, sizes)
    assert sent["gso"] is True
    assert got == [[i, n] for i, n in enumerate(sizes)]
    assert sent["counters"] == {"esp_udp_gso_sends": 5, "esp_out_packets": len(sizes)}


def test_a_gso_send_the_kernel_refuses_is_sent_one_datagram_at_a_time(
    netns: NetnsPool,
) -> None:
    # A segment larger than the link MTU: udp_send_skb refuses the GSO send (EINVAL);
    # one datagram at a time, the kernel fragments them, and all of them arrive.
    sizes = [1400] * 10
    sent, got = send_batch(netns, sizes, mtu=1280)
    assert got == [[i, n] for i, n in enumerate(sizes)]
    assert sent["counters"] == {"esp_out_packets": 10}
