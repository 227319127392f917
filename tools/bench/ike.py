"""IKEv2 handshake cost: complete IKE_SA_INIT + IKE_AUTH between two in-memory engines.

Per DH group, prints ms per handshake and handshakes/s on one core (ours), and
in the same run the reference: the bare DH work of a handshake (key generation
on both sides + both shared-secret computations) with pyca/cryptography. The
difference is what the protocol engine itself costs (target <= 1 ms).

    /work/main/.venv/bin/python tools/bench/ike.py [--seconds 2.0]

Bounded: about ``seconds`` per measurement, 8 measurements (< 60 s).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ike.config import Identity, IkeConfig, IkeProposal
from ike.constants import DhGroup, EncrId, IntegId, PrfId
from ike.crypto import dh_generate
from ike.endpoint import IkeEndpoint
from ike.sa import IkeSA

A = ("198.51.100.1", 500)
B = ("198.51.100.2", 500)


def handshake(ci: IkeConfig, cr: IkeConfig) -> None:
    i = IkeSA(ci, True)
    ep = IkeEndpoint([cr])
    i.initiate(0.0)
    for _ in range(4):
        for d, _ in i.datagrams_to_send(0.0):
            ep.receive_datagram(d, A, 0.0)
        for d, _ in ep.datagrams_to_send(0.0):
            i.receive_datagram(d, B, 0.0)
    if not i.established:
        raise SystemExit("handshake failed")


def bare_dh(group: int) -> None:
    a, b = dh_generate(group), dh_generate(group)
    a.shared_secret(b.public)
    b.shared_secret(a.public)


def interleaved(
    fa: Callable[[], None], fb: Callable[[], None], seconds: float
) -> tuple[float, float]:
    """Median seconds per call of ``fa`` and ``fb``, measured in alternating rounds.

    Alternating keeps both figures under the same load (the machine is shared).
    """
    fa()
    fb()
    ra: list[float] = []
    rb: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(ra) < 5:
        for fn, out in ((fa, ra), (fb, rb)):
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            out.append((time.perf_counter() - t0) / 5)
    ra.sort()
    rb.sort()
    return ra[len(ra) // 2], rb[len(rb) // 2]


def configs(group: DhGroup) -> tuple[IkeConfig, IkeConfig]:
    prop = IkeProposal(EncrId.AES_GCM_16, 256, PrfId.HMAC_SHA2_256, IntegId.NONE, group)
    ida, idb = Identity.address(A[0]), Identity.address(B[0])
    ci = IkeConfig(A, B, ida, idb, b"k" * 32, ike_proposals=(prop,))
    cr = IkeConfig(B, A, idb, ida, b"k" * 32, ike_proposals=(prop,))
    return ci, cr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    head = ("group", "handshake ms", "hs/s", "bare DH ms", "overhead ms", "ratio")
    print(f"{head[0]:<12}{head[1]:>14}{head[2]:>9}{head[3]:>12}{head[4]:>13}{head[5]:>7}")
    for group in (DhGroup.MODP_2048, DhGroup.ECP_256, DhGroup.ECP_384, DhGroup.CURVE25519):
        ci, cr = configs(group)
        hs, dh = interleaved(
            lambda ci=ci, cr=cr: handshake(ci, cr),
            lambda group=group: bare_dh(group),
            args.seconds,
        )
        print(
            f"{group.name:<12}{hs * 1e3:>14.3f}{1 / hs:>9.0f}{dh * 1e3:>12.3f}"
            f"{(hs - dh) * 1e3:>13.3f}{hs / dh:>7.2f}"
        )
    print("ours: handshake = IKE_SA_INIT + IKE_AUTH (with the first Child SA), both engines")
    print("reference: bare DH = keygen on both sides + both exchanges (pyca/cryptography)")
    print("overhead = handshake - bare DH; target <= 1 ms")


if __name__ == "__main__":
    main()
