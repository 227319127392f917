"""Shared pieces of the exchange tasks: the Task interface and payload checks."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, TypeVar

from .. import events as ev
from ..constants import (
    EncrId,
    ExchangeType,
    NotifyType,
)
from ..crypto import (
    CryptoError,
    DhKey,
    IkeSuite,
)
from ..errors import ProtocolError
from ..payloads import (
    NoncePayload,
    NotifyPayload,
    Payload,
    TrafficSelector,
    TSPayload,
    find,
    notifies,
)
from ..state import Inbound, State

if TYPE_CHECKING:
    from ..sa import IkeSA


_P = TypeVar("_P", bound=Payload)

NONCE_LEN = 32
MAX_INIT_RETRIES = 5


def _error_notify(payloads: list[Payload]) -> NotifyPayload | None:
    for n in notifies(payloads):
        if n.notify_type < 16384:
            return n
    return None


def _require(payloads: list[Payload], kind: type[_P], what: str) -> _P:
    p = find(payloads, kind)
    if p is None:
        raise ProtocolError(NotifyType.INVALID_SYNTAX, f"missing {what}")
    return p


def _shared(dh: DhKey, peer: bytes) -> bytes:
    """g^ir; a bad peer public value is a malformed request (INVALID_SYNTAX)."""
    try:
        return dh.shared_secret(peer)
    except CryptoError as exc:
        raise ProtocolError(NotifyType.INVALID_SYNTAX, str(exc)) from exc


def _nonce(payloads: list[Payload]) -> bytes:
    n = find(payloads, NoncePayload)
    if n is None or not 16 <= len(n.nonce) <= 256:  # §3.9
        raise ProtocolError(NotifyType.INVALID_SYNTAX, "missing or bad nonce")
    return n.nonce


def _ts(payloads: list[Payload], ptype: int) -> list[TrafficSelector]:
    ts = find(payloads, TSPayload, lambda p: p.type == ptype)
    if ts is None or not ts.selectors:
        raise ProtocolError(NotifyType.INVALID_SYNTAX, "missing traffic selectors")
    return ts.selectors


def wireshark_names(suite: IkeSuite) -> tuple[str, str]:
    """Algorithm labels of Wireshark's ikev2_decryption_table UAT."""
    if suite.encr == EncrId.AES_GCM_16:
        encr = f"AES-GCM-{suite.key_bits} with 16 octet ICV [RFC5282]"
    else:
        encr = f"AES-CBC-{suite.key_bits} [RFC3602]"
    integ = {12: "HMAC_SHA2_256_128", 13: "HMAC_SHA2_384_192", 14: "HMAC_SHA2_512_256"}
    return encr, (f"{integ[suite.integ]} [RFC4868]" if suite.integ else "NONE [RFC4306]")


# A table more than a cache: keyed by the algorithm numbers of a suite (a small,
# fixed set), never by what a peer sends; every IkeSaEstablished names its suite
@functools.lru_cache(maxsize=64)
def algorithms(suite: IkeSuite) -> str:
    from ..constants import DhGroup, IntegId, PrfId

    parts = [f"{EncrId(suite.encr).name}_{suite.key_bits}", PrfId(suite.prf).name]
    if suite.integ:
        parts.append(IntegId(suite.integ).name)
    parts.append(DhGroup(suite.dh).name)
    return "/".join(parts)


class Task:
    exchange: int = ExchangeType.INFORMATIONAL
    # Per-exchange retransmission (§2.1): None uses IkeConfig's exponential
    # back-off; a value sends every ``retransmit_timeout`` seconds, without
    # back-off, ``retransmit_tries`` more times (the DPD knobs of a liveness check).
    retransmit_timeout: float | None = None
    retransmit_tries: int | None = None

    def ready(self, sa: IkeSA) -> bool:
        return sa.state == State.ESTABLISHED

    def build(self, sa: IkeSA, now: float) -> list[Payload] | None:
        raise NotImplementedError

    def sent(self, sa: IkeSA, packet: bytes) -> None:
        """The encoded request (IKE_SA_INIT keeps it for AUTH)."""

    def process(self, sa: IkeSA, msg: Inbound, now: float) -> None:
        raise NotImplementedError

    def fail(self, sa: IkeSA, exc: ProtocolError, now: float) -> None:
        sa.emit(ev.ExchangeFailed(sa.name, ExchangeType(self.exchange).name, exc.notify.name, True))


def _retry_later(sa: IkeSA, now: float) -> float:
    """2-5 s from now, randomised so that two peers that collided do not collide again."""
    return now + 2.0 + sa.rng(1)[0] / 85.0
