"""NAT detection (§2.23) and the float to UDP 4500 with the non-ESP marker (RFC 3948)."""

from __future__ import annotations

import hashlib
import ipaddress

from ike.constants import NotifyType
from ike.events import NatDetected
from ike.payloads import TrafficSelector, find_notify, parse_message

from .pair import I_ADDR, R_ADDR, Pair, configs


def _sha1(spi_i: bytes, spi_r: bytes, addr: tuple[str, int]) -> bytes:
    ip = ipaddress.ip_address(addr[0]).packed
    return hashlib.sha1(spi_i + spi_r + ip + addr[1].to_bytes(2, "big")).digest()


def test_nat_d_hashes_on_the_wire() -> None:
    p = Pair(*configs())
    p.handshake()
    _, req, _ = parse_message(p.wire[0][2])
    _, resp, _ = parse_message(p.wire[1][2])
    spi_i, spi_r = p.i.ch.spi_i, p.r.ch.spi_r
    zero = b"\x00" * 8
    src = find_notify(req, NotifyType.NAT_DETECTION_SOURCE_IP)
    dst = find_notify(req, NotifyType.NAT_DETECTION_DESTINATION_IP)
    assert src is not None and dst is not None
    assert src.data == _sha1(spi_i, zero, I_ADDR) and dst.data == _sha1(spi_i, zero, R_ADDR)
    rsrc = find_notify(resp, NotifyType.NAT_DETECTION_SOURCE_IP)
    rdst = find_notify(resp, NotifyType.NAT_DETECTION_DESTINATION_IP)
    assert rsrc is not None and rdst is not None
    assert rsrc.data == _sha1(spi_i, spi_r, R_ADDR) and rdst.data == _sha1(spi_i, spi_r, I_ADDR)
    assert not p.i.nat_detected_local and not p.i.nat_detected_remote
    assert not p.r.nat_detected_local and not p.r.nat_detected_remote
    assert not p.i.nat_t and all(d[1] == 500 for d in p.dest)


def test_real_nat_in_front_of_initiator() -> None:
    ts = (TrafficSelector.from_network("10.0.0.0/24"), TrafficSelector.from_network("10.1.0.0/24"))
    # the responder knows the peer by its public (NAT) address
    p = Pair(
        *configs(
            r_peer_addr=("203.0.113.7", 500),
            i_local_ts=ts[:1],
            i_remote_ts=ts[1:],
            r_local_ts=ts[1:],
            r_remote_ts=ts[:1],
        )
    )
    p.i_src = ("203.0.113.7", 1024)
    p.i_src_4500 = ("203.0.113.7", 1025)
    p.handshake()
    assert p.i.established and p.r.established
    assert p.i.nat_detected_local and not p.i.nat_detected_remote
    assert p.r.nat_detected_remote and not p.r.nat_detected_local
    assert p.events_of("i", NatDetected)[0].local_behind_nat
    # IKE_AUTH went to port 4500 with the non-ESP marker, the answer back to the NAT's port
    assert p.dest[2] == (R_ADDR[0], 4500) and p.wire[2][2][:4] == b"\x00" * 4
    assert p.dest[3] == ("203.0.113.7", 1025) and p.wire[3][2][:4] == b"\x00" * 4
    p.r.liveness_check(p.now)
    p.roundtrip()
    assert p.dest[-2] == ("203.0.113.7", 1025) and p.r.counters["liveness_ok"] == 1


def test_fake_nat_like_strongswan_encap() -> None:
    p = Pair(*configs(i_fake_nat=True))
    p.handshake()
    assert p.r.nat_detected_remote and not p.i.nat_detected_local
    assert p.i.nat_t and p.r.nat_t
    assert p.dest[2] == (R_ADDR[0], 4500) and p.dest[3] == (I_ADDR[0], 4500)
