"""What the trace hooks cost the data path when tracing is off.

Run: /work/main/.venv/bin/python tools/bench/trace_overhead.py [--quick]

Ours: ``ipsecmgr.datapath.Datapath`` as shipped, ``trace = None`` (one
``is not None`` branch per stage). Reference, measured in the same run: the
same module with the hooks compiled out (every ``if tr is not None: ...`` and
``tr = self.trace`` removed from its AST), so it follows future edits of the
data path. Both run the same loop in-process with fake sockets: a packet
classified (step 3) and encrypted and "sent" (7), then an ESP packet looked
up (9), decrypted (10) and written to /dev/null as the TUN (12).

Figure: packets per second through both directions (median of REPEATS
samples each); ratio = ours / reference, the median of the ratios of adjacent
samples (the issue's bar: >= 0.98). Samples are short and alternate between
the two, so that load from elsewhere on this shared VM hits both alike.
"""

from __future__ import annotations

import ast
import os
import socket
import statistics
import sys
import timeit
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scapy.layers.inet import IP, TCP  # noqa: E402

import esp  # noqa: E402
import npusim  # noqa: E402
from ipsecmgr import datapath as shipped  # noqa: E402

BATCH = 500
PASSES = 2
REPEATS = 401
CLIENT, SERVER, PEER = "192.0.2.1", "203.0.113.49", "198.51.100.2"
SPI_OUT, SPI_IN = 0xC0DE, 0xBEEF


class _StripHooks(ast.NodeTransformer):
    """Remove ``tr = self.trace`` and every ``if tr is not None:`` block."""

    def visit_If(self, node: ast.If) -> Any:
        t = node.test
        if (
            isinstance(t, ast.Compare)
            and isinstance(t.left, ast.Name)
            and t.left.id == "tr"
            and isinstance(t.ops[0], ast.IsNot)
        ):
            return None
        return self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> Any:
        if any(isinstance(t, ast.Name) and t.id == "tr" for t in node.targets):
            return None
        return node


def without_hooks() -> types.ModuleType:
    tree = ast.parse(Path(shipped.__file__).read_text())
    tree = ast.fix_missing_locations(_StripHooks().visit(tree))
    # A block left empty by the removal (only a hook inside) gets a ``pass``.
    for node in ast.walk(tree):
        for field in ("body", "orelse"):
            block = getattr(node, field, None)
            if isinstance(block, list) and not block and field == "body":
                block.append(ast.Pass())
    module = types.ModuleType("datapath_without_hooks")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(tree, "datapath_without_hooks", "exec"), module.__dict__)
    source = ast.unparse(tree)
    assert "trace(" not in source.replace("self.trace: ", ""), "a hook survived"
    return module


class FakeSock:
    def sendto(self, data: bytes, addr: Any) -> int:
        return len(data)


def build(module: types.ModuleType) -> tuple[Any, list[bytes], list[bytes], Any]:
    acl = npusim.parse_acl("tacacs", [f"permit ip host {CLIENT} host {SERVER}"])
    classifier = npusim.Classifier([npusim.CryptoMap("tacacs", acl, (PEER,))])
    saflow = npusim.SaFlowTable()
    dp = module.Datapath(classifier, saflow, {socket.AF_INET: FakeSock()}, {}, lambda n, p: None)
    key_out, key_in = os.urandom(36), os.urandom(36)
    dp.outbound["tacacs"] = module.OutboundBinding(
        esp.OutboundSA(SPI_OUT, key_out), FakeSock(), (PEER, 0), "tunnel"
    )
    dp.tun_for_map["tacacs"] = os.open(os.devnull, os.O_WRONLY)
    out_pkts = [
        bytes(IP(src=CLIENT, dst=SERVER) / TCP(sport=40000, dport=49, seq=i) / (b"x" * 100))
        for i in range(BATCH)
    ]
    peer = esp.OutboundSA(SPI_IN, key_in)
    replies = [
        bytes(IP(src=SERVER, dst=CLIENT) / TCP(sport=49, dport=40000) / (b"y" * 100))
    ] * BATCH
    in_pkts = [peer.encapsulate(p, 4) for p in replies]
    v4 = npusim.TrafficSelector
    s, c = (int.from_bytes(socket.inet_aton(a), "big") for a in (SERVER, CLIENT))

    def fresh_inbound() -> None:
        # a new SA per pass: the replay window would reject the same packets again
        saflow.remove(SPI_IN)
        saflow.add(SPI_IN, esp.InboundSA(SPI_IN, key_in), [v4(4, 0, s, s)], [v4(4, 0, c, c)],
                   "tacacs")  # fmt: skip

    saflow.add(SPI_IN, esp.InboundSA(SPI_IN, key_in), [v4(4, 0, s, s)], [v4(4, 0, c, c)], "tacacs")
    return dp, out_pkts, in_pkts, fresh_inbound


def loop(dp: Any, out_pkts: list[bytes], in_pkts: list[bytes], fresh: Any) -> Any:
    classify = dp.classifier.classify
    handle_outbound, handle_inbound = dp.handle_outbound, dp.handle_inbound
    src, dst, fam = socket.inet_aton(PEER), socket.inet_aton(CLIENT), socket.AF_INET

    def run() -> None:
        fresh()
        for p in out_pkts:
            handle_outbound(p, classify(p))
        for e in in_pkts:
            handle_inbound(e, src, dst, fam)

    return run


def main() -> int:
    quick = "--quick" in sys.argv
    passes, repeats = (PASSES, 41) if quick else (PASSES, REPEATS)
    ours = build(shipped)
    ref = build(without_hooks())
    assert ours[0].trace is None
    run_ours, run_ref = loop(*ours), loop(*ref)
    a: list[float] = []
    b: list[float] = []
    t_ours, t_ref = timeit.Timer(run_ours), timeit.Timer(run_ref)
    for i in range(repeats):
        # alternate which goes first, so that neither always runs in the other's wake
        if i % 2:
            b.append(t_ref.timeit(passes))
            a.append(t_ours.timeit(passes))
        else:
            a.append(t_ours.timeit(passes))
            b.append(t_ref.timeit(passes))
    per = passes * BATCH * 2  # packets per sample, both directions
    ours_pps, ref_pps = per / statistics.median(a), per / statistics.median(b)
    # The ratio of each adjacent pair, then the median: other load on this shared
    # VM comes and goes, and a pair taken milliseconds apart sees the same load.
    ratio = statistics.median(tb / ta for ta, tb in zip(a, b, strict=True))
    # Both really moved the packets (no silent drop makes a loop look fast)
    for dp, _, _, _ in (ours, ref):
        assert (
            dp.counters.get("esp_out_packets", 0) > 0 and dp.counters.get("esp_in_packets", 0) > 0
        )
        assert not any("drop" in k or "error" in k for k in dp.counters), dp.counters
    print(f"data path, tracing off (trace = None): {ours_pps:,.0f} packets/s")
    print(f"reference, hooks compiled out:         {ref_pps:,.0f} packets/s")
    print(f"ratio ours / reference (median of paired samples): {ratio:.3f} (bar: >= 0.98)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
