"""Child SAs: negotiation shared by IKE_AUTH and CREATE_CHILD_SA (§1.3.1, §1.3.3, §2.9, §2.17)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import events as ev
from .. import lifetimes
from ..config import EspProposal
from ..constants import (
    EncrId,
    ExchangeType,
    NotifyType,
    PayloadType,
    ProtocolId,
)
from ..crypto import (
    SUPPORTED_GROUPS,
    DhKey,
    child_keymat,
    dh_generate,
    encr_key_size,
)
from ..errors import ProtocolError
from ..payloads import (
    KEPayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    SAPayload,
    TrafficSelector,
    TSPayload,
    find,
    find_notify,
)
from ..proposals import (
    accept_esp_response,
    esp_response_payload,
    esp_sa_payload,
    is_subset,
    narrow,
    select_esp,
)
from ..state import ChildSA, ChildState, Inbound
from .base import NONCE_LEN, Task, _error_notify, _nonce, _require, _retry_later, _shared, _ts
from .informational import ChildDelete

if TYPE_CHECKING:
    from ..sa import IkeSA


# --- Child SA negotiation shared by IKE_AUTH and CREATE_CHILD_SA ----------------------------


@dataclass
class ChildOffer:
    """What an initiator proposed for one Child SA."""

    spi_in: int
    local_ts: list[TrafficSelector]
    remote_ts: list[TrafficSelector]
    transport: bool
    pfs_group: int | None
    dh: DhKey | None = None
    ni: bytes = b""
    rekeyed_from: int | None = None
    extra: list[Payload] = field(default_factory=list)


def _offer(sa: IkeSA, with_pfs: bool, rekey: ChildSA | None = None) -> ChildOffer:
    if rekey is not None:
        lts, rts = list(rekey.local_ts), list(rekey.remote_ts)
        transport = rekey.mode == "transport"
    else:
        lts, rts = sa.config.traffic_selectors(sa.caches.host_ts)
        transport = sa.config.mode == "transport"
    pfs = int(sa.config.pfs_group) if with_pfs and sa.config.pfs_group else None
    return ChildOffer(
        sa.new_child_spi(),
        lts,
        rts,
        transport,
        pfs,
        dh_generate(pfs) if pfs else None,
        rekeyed_from=rekey.child_id if rekey else None,
    )


def _offer_payloads(sa: IkeSA, o: ChildOffer, nonce: bytes | None) -> list[Payload]:
    """[N(USE_TRANSPORT_MODE),] SA, [Ni, [KEi,]] TSi, TSr (§1.3.1 order)."""
    out: list[Payload] = []
    if o.transport:
        out.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
    out.append(esp_sa_payload(sa.config.esp_proposals, o.spi_in, o.pfs_group))
    if nonce is not None:
        out.append(NoncePayload(nonce))
        if o.dh is not None:
            out.append(KEPayload(o.dh.group, o.dh.public))
    out += [TSPayload(o.local_ts, PayloadType.TSi), TSPayload(o.remote_ts, PayloadType.TSr)]
    return out


def _install(
    sa: IkeSA,
    *,
    exchange_initiator: bool,
    ni: bytes,
    nr: bytes,
    g_ir: bytes,
    chosen: EspProposal,
    spi_in: int,
    spi_out: int,
    local_ts: list[TrafficSelector],
    remote_ts: list[TrafficSelector],
    transport: bool,
    now: float,
    rekeyed_from: int | None,
) -> ChildSA:
    """§2.17: KEYMAT = prf+(SK_d, [g^ir |] Ni | Nr); i→r keys first, then r→i.

    SK_d is that of the IKE SA the exchange ran on, which is the old one when
    the exchange crossed an IKE rekey.
    """
    ch = sa.xch or sa.ch
    assert ch.prf is not None and ch.keys is not None
    n = encr_key_size(chosen.encr, chosen.key_bits)
    km = child_keymat(ch.prf, ch.keys.sk_d, ni, nr, 2 * n, g_ir)
    i2r, r2i = km[:n], km[n:]
    out_key, in_key = (i2r, r2i) if exchange_initiator else (r2i, i2r)
    child = ChildSA(
        sa.new_child_id(),
        spi_in,
        spi_out,
        in_key,
        out_key,
        "transport" if transport else "tunnel",
        chosen.esn,
        chosen.key_bits,
        tuple(local_ts),
        tuple(remote_ts),
        now,
    )
    lifetimes.arm_child(sa, child, now)
    sa.children[child.child_id] = child
    sa.emit(
        ev.ChildSaInstalled(
            sa.name,
            child.child_id,
            spi_in,
            spi_out,
            in_key,
            out_key,
            child.mode,
            child.esn,
            child.local_ts,
            child.remote_ts,
            "ESP",
            EncrId(chosen.encr).name,
            chosen.key_bits,
            rekeyed_from,
        )
    )
    return child


def _accept_child(
    sa: IkeSA, p: list[Payload], o: ChildOffer, ni: bytes, nr: bytes, now: float
) -> ChildSA:
    """Initiator: check the responder's SA/TS answer and install the Child SA."""
    err = _error_notify(p)
    if err is not None:
        raise ProtocolError(err.notify_type, "Child SA refused")
    sa_p = _require(p, SAPayload, "SA")
    chosen, spi_out = accept_esp_response(sa_p, sa.config.esp_proposals, o.pfs_group)
    tsi, tsr = _ts(p, PayloadType.TSi), _ts(p, PayloadType.TSr)
    if not is_subset(tsi, o.local_ts) or not is_subset(tsr, o.remote_ts):
        raise ProtocolError(NotifyType.TS_UNACCEPTABLE, "responder widened the selectors")
    g_ir = b""
    if o.dh is not None:
        ke = find(p, KEPayload)
        if ke is None or ke.group != o.dh.group:
            raise ProtocolError(NotifyType.INVALID_SYNTAX, "missing PFS KE")
        g_ir = _shared(o.dh, ke.data)
    transport = o.transport and find_notify(p, NotifyType.USE_TRANSPORT_MODE) is not None
    return _install(
        sa,
        exchange_initiator=True,
        ni=ni,
        nr=nr,
        g_ir=g_ir,
        chosen=chosen,
        spi_in=o.spi_in,
        spi_out=spi_out,
        local_ts=tsi,
        remote_ts=tsr,
        transport=transport,
        now=now,
        rekeyed_from=o.rekeyed_from,
    )


def _respond_child(
    sa: IkeSA,
    p: list[Payload],
    ni: bytes,
    nr: bytes,
    now: float,
    in_ike_auth: bool,
    rekeyed_from: int | None = None,
    ts_from: ChildSA | None = None,
) -> tuple[list[Payload], ChildSA]:
    """Responder: pick an ESP proposal, narrow the selectors (§2.9), install."""
    sa_p = _require(p, SAPayload, "SA")
    tsi, tsr = _ts(p, PayloadType.TSi), _ts(p, PayloadType.TSr)
    ke = find(p, KEPayload)
    pfs = None
    if not in_ike_auth and sa.config.pfs_group:
        pfs = int(sa.config.pfs_group)
    elif not in_ike_auth and ke is not None:
        raise ProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, "PFS not configured")
    chosen, spi_out, prop = select_esp(sa_p, sa.config.esp_proposals, pfs, ignore_dh=in_ike_auth)
    g_ir = b""
    dh: DhKey | None = None
    if pfs:
        if ke is None or ke.group != pfs:
            raise ProtocolError(
                NotifyType.INVALID_KE_PAYLOAD, "want PFS group", pfs.to_bytes(2, "big")
            )
        dh = dh_generate(pfs)
        g_ir = _shared(dh, ke.data)
    local_allowed: Sequence[TrafficSelector]
    remote_allowed: Sequence[TrafficSelector]
    if ts_from is not None:
        local_allowed, remote_allowed = ts_from.local_ts, ts_from.remote_ts
    else:
        local_allowed, remote_allowed = sa.config.traffic_selectors(sa.caches.host_ts)
    # TSi are the initiator's (our remote) selectors, TSr ours (§2.9)
    tsi_n, tsr_n = narrow(tsi, remote_allowed), narrow(tsr, local_allowed)
    if not tsi_n or not tsr_n:
        raise ProtocolError(NotifyType.TS_UNACCEPTABLE, "no overlap with our selectors")
    transport = (
        find_notify(p, NotifyType.USE_TRANSPORT_MODE) is not None and sa.config.mode == "transport"
    )
    spi_in = sa.new_child_spi()
    child = _install(
        sa,
        exchange_initiator=False,
        ni=ni,
        nr=nr,
        g_ir=g_ir,
        chosen=chosen,
        spi_in=spi_in,
        spi_out=spi_out,
        local_ts=tsr_n,
        remote_ts=tsi_n,
        transport=transport,
        now=now,
        rekeyed_from=rekeyed_from,
    )
    out: list[Payload] = []
    if transport:
        out.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
    out.append(esp_response_payload(chosen, prop.number, spi_in, pfs))
    if not in_ike_auth:
        out.append(NoncePayload(nr))
        if dh is not None:
            out.append(KEPayload(dh.group, dh.public))
    out += [TSPayload(tsi_n, PayloadType.TSi), TSPayload(tsr_n, PayloadType.TSr)]
    return out, child


# --- CREATE_CHILD_SA ----------------------------------------------------------------------
#   new Child:   HDR, SK { SA, Ni, [KEi,] TSi, TSr }  -->
#                                 <--  HDR, SK { SA, Nr, [KEr,] TSi, TSr }
#   Child rekey: HDR, SK { N(REKEY_SA), SA, Ni, [KEi,] TSi, TSr }  -->  (§1.3.3), same answer
#   IKE rekey:   HDR, SK { SA, Ni, KEi }  -->  <--  HDR, SK { SA, Nr, KEr }  (§1.3.2)


class _ChildTask(Task):
    exchange = ExchangeType.CREATE_CHILD_SA

    def __init__(self) -> None:
        self.offer: ChildOffer | None = None
        self.ni = b""
        self.ke_retried = False

    def _handle_invalid_ke(self, sa: IkeSA, p: list[Payload], now: float) -> bool:
        """Retry once with the group the responder asks for; raise on any other error."""
        n = find_notify(p, NotifyType.INVALID_KE_PAYLOAD)
        if n is None:
            err = _error_notify(p)
            if err is not None:
                raise ProtocolError(err.notify_type, "refused by peer")
        if n is None or self.ke_retried or self.offer is None or len(n.data) != 2:
            return False
        group = int.from_bytes(n.data, "big")
        if group not in SUPPORTED_GROUPS:
            return False
        self.ke_retried = True
        self.offer.pfs_group = group
        self.offer.dh = dh_generate(group)
        sa.retry_task(self, now)
        return True


class ChildCreate(_ChildTask):
    def build(self, sa: IkeSA, now: float) -> list[Payload]:
        if self.offer is None:
            self.offer = _offer(sa, with_pfs=True)
        self.ni = sa.rng(NONCE_LEN)
        return _offer_payloads(sa, self.offer, self.ni)

    def process(self, sa: IkeSA, msg: Inbound, now: float) -> None:
        assert self.offer is not None
        if self._handle_invalid_ke(sa, msg.payloads, now):
            return
        _accept_child(sa, msg.payloads, self.offer, self.ni, _nonce(msg.payloads), now)


class ChildRekey(_ChildTask):
    def __init__(self, child_id: int) -> None:
        super().__init__()
        self.child_id = child_id
        self.collision: bytes | None = None  # lowest nonce of the peer's colliding exchange

    def build(self, sa: IkeSA, now: float) -> list[Payload] | None:
        old = sa.children.get(self.child_id)
        if old is None or old.state not in (ChildState.INSTALLED, ChildState.REKEYING):
            return None
        old.state = ChildState.REKEYING
        if self.offer is None:
            self.offer = _offer(sa, with_pfs=True, rekey=old)
        self.ni = sa.rng(NONCE_LEN)
        rekey = NotifyPayload(
            NotifyType.REKEY_SA, b"", ProtocolId.ESP, old.inbound_spi.to_bytes(4, "big")
        )
        return [rekey, *_offer_payloads(sa, self.offer, self.ni)]

    def process(self, sa: IkeSA, msg: Inbound, now: float) -> None:
        assert self.offer is not None
        if self._handle_invalid_ke(sa, msg.payloads, now):
            return
        nr = _nonce(msg.payloads)
        new = _accept_child(sa, msg.payloads, self.offer, self.ni, nr, now)
        old = sa.children.get(self.child_id)
        if self.collision is not None and min(self.ni, nr) < self.collision:
            # §2.8.1: our exchange holds the lowest nonce, so the SA we created is
            # redundant and we close it; the peer deletes the old one.
            sa.count("rekey_collision_lost")
            new.state = ChildState.REKEYED
            sa.queue_task(ChildDelete(new.child_id, "rekey-collision"), now, front=True)
            return
        if self.collision is not None:
            sa.count("rekey_collision_won")
        sa.emit(ev.ChildSaRekeyed(sa.name, self.child_id, new.child_id))
        if old is not None:
            old.state = ChildState.REKEYED
            sa.queue_task(ChildDelete(self.child_id, "rekeyed"), now, front=True)

    def fail(self, sa: IkeSA, exc: ProtocolError, now: float) -> None:
        old = sa.children.get(self.child_id)
        if old is not None and old.state == ChildState.REKEYING:
            old.state = ChildState.INSTALLED
            if exc.notify == NotifyType.TEMPORARY_FAILURE:
                old.rekey_at = _retry_later(sa, now)  # §2.25: retry after a while
        super().fail(sa, exc, now)
