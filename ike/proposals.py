"""Proposal selection (§2.7, §3.3) and traffic selector narrowing (§2.9)."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

from .config import EspProposal, IkeProposal
from .constants import (
    EsnId,
    IntegId,
    NotifyType,
    ProtocolId,
    TransformType,
)
from .crypto import SUPPORTED_GROUPS, IkeSuite
from .errors import ProtocolError
from .payloads import Proposal, SAPayload, TrafficSelector, Transform

_KNOWN_TYPES = {int(t) for t in TransformType}


def _ike_transforms(encr: int, key_bits: int, prf: int, integ: int, dh: int) -> list[Transform]:
    t = [Transform(TransformType.ENCR, encr, key_bits), Transform(TransformType.PRF, prf)]
    if integ != IntegId.NONE:
        t.append(Transform(TransformType.INTEG, integ))
    t.append(Transform(TransformType.DH, dh))
    return t


def ike_sa_payload(proposals: Sequence[IkeProposal], spi: bytes = b"") -> SAPayload:
    """Our offer; ``spi`` is empty in IKE_SA_INIT and the new SPI in an IKE rekey (§3.3.1)."""
    return SAPayload(
        [
            Proposal(
                n, ProtocolId.IKE, spi, _ike_transforms(p.encr, p.key_bits, p.prf, p.integ, p.dh)
            )
            for n, p in enumerate(proposals, 1)
        ]
    )


def suite_payload(suite: IkeSuite, number: int, spi: bytes = b"") -> SAPayload:
    """The single proposal a responder returns (§2.7), numbered as the peer's."""
    t = _ike_transforms(suite.encr, suite.key_bits, suite.prf, suite.integ, suite.dh)
    return SAPayload([Proposal(number, ProtocolId.IKE, spi, t)])


def _by_type(prop: Proposal) -> dict[int, list[Transform]] | None:
    """Transforms grouped by type; None if the proposal has a type we do not know (§3.3.6)."""
    groups: dict[int, list[Transform]] = {}
    for t in prop.transforms:
        if t.type not in _KNOWN_TYPES:
            return None
        groups.setdefault(t.type, []).append(t)
    return groups


_NONE_MAY_BE_LEFT_OUT = frozenset({int(TransformType.INTEG), int(TransformType.DH)})


def _offers(groups: dict[int, list[Transform]], ttype: int, tid: int, klen: int | None) -> bool:
    offered = groups.get(ttype, ())
    if tid == 0 and ttype in _NONE_MAY_BE_LEFT_OUT:
        # "NONE" may be sent explicitly or left out (§3.3.2)
        return all(t.id == 0 for t in offered) or any(t.id == 0 for t in offered)
    return any(t.id == tid and t.key_length == klen for t in offered)


def select_ike(
    offer: SAPayload, ours: Sequence[IkeProposal], need_dh: bool = True
) -> tuple[IkeSuite, Proposal]:
    """Responder: first peer proposal (in its order) that one of ours matches."""
    for prop in offer.proposals:
        if prop.protocol != ProtocolId.IKE:
            continue
        groups = _by_type(prop)
        if groups is None:
            continue
        for mine in ours:
            if (
                _offers(groups, TransformType.ENCR, mine.encr, mine.key_bits)
                and _offers(groups, TransformType.PRF, mine.prf, None)
                and _offers(groups, TransformType.INTEG, mine.integ, None)
                and (not need_dh or _offers(groups, TransformType.DH, mine.dh, None))
            ):
                return _suite(mine.encr, mine.key_bits, mine.prf, mine.integ, mine.dh), prop
    raise ProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, "no acceptable IKE proposal")


def select_ike_for_ke(
    offer: SAPayload, ours: Sequence[IkeProposal], ke_group: int
) -> tuple[IkeSuite, Proposal]:
    """Responder with a KE in hand: prefer a proposal of that group, else ask for ours (§1.2)."""
    try:
        suite, prop = select_ike(offer, [o for o in ours if o.dh == ke_group])
    except ProtocolError:
        suite, prop = select_ike(offer, ours)
    if ke_group != suite.dh:
        raise ProtocolError(
            NotifyType.INVALID_KE_PAYLOAD, f"want group {suite.dh}", suite.dh.to_bytes(2, "big")
        )
    return suite, prop


@functools.lru_cache(maxsize=64)
def _suite(encr: int, key_bits: int, prf: int, integ: int, dh: int) -> IkeSuite:
    """One shared IkeSuite per set of algorithms (each IKE SA holds one: 72 bytes
    apiece otherwise). Only suites that match one of our proposals get here."""
    return IkeSuite(encr, key_bits, prf, integ, dh)


def accept_ike_response(answer: SAPayload, ours: Sequence[IkeProposal]) -> tuple[IkeSuite, bytes]:
    """Initiator: the answer must be one proposal with one of each transform we offered."""
    if len(answer.proposals) != 1:
        raise ProtocolError(NotifyType.INVALID_SYNTAX, "responder returned several proposals")
    prop = answer.proposals[0]
    groups = _by_type(prop)
    if groups is None or any(len(v) != 1 for v in groups.values()):
        raise ProtocolError(NotifyType.INVALID_SYNTAX, "responder proposal is not a single choice")
    encr = groups.get(TransformType.ENCR, [Transform(0, 0)])[0]
    prf = groups.get(TransformType.PRF, [Transform(0, 0)])[0]
    integ = groups.get(TransformType.INTEG, [Transform(0, 0)])[0]
    dh = groups.get(TransformType.DH, [Transform(0, 0)])[0]
    suite = IkeSuite(encr.id, encr.key_length or 0, prf.id, integ.id, dh.id)
    for m in ours:
        if (m.encr, m.key_bits, m.prf, m.integ) == (
            suite.encr,
            suite.key_bits,
            suite.prf,
            suite.integ,
        ) and (dh.id == 0 or m.dh == dh.id):
            return _suite(suite.encr, suite.key_bits, suite.prf, suite.integ, suite.dh), prop.spi
    raise ProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, "responder chose something we did not offer")


def ike_groups(ours: Sequence[IkeProposal]) -> list[int]:
    return [g for g in dict.fromkeys(int(p.dh) for p in ours) if g in SUPPORTED_GROUPS]


# --- ESP -----------------------------------------------------------------------


def esp_sa_payload(
    proposals: Sequence[EspProposal], spi: int, pfs_group: int | None = None
) -> SAPayload:
    out = []
    for n, p in enumerate(proposals, 1):
        t = [Transform(TransformType.ENCR, p.encr, p.key_bits)]
        if pfs_group:
            t.append(Transform(TransformType.DH, pfs_group))
        t.append(Transform(TransformType.ESN, EsnId.ESN if p.esn else EsnId.NO_ESN))
        out.append(Proposal(n, ProtocolId.ESP, spi.to_bytes(4, "big"), t))
    return SAPayload(out)


def select_esp(
    offer: SAPayload, ours: Sequence[EspProposal], pfs_group: int | None, ignore_dh: bool = False
) -> tuple[EspProposal, int, Proposal]:
    """Responder: (our proposal, peer SPI, the peer proposal it matched).

    ``ignore_dh`` in IKE_AUTH: the first Child SA gets its keys without a KE, so
    DH transforms offered there are ignored (§1.2).
    """
    for prop in offer.proposals:
        if prop.protocol != ProtocolId.ESP or len(prop.spi) != 4:
            continue
        groups = _by_type(prop)
        if groups is None:
            continue
        for mine in ours:
            esn = EsnId.ESN if mine.esn else EsnId.NO_ESN
            if (
                _offers(groups, TransformType.ENCR, mine.encr, mine.key_bits)
                and _offers(groups, TransformType.ESN, esn, None)
                and _offers(groups, TransformType.INTEG, IntegId.NONE, None)
                and (ignore_dh or _offers(groups, TransformType.DH, pfs_group or 0, None))
            ):
                return mine, int.from_bytes(prop.spi, "big"), prop
    raise ProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, "no acceptable ESP proposal")


def accept_esp_response(
    answer: SAPayload, ours: Sequence[EspProposal], pfs_group: int | None
) -> tuple[EspProposal, int]:
    if len(answer.proposals) != 1 or len(answer.proposals[0].spi) != 4:
        raise ProtocolError(NotifyType.INVALID_SYNTAX, "bad ESP proposal in response")
    prop = answer.proposals[0]
    groups = _by_type(prop)
    if groups is None or any(len(v) != 1 for v in groups.values()):
        raise ProtocolError(NotifyType.INVALID_SYNTAX, "ESP response is not a single choice")
    mine, spi, _ = select_esp(answer, ours, pfs_group)
    return mine, spi


def esp_response_payload(chosen: EspProposal, number: int, spi: int, pfs: int | None) -> SAPayload:
    sa = esp_sa_payload([chosen], spi, pfs)
    sa.proposals[0].number = number
    return sa


# --- Traffic selectors (§2.9) -------------------------------------------------------


def _intersect(a: TrafficSelector, b: TrafficSelector) -> TrafficSelector | None:
    version, a_lo, a_hi = a.version, a.start, a.end
    b_lo, b_hi = b.start, b.end
    if version != b.version:
        return None
    if a.ip_proto and b.ip_proto and a.ip_proto != b.ip_proto:
        return None
    lo, hi = max(a_lo, b_lo), min(a_hi, b_hi)
    sp, ep = max(a.start_port, b.start_port), min(a.end_port, b.end_port)
    if lo > hi or sp > ep:
        return None
    proto = a.ip_proto or b.ip_proto
    # Usually one side holds the other (the peer proposes our selector, or a part
    # of it): return that object rather than build an equal one (it is immutable).
    for ts in (a, b):
        if (lo, hi, sp, ep, proto) == (ts.start, ts.end, ts.start_port, ts.end_port, ts.ip_proto):
            return ts
    mk = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    return TrafficSelector(mk(lo), mk(hi), proto, sp, ep)


def narrow(
    offered: Sequence[TrafficSelector], allowed: Sequence[TrafficSelector]
) -> list[TrafficSelector]:
    """The parts of ``offered`` that ``allowed`` permits (responder narrowing, §2.9)."""
    out: list[TrafficSelector] = []
    for o in offered:
        for a in allowed:
            ts = _intersect(o, a)
            if ts is not None and ts not in out:
                out.append(ts)
    return out


def is_subset(inner: Sequence[TrafficSelector], outer: Sequence[TrafficSelector]) -> bool:
    """Initiator check: the responder may only narrow what we proposed."""
    return all(any(_intersect(i, o) == i for o in outer) for i in inner)
