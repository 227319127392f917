"""IKE SA rekeying (§1.3.2, §2.18) and simultaneous rekeys (§2.8.2, §2.25.2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import events as ev
from .. import lifetimes
from ..constants import (
    ExchangeType,
    NotifyType,
    ProtocolId,
)
from ..crypto import (
    DhKey,
    IkeSuite,
    derive_ike_keys,
    dh_generate,
    get_prf,
    skeyseed_rekey,
)
from ..errors import ProtocolError
from ..payloads import (
    DeletePayload,
    KEPayload,
    NoncePayload,
    Payload,
    SAPayload,
    find_notify,
)
from ..proposals import (
    accept_ike_response,
    ike_groups,
    ike_sa_payload,
    select_ike_for_ke,
    suite_payload,
)
from ..state import Channel, Inbound, State
from .base import NONCE_LEN, Task, _error_notify, _nonce, _require, _retry_later, _shared

if TYPE_CHECKING:
    from ..sa import IkeSA


class IkeRekey(Task):
    exchange = ExchangeType.CREATE_CHILD_SA

    def ready(self, sa: IkeSA) -> bool:
        # one replaced IKE SA at a time: wait until the last one is deleted
        return sa.state == State.ESTABLISHED and not sa.retiring

    def __init__(self) -> None:
        self.dh: DhKey | None = None
        self.group = 0
        self.ke_retried = False
        # §2.8.2: the new IKE SA the peer created while ours was in flight, and the
        # lowest nonce of that exchange
        self.collision: tuple[Channel, bytes] | None = None

    def build(self, sa: IkeSA, now: float) -> list[Payload]:
        assert sa.ch.suite is not None
        if not self.group:
            self.group = sa.ch.suite.dh
        if self.dh is None or self.dh.group != self.group:
            self.dh = dh_generate(self.group)
        self.spi = sa._new_spi()
        self.ni = sa.rng(NONCE_LEN)
        props = sorted(sa.config.ike_proposals, key=lambda p: p.dh != self.group)
        return [
            ike_sa_payload(props, self.spi),
            NoncePayload(self.ni),
            KEPayload(self.group, self.dh.public),
        ]

    def process(self, sa: IkeSA, msg: Inbound, now: float) -> None:
        p = msg.payloads
        n = find_notify(p, NotifyType.INVALID_KE_PAYLOAD)
        if n is not None and not self.ke_retried and len(n.data) == 2:
            group = int.from_bytes(n.data, "big")
            if group in ike_groups(sa.config.ike_proposals):
                self.ke_retried, self.group = True, group
                sa.retry_task(self, now)
                return
        err = _error_notify(p)
        if err is not None:
            raise ProtocolError(err.notify_type, "IKE rekey refused")
        sa_p = _require(p, SAPayload, "SA")
        ke = _require(p, KEPayload, "KE")
        assert self.dh is not None
        suite, spi_r = accept_ike_response(sa_p, sa.config.ike_proposals)
        if len(spi_r) != 8 or ke.group != suite.dh or ke.group != self.group:
            raise ProtocolError(NotifyType.INVALID_SYNTAX, "bad IKE rekey answer")
        nr = _nonce(p)
        g_ir = _shared(self.dh, ke.data)
        new = _rekeyed_channel(sa, suite, g_ir, self.ni, nr, self.spi, spi_r, initiator=True)
        if self.collision is None:
            _switch_channel(sa, new, now, we_delete_old=True)
            return
        theirs, their_min = self.collision
        if min(self.ni, nr) < their_min:
            # §2.8.2: our new IKE SA holds the lowest nonce: it is redundant and we, its
            # initiator, delete it; the peer's wins, and the peer deletes the old one
            sa.count("ike_rekey_collision_lost")
            sa.retire(new)
            sa.send_on(new, _OldIkeDelete(new), now)
            _adopt(sa, theirs, now)
        else:
            sa.count("ike_rekey_collision_won")
            _switch_channel(sa, new, now, we_delete_old=True)  # the peer deletes its own

    def fail(self, sa: IkeSA, exc: ProtocolError, now: float) -> None:
        if self.collision is not None:
            # ours failed but we answered the peer's: theirs is the new IKE SA
            _adopt(sa, self.collision[0], now)
        elif exc.notify == NotifyType.TEMPORARY_FAILURE:
            sa.ike_rekey_at = _retry_later(sa, now)  # §2.25: try again a little later
        super().fail(sa, exc, now)


def _adopt(sa: IkeSA, theirs: Channel, now: float) -> None:
    """Make the peer's new IKE SA (already in ``retiring``) the current one."""
    if theirs in sa.retiring:
        sa.unretire(theirs)
        _switch_channel(sa, theirs, now, we_delete_old=False)


def _rekeyed_channel(
    sa: IkeSA,
    suite: IkeSuite,
    g_ir: bytes,
    ni: bytes,
    nr: bytes,
    spi_i: bytes,
    spi_r: bytes,
    initiator: bool,
) -> Channel:
    """§2.18: SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr); the rest with the new PRF."""
    old = sa.ch
    assert old.prf is not None and old.keys is not None
    seed = skeyseed_rekey(old.prf, old.keys.sk_d, g_ir, ni, nr)
    prf = get_prf(suite.prf)
    ch = Channel(spi_i, spi_r, initiator)
    ch.install_keys(suite, prf, derive_ike_keys(prf, seed, suite, ni, nr, spi_i, spi_r))
    return ch


def _switch_channel(sa: IkeSA, new: Channel, now: float, we_delete_old: bool) -> None:
    """Child SAs move to the new IKE SA; the old one only carries its DELETE (§2.18)."""
    old = sa.ch
    sa.retire(old)
    sa.ch = new
    new.expire_at = None
    if not we_delete_old:
        old.expire_at = sa.linger(now)  # the peer deletes it; do not wait forever
    lifetimes.arm_ike(sa, now)  # a new generation: new soft and hard deadlines
    sa.drop_queued(IkeRekey)  # the IKE SA was just renewed
    sa.emit(ev.IkeSaRekeyed(sa.name, old.spi_i, old.spi_r, new.spi_i, new.spi_r))
    if we_delete_old:
        sa.send_on(old, _OldIkeDelete(old), now)


class _OldIkeDelete(Task):
    """DELETE of a replaced (or redundant) IKE SA, sent on that SA itself."""

    def __init__(self, ch: Channel) -> None:
        self.ch = ch

    def build(self, sa: IkeSA, now: float) -> list[Payload]:
        return [DeletePayload(ProtocolId.IKE, [])]

    def process(self, sa: IkeSA, msg: Inbound, now: float) -> None:
        if self.ch in sa.retiring:
            sa.unretire(self.ch)

    def fail(self, sa: IkeSA, exc: ProtocolError, now: float) -> None:
        self.process(sa, msg=None, now=now)  # type: ignore[arg-type]


def _respond_ike_rekey(sa: IkeSA, ch: Channel, msg: Inbound, now: float) -> list[Payload]:
    p = msg.payloads
    pending = sa.ch.pending
    ours = pending.task if pending is not None and isinstance(pending.task, IkeRekey) else None
    if ours is not None and ours.collision is not None:
        raise ProtocolError(NotifyType.TEMPORARY_FAILURE, "third IKE rekey in a collision")
    if sa.retiring:
        raise ProtocolError(NotifyType.TEMPORARY_FAILURE, "previous IKE SA not yet deleted")
    sa_p = _require(p, SAPayload, "SA")
    ke = _require(p, KEPayload, "KE")
    ni = _nonce(p)
    suite, prop = select_ike_for_ke(sa_p, sa.config.ike_proposals, ke.group)
    if len(prop.spi) != 8:
        raise ProtocolError(NotifyType.INVALID_SYNTAX, "IKE rekey needs an 8-byte SPI")
    dh = dh_generate(suite.dh)
    g_ir = _shared(dh, ke.data)
    nr = sa.rng(NONCE_LEN)
    spi_r = sa._new_spi()
    new = _rekeyed_channel(sa, suite, g_ir, ni, nr, prop.spi, spi_r, initiator=False)

    if ours is not None:
        # §2.25.2: we are rekeying too: answer as usual, decide by the nonces (§2.8.2)
        # when our own answer arrives; until then the peer's new SA waits aside
        ours.collision = (new, min(ni, nr))
        new.expire_at = sa.linger(now)
        sa.retire(new)
    else:

        def switch() -> None:
            _switch_channel(sa, new, now, we_delete_old=False)

        sa._switch_after_response = switch  # the answer still goes out under the old keys
    return [
        suite_payload(suite, prop.number, spi_r),
        NoncePayload(nr),
        KEPayload(dh.group, dh.public),
    ]
