"""Exchanges as tasks (after strongSwan's libcharon ``sa/ikev2/tasks``).

Each initiator task ``build``s its request and ``process``es the response;
responder handlers live next to it and are looked up in ``RESPONDERS`` by
(exchange type, SA state). The comment above each class shows the exchange.

Modules: ``base`` (the Task interface), ``initial`` (IKE_SA_INIT, IKE_AUTH),
``child`` (Child SA negotiation, CREATE_CHILD_SA for Child SAs),
``ike_rekey`` (IKE SA rekeying and its collisions), ``informational``
(liveness, DELETE). This module holds the dispatch table."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import events as ev
from ..constants import (
    ExchangeType,
    NotifyType,
    ProtocolId,
)
from ..errors import ProtocolError
from ..payloads import (
    Payload,
    SAPayload,
    find_notify,
)
from ..state import Channel, ChildState, Inbound, State
from .base import NONCE_LEN, Task, _nonce, _require, algorithms, wireshark_names
from .child import ChildCreate, ChildRekey, _respond_child
from .ike_rekey import IkeRekey, _respond_ike_rekey
from .informational import (
    ChildDelete,
    IkeDelete,
    InvalidSpiNotify,
    Liveness,
    _refuse_on_old,
    _respond_informational,
    _respond_old,
)
from .initial import IkeAuth, IkeInit, respond_auth, respond_init

__all__ = [
    "RESPONDERS",
    "RETIRING",
    "ChildCreate",
    "ChildDelete",
    "ChildRekey",
    "IkeAuth",
    "IkeDelete",
    "IkeInit",
    "IkeRekey",
    "InvalidSpiNotify",
    "Liveness",
    "Task",
    "algorithms",
    "responder_failed",
    "wireshark_names",
]

if TYPE_CHECKING:
    from ..sa import IkeSA


def _respond_create_child(sa: IkeSA, ch: Channel, msg: Inbound, now: float) -> list[Payload]:
    p = msg.payloads
    sa_p = _require(p, SAPayload, "SA")
    if sa_p.proposals and sa_p.proposals[0].protocol == ProtocolId.IKE:
        return _respond_ike_rekey(sa, ch, msg, now)
    ni = _nonce(p)
    nr = sa.rng(NONCE_LEN)
    rekey = find_notify(p, NotifyType.REKEY_SA)
    if rekey is None:
        out, _ = _respond_child(sa, p, ni, nr, now, in_ike_auth=False)
        return out
    spi = int.from_bytes(rekey.spi, "big") if len(rekey.spi) == 4 else -1
    old = next((c for c in sa.children.values() if c.outbound_spi == spi), None)
    if old is None:
        raise ProtocolError(NotifyType.CHILD_SA_NOT_FOUND, "rekey of unknown Child SA")
    if old.state in (ChildState.DELETING, ChildState.REKEYED):
        # §2.25.1: we are closing it already
        raise ProtocolError(NotifyType.TEMPORARY_FAILURE, "Child SA is going away")
    pending = sa.ch.pending
    if (
        pending is not None
        and isinstance(pending.task, ChildRekey)
        and pending.task.child_id == old.child_id
    ):
        pending.task.collision = min(ni, nr)  # §2.8.1: decided when our answer arrives
    out, new = _respond_child(
        sa, p, ni, nr, now, in_ike_auth=False, rekeyed_from=old.child_id, ts_from=old
    )
    sa.emit(ev.ChildSaRekeyed(sa.name, old.child_id, new.child_id))
    if (
        pending is None
        or not isinstance(pending.task, ChildRekey)
        or pending.task.child_id != old.child_id
    ):
        old.state = ChildState.REKEYED  # the peer deletes it next (make-before-break)
    return out


Responder = Callable[["IkeSA", Channel, Inbound, float], list[Payload]]

# The row for a request on a replaced IKE SA (a retiring channel), whatever the state
RETIRING = "old"

RESPONDERS: dict[tuple[int, str], Responder] = {
    (ExchangeType.IKE_SA_INIT, State.NEW): respond_init,
    (ExchangeType.IKE_AUTH, State.INIT_DONE): respond_auth,
    (ExchangeType.CREATE_CHILD_SA, State.ESTABLISHED): _respond_create_child,
    (ExchangeType.INFORMATIONAL, State.ESTABLISHED): _respond_informational,
    (ExchangeType.INFORMATIONAL, State.DELETING): _respond_informational,
    (ExchangeType.INFORMATIONAL, RETIRING): _respond_old,
    (ExchangeType.CREATE_CHILD_SA, RETIRING): _refuse_on_old,
}


def responder_failed(sa: IkeSA, exchange: int, exc: ProtocolError) -> None:
    """We refused a request with ``exc.notify``: what that does to the SA."""
    if exchange == ExchangeType.IKE_SA_INIT:
        if exc.notify != NotifyType.INVALID_KE_PAYLOAD:
            sa.emit(ev.ExchangeFailed(sa.name, "IKE_SA_INIT", exc.notify.name, False))
        sa.die(f"failed: {exc.notify.name}")  # stateless: nothing kept (§1.2)
    elif exchange == ExchangeType.IKE_AUTH:
        if exc.notify == NotifyType.AUTHENTICATION_FAILED:
            sa.emit(ev.AuthenticationFailed(sa.name, exc.detail))
        else:
            sa.emit(ev.ExchangeFailed(sa.name, "IKE_AUTH", exc.notify.name, False))
        sa._switch_after_response = lambda: sa.die(
            "auth-failed"
            if exc.notify == NotifyType.AUTHENTICATION_FAILED
            else f"failed: {exc.notify.name}"
        )
    elif exchange == ExchangeType.CREATE_CHILD_SA:
        sa.emit(ev.ExchangeFailed(sa.name, "CREATE_CHILD_SA", exc.notify.name, False))
