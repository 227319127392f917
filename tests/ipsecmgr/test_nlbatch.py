"""ipsecmgr.nlbatch against the kernel, read back by iproute2 (an independent
netlink parser): what a batch installs, each request's errno, and the dump."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ipsecmgr.netns import NetnsPool

ROOT = Path(__file__).resolve().parents[2]
TABLE = 0x4950

# Runs inside the namespace: one batch of requests, a dump, both printed as JSON.
SCRIPT = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from ipsecmgr.nlbatch import RouteRequest as R, apply, dump
T = {TABLE}
tun = int(open("/sys/class/net/t0/ifindex").read())
requests = [
    R("replace", "192.0.2.0/24", T, 8, priority=32767),        # prohibit
    R("replace", "2001:db8:5::/64", T, 7, priority=32767),     # unreachable
    R("add", "203.0.113.49/32", T, oif=tun, prefsrc="192.0.2.1"),
    R("add", "203.0.113.49/32", T, oif=tun, prefsrc="192.0.2.1"),  # again: EEXIST
    R("replace", "192.0.2.0/24", T, 8, priority=32767),        # again: idempotent
    R("del", "198.51.100.0/24", T, 8, priority=32767),         # not there
    R("add", "198.51.100.7/32", T, oif=99999),                 # no such device
]
codes = apply(requests)
# More than one chunk (CHUNK = 256): every answer back in order
many = apply([R("replace", f"2001:db8:6::{{i:x}}/128", T, 8, priority=32767)
              for i in range(1, 601)])
routes = [r.__dict__ for r in dump(T)]
print(json.dumps({{"codes": codes, "many": many, "routes": routes}}))
"""


@pytest.mark.root
def test_batch_installs_what_iproute2_reads_back_with_one_errno_per_request(
    netns: NetnsPool,
) -> None:
    ns = netns.add("nl")
    ns.ip("tuntap", "add", "t0", "mode", "tun")
    ns.ip("addr", "add", "192.0.2.1/32", "dev", "t0")
    ns.ip("link", "set", "t0", "up")
    out = json.loads(ns.run([sys.executable, "-c", SCRIPT]).stdout)
    # EEXIST (17) for the second add, ESRCH (3) for the missing delete, ENODEV (19)
    assert out["codes"] == [0, 0, 0, 17, 0, 3, 19]
    assert out["many"] == [0] * 600
    v4 = ns.run(["ip", "route", "show", "table", str(TABLE)]).stdout.splitlines()
    assert [line.strip() for line in v4] == [
        "prohibit 192.0.2.0/24 proto static metric 32767",
        "203.0.113.49 dev t0 proto static src 192.0.2.1 linkdown",
    ]
    v6 = ns.run(["ip", "-6", "route", "show", "table", str(TABLE)]).stdout
    assert "unreachable 2001:db8:5::/64 dev lo proto static metric 32767" in v6
    assert v6.count("prohibit 2001:db8:6::") == 600
    # The dump: the same routes, prefixes spelled as inet_ntop does
    dumped = {(r["dst"], r["type"], r["priority"]) for r in out["routes"]}
    assert ("192.0.2.0/24", 8, 32767) in dumped
    assert ("2001:db8:5::/64", 7, 32767) in dumped
    assert ("203.0.113.49/32", 1, None) in dumped
    assert len(out["routes"]) == 3 + 600
