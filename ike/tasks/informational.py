"""INFORMATIONAL exchanges: liveness (§2.4) and DELETE (§1.4.1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import events as ev
from ..constants import (
    NotifyType,
    ProtocolId,
    notify_name,
)
from ..errors import ProtocolError
from ..payloads import (
    DeletePayload,
    NotifyPayload,
    Payload,
    notifies,
)
from ..state import Channel, ChildState, Inbound, State
from .base import Task
from .ike_rekey import IkeRekey, _adopt, _OldIkeDelete

if TYPE_CHECKING:
    from ..sa import IkeSA


# --- INFORMATIONAL ----------------------------------------------------------------------------
#   liveness:     HDR, SK {}                 -->  <-- HDR, SK {}            (§2.4)
#   Child delete: HDR, SK { D(ESP, spi) }    -->  <-- HDR, SK { D(ESP, spi) }
#   IKE delete:   HDR, SK { D(IKE) }         -->  <-- HDR, SK {}


class Liveness(Task):
    def __init__(self, timeout: float | None = None, tries: int | None = None) -> None:
        self.retransmit_timeout = timeout
        self.retransmit_tries = tries

    def build(self, sa: IkeSA, now: float) -> list[Payload]:
        return []

    def process(self, sa: IkeSA, msg: Inbound, now: float) -> None:
        sa.count("liveness_ok")


class InvalidSpiNotify(Task):
    """RFC 7296 §1.5: ESP for an unknown SPI came from a peer we have an IKE SA
    with: tell it inside that SA.   HDR, SK { N(INVALID_SPI, spi) } -->  <-- HDR, SK {}"""

    def __init__(self, spi: int) -> None:
        self.spi = spi

    def build(self, sa: IkeSA, now: float) -> list[Payload]:
        return [NotifyPayload(NotifyType.INVALID_SPI, self.spi.to_bytes(4, "big"))]

    def process(self, sa: IkeSA, msg: Inbound, now: float) -> None:
        sa.count("invalid_spi_acknowledged")


class ChildDelete(Task):
    def __init__(self, child_id: int, reason: str = "deleted") -> None:
        self.child_id = child_id
        self.reason = reason

    def build(self, sa: IkeSA, now: float) -> list[Payload] | None:
        child = sa.children.get(self.child_id)
        if child is None:
            return None
        child.state = ChildState.DELETING
        return [DeletePayload(ProtocolId.ESP, [child.inbound_spi.to_bytes(4, "big")])]

    def process(self, sa: IkeSA, msg: Inbound, now: float) -> None:
        child = sa.children.pop(self.child_id, None)
        if child is not None:
            sa.emit(
                ev.ChildSaDeleted(
                    sa.name, child.child_id, child.inbound_spi, child.outbound_spi, self.reason
                )
            )

    def fail(self, sa: IkeSA, exc: ProtocolError, now: float) -> None:
        self.process(sa, Inbound(None, [], b"", ("", 0)), now)  # type: ignore[arg-type]


class IkeDelete(Task):
    def ready(self, sa: IkeSA) -> bool:
        return sa.state in (State.ESTABLISHED, State.DELETING)

    def build(self, sa: IkeSA, now: float) -> list[Payload]:
        sa.state = State.DELETING
        return [DeletePayload(ProtocolId.IKE, [])]

    def process(self, sa: IkeSA, msg: Inbound, now: float) -> None:
        sa.die("deleted")

    def fail(self, sa: IkeSA, exc: ProtocolError, now: float) -> None:
        sa.die("deleted")


def _respond_informational(sa: IkeSA, ch: Channel, msg: Inbound, now: float) -> list[Payload]:
    p = msg.payloads
    out: list[Payload] = []
    for n in notifies(p):
        if n.notify_type < 16384:
            sa.count("received_" + notify_name(n.notify_type))
            if n.notify_type == NotifyType.AUTHENTICATION_FAILED:
                sa.emit(ev.AuthenticationFailed(sa.name, "peer rejected our AUTH"))
                sa._switch_after_response = lambda: sa.die("auth-failed")
            elif n.notify_type == NotifyType.INVALID_SPI and len(n.data) == 4:
                # §1.5 / §3.10.1, protected: the peer itself does not know an SPI
                # we send on (the Notification Data is that SPI)
                spi = int.from_bytes(n.data, "big")
                child = next((c for c in sa.children.values() if c.outbound_spi == spi), None)
                if child is not None:
                    sa.emit(ev.InvalidSpiReceived(sa.name, spi, child.child_id, True))
    for d in p:
        if not isinstance(d, DeletePayload):
            continue
        if d.protocol == ProtocolId.IKE:
            pending = ch.pending
            task = pending.task if pending is not None else None
            if isinstance(task, IkeRekey) and task.collision is not None:
                # §2.8.2 with reordering: the peer won a rekey collision and deletes
                # the old IKE SA before our own answer arrived; take its new SA
                theirs = task.collision[0]

                def adopt(theirs: Channel = theirs) -> None:
                    sa.count("ike_rekey_collision_lost")
                    _adopt(sa, theirs, now)
                    if ch in sa.retiring:
                        sa.unretire(ch)

                sa._switch_after_response = adopt
                return []
            # §1.4.1: answer, then the IKE SA and all its Child SAs are gone
            sa._switch_after_response = lambda: sa.die("deleted-by-peer")
            return []
        if d.protocol != ProtocolId.ESP:
            continue
        ours: list[bytes] = []
        for raw in d.spis:
            spi = int.from_bytes(raw, "big")
            child = next((c for c in sa.children.values() if c.outbound_spi == spi), None)
            if child is None:
                continue
            del sa.children[child.child_id]
            rekeyed = child.state in (ChildState.REKEYED, ChildState.REKEYING)
            reason = "rekeyed" if rekeyed else "deleted-by-peer"
            sa.emit(
                ev.ChildSaDeleted(
                    sa.name, child.child_id, child.inbound_spi, child.outbound_spi, reason
                )
            )
            if child.state != ChildState.DELETING:  # §1.4.1: crossing deletes are not echoed
                ours.append(child.inbound_spi.to_bytes(4, "big"))
        if ours:
            out.append(DeletePayload(ProtocolId.ESP, ours))
    return out


def _respond_old(sa: IkeSA, ch: Channel, msg: Inbound, now: float) -> list[Payload]:
    """Requests on the rekeyed-away IKE SA: only its DELETE matters."""
    if any(isinstance(d, DeletePayload) and d.protocol == ProtocolId.IKE for d in msg.payloads):

        def drop() -> None:
            old = ch
            if old in sa.retiring:
                sa.unretire(old)
            task = old.pending.task if old.pending is not None else None
            if task is not None and not isinstance(task, _OldIkeDelete | IkeRekey):
                # our request on the old SA will never be answered: redo it on the new one
                sa.count("requeued_from_old_sa")
                sa.queue_task(task, now, front=True)

        sa._switch_after_response = drop
    return []


def _refuse_on_old(sa: IkeSA, ch: Channel, msg: Inbound, now: float) -> list[Payload]:
    """A CREATE_CHILD_SA that crossed our IKE rekey: try again later, on the new SA (§2.25)."""
    raise ProtocolError(NotifyType.TEMPORARY_FAILURE, "IKE SA is being replaced")
