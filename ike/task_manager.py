"""The exchange machinery of an IKE SA (RFC 7296), after libcharon's task_manager.

Every exchange is a *task* (``ike.tasks``, after strongSwan's libcharon): the
initiator side ``build``s a request and ``process``es the response; the
responder side is a handler chosen from ``RESPONDERS`` by exchange type and
SA state. One request is in flight per IKE SA (window size 1, §2.3); later
tasks wait in a queue. The last response is cached and re-sent when the peer
retransmits its request (§2.1).

Bad input never escapes: a datagram that does not parse, fails its integrity
check, carries the wrong message ID or arrives in the wrong state is dropped
and counted in ``counters`` (§2.21); a well-protected request we must refuse
gets an error NOTIFY from the responder handler.

The functions here are methods of :class:`ike.sa.IkeSA`, bound in its class
body (``queue_task = task_manager.queue_task``): ``self`` is the IKE SA, as in
the rest of its methods, and the state they work on is its own
(``IkeSA.__slots__``), so the split costs no memory per SA and no extra call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import events as ev
from . import tasks as _t
from .buffer import Buffer, DecodeError
from .constants import (
    IKE_HEADER_LEN,
    NON_ESP_MARKER,
    ExchangeType,
    HeaderFlag,
    NotifyType,
    PayloadType,
    notify_name,
)
from .crypto import CryptoError
from .errors import ProtocolError
from .payloads import (
    KNOWN_PAYLOADS,
    Header,
    NotifyPayload,
    Payload,
    UnknownPayload,
    build_chain,
    build_header,
    build_plain_message,
    parse_chain,
    parse_header,
    summarize,
)
from .state import Address, Channel, Inbound, Pending, State

if TYPE_CHECKING:
    from .sa import IkeSA

# Read per datagram: an enum member read through its class costs ~0.2 µs in
# Python 3.11 (EnumType.__getattr__ defeats the attribute cache)
_DEAD = State.DEAD
_INIT_SENT, _INIT_DONE = State.INIT_SENT, State.INIT_DONE


# --- task queue -------------------------------------------------------------------


def queue_task(self: IkeSA, task: _t.Task, now: float, front: bool = False) -> None:
    if self.state is _DEAD:
        return
    self._queue = (task, *self._queue) if front else (*self._queue, task)
    self._start_next(now)


def drop_queued(self: IkeSA, kind: type[_t.Task]) -> None:
    self._queue = tuple(t for t in self._queue if not isinstance(t, kind))


def retry_task(self: IkeSA, task: _t.Task, now: float) -> None:
    """Send ``task`` again with the same message ID (COOKIE, INVALID_KE, §1.2/§2.6)."""
    self.ch.next_id -= 1
    self._queue = (task, *self._queue)


def _start_next(self: IkeSA, now: float) -> None:
    ch = self.ch
    while ch.pending is None and self._queue and self.state is not _DEAD:
        task = self._queue[0]
        if not task.ready(self):
            return
        self._queue = self._queue[1:]
        payloads = task.build(self, now)
        if payloads is None:
            continue
        msg_id = ch.next_id
        ch.next_id += 1
        pkt = self.encode(ch, task.exchange, False, msg_id, payloads)
        task.sent(self, pkt)
        first = task.retransmit_timeout or self.config.retransmit_timeout
        ch.pending = Pending(task, msg_id, pkt, 0, now + first)
        self._send(pkt)


def _retransmit(self: IkeSA, now: float) -> None:
    """Resend each request whose answer is late, or give it up (§2.1, §2.4)."""
    for c in (*self.retiring, self.ch):
        p = c.pending
        if p is None or now < p.deadline:
            continue
        fixed = p.task.retransmit_timeout
        tries = p.task.retransmit_tries
        if p.tries < (self.config.retransmit_tries if tries is None else tries):
            p.tries += 1
            # §2.1: exponential back-off, unless the task has a fixed spacing
            p.deadline = now + (fixed or self.config.retransmit_timeout * (2**p.tries))
            self.count("retransmitted")
            self._send(p.packet)
        elif c is not self.ch:
            self.unretire(c)  # the peer never confirmed that SA's deletion
        else:
            self.count("gave_up")
            if self.state in (State.ESTABLISHED, State.DELETING):
                if not isinstance(p.task, _t.IkeDelete):
                    self.emit(ev.PeerDead(self.name))
                self.die("peer-dead" if self.state != State.DELETING else "deleted")
            else:
                self.emit(ev.PeerDead(self.name))
                self.die("peer-dead")


def send_on(self: IkeSA, ch: Channel, task: _t.Task, now: float) -> None:
    """Send a one-off request on ``ch`` (the old IKE SA's DELETE after a rekey)."""
    payloads = task.build(self, now) or []
    msg_id = ch.next_id
    ch.next_id += 1
    pkt = self.encode(ch, task.exchange, False, msg_id, payloads)
    ch.pending = Pending(task, msg_id, pkt, 0, now + self.config.retransmit_timeout)
    self._send(pkt)


def send_invalid_spi(self: IkeSA, spi: int, now: float) -> None:
    """§1.5: ESP for ``spi`` came from this peer and we do not know it: tell the
    peer inside this IKE SA (INFORMATIONAL with N(INVALID_SPI))."""
    self.queue_task(_t.InvalidSpiNotify(spi), now)


def send_once(self: IkeSA, exchange: int, payloads: list[Payload]) -> None:
    """A request that expects no answer and is never retransmitted."""
    msg_id = self.ch.next_id
    self.ch.next_id += 1
    self._send(self.encode(self.ch, exchange, False, msg_id, payloads))


# --- encoding -----------------------------------------------------------------------


def encode(
    self: IkeSA, ch: Channel, exchange: int, response: bool, msg_id: int, payloads: list[Payload]
) -> bytes:
    flags = (HeaderFlag.INITIATOR if ch.initiator else 0) | (HeaderFlag.RESPONSE if response else 0)
    if exchange == ExchangeType.IKE_SA_INIT:
        message = build_plain_message(ch.spi_i, ch.spi_r, exchange, flags, msg_id, payloads)
    else:
        if ch.out is None:
            raise RuntimeError("no keys to protect the message")
        inner = build_chain(payloads)
        first = payloads[0].type if payloads else PayloadType.NONE

        def prefix(total: int) -> bytes:
            hdr = build_header(ch.spi_i, ch.spi_r, PayloadType.SK, exchange, flags, msg_id, total)
            sk_len = max(total - IKE_HEADER_LEN, 0)
            return hdr + bytes([first, 0]) + sk_len.to_bytes(2, "big")

        message = ch.out.seal(inner, prefix)
    if self.log is not None:
        self._log("sending", exchange, response, msg_id, payloads, self.peer_addr, len(message))
    return message


def _log(
    self: IkeSA,
    verb: str,
    exchange: int,
    response: bool,
    msg_id: int,
    payloads: list[Payload],
    addr: Address,
    size: int,
) -> None:
    assert self.log is not None
    try:
        name = ExchangeType(exchange).name
    except ValueError:
        name = f"EXCHANGE_{exchange}"
    kind = "response" if response else "request"
    where = "to" if verb == "sending" else "from"
    self.log(
        f"{self.name}: {verb} {name} {kind} {msg_id} [ {summarize(payloads)} ] "
        f"({size} bytes) {where} {addr[0]}[{addr[1]}]"
    )


def _send(self: IkeSA, pkt: bytes) -> None:
    # RFC 3948 §2.2: IKE on port 4500 is preceded by the non-ESP marker
    self._out = (*self._out, (NON_ESP_MARKER + pkt if self.nat_t else pkt, self.peer_addr))
    if self.wake is not None:
        self.wake(self)


# --- input ---------------------------------------------------------------------------


def channel_for(self: IkeSA, hdr: Header) -> Channel | None:
    for c in (self.ch, *self.retiring):
        if hdr.spi_i != c.spi_i:
            continue
        if hdr.spi_r == c.spi_r:
            return c
        # The IKE_SA_INIT response brings the responder's SPI (or none, with
        # COOKIE / INVALID_KE_PAYLOAD)
        if (
            c is self.ch
            and hdr.exchange == ExchangeType.IKE_SA_INIT
            and self.state == State.INIT_SENT
            and hdr.is_response
        ):
            return c
        # A retransmitted IKE_SA_INIT request still has SPIr = 0: the cache answers it
        if (
            c is self.ch
            and not self.initiator
            and hdr.exchange == ExchangeType.IKE_SA_INIT
            and hdr.spi_r == b"\x00" * 8
            and not hdr.is_response
        ):
            return c
    return None


def receive_datagram(self: IkeSA, data: bytes, addr: Address, now: float) -> None:
    """Feed one UDP payload (with or without the non-ESP marker) from ``addr``."""
    if self.state is _DEAD:
        self.count("dropped_dead")
        return
    if self.wake is not None:
        self.wake(self)  # whatever happens, SPIs and state may change
    try:
        self._receive(data, addr, now)
    except (DecodeError, CryptoError, ProtocolError) as exc:
        self.count("dropped_" + type(exc).__name__)
    except Exception:
        self.count("internal_error")


def _receive(self: IkeSA, data: bytes, addr: Address, now: float) -> None:
    marked = data[:4] == NON_ESP_MARKER
    if marked:
        data = data[4:]
    hdr = parse_header(data)
    ch = self.channel_for(hdr)
    if ch is None:
        self.count("unknown_spi")
        return
    if hdr.from_initiator == ch.initiator:
        self.count("bad_initiator_flag")  # our own I flag reflected: not from the peer
        return
    if hdr.is_response:
        self._receive_response(ch, hdr, data, addr, now)
    else:
        self._receive_request(ch, hdr, data, addr, now, marked)


def _decode(self: IkeSA, ch: Channel, hdr: Header, data: bytes) -> list[Payload]:
    selectors = self.caches.selectors
    payloads, sk = parse_chain(Buffer(data, IKE_HEADER_LEN), hdr.next_payload, selectors)
    if hdr.exchange == ExchangeType.IKE_SA_INIT:
        if sk is not None:
            raise DecodeError("SK payload in IKE_SA_INIT")
        return payloads
    if sk is None or payloads or ch.inb is None:
        raise DecodeError("exchange must be protected by a single SK payload")
    try:
        inner = ch.inb.open(data, sk.offset)
    except CryptoError:
        self.count("integrity_failed")
        raise
    self.count("decrypted")
    inner_payloads, nested = parse_chain(Buffer(inner), sk.first_inner, selectors)
    if nested is not None:
        raise DecodeError("nested SK payload")
    return inner_payloads


def _receive_response(
    self: IkeSA, ch: Channel, hdr: Header, data: bytes, addr: Address, now: float
) -> None:
    p = ch.pending
    if p is None or hdr.msg_id != p.msg_id or hdr.exchange != p.task.exchange:
        self.count("unexpected_response")
        return
    payloads = self._decode(ch, hdr, data)
    self.last_heard = now
    if self.log is not None:
        self._log("received", hdr.exchange, True, hdr.msg_id, payloads, addr, hdr.length)
    ch.pending = None
    self.count("responses")
    msg = Inbound(hdr, payloads, data, addr)
    crit = _unsupported_critical(payloads)
    self.xch = ch
    try:
        if crit is not None:
            raise ProtocolError(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD, f"type {crit}")
        p.task.process(self, msg, now)
    except ProtocolError as exc:
        p.task.fail(self, exc, now)
    finally:
        self.xch = None
    if self._switch_after_response is not None:
        self._switch_after_response()
        self._switch_after_response = None
    self._forget_init()
    self._start_next(now)


def _receive_request(
    self: IkeSA, ch: Channel, hdr: Header, data: bytes, addr: Address, now: float, marked: bool
) -> None:
    cached = ch.cached
    if cached is not None and hdr.msg_id == _msg_id(cached) and hdr.msg_id == ch.peer_id - 1:
        # §2.1: a retransmitted request gets the same response, not reprocessed
        self.count("retransmit_answered")
        if hdr.exchange == cached[_EXCHANGE_AT]:
            self._send(cached)
        return
    if hdr.msg_id != ch.peer_id:
        self.count("bad_msg_id")
        return
    handler = _t.RESPONDERS.get((hdr.exchange, self.state if ch is self.ch else _t.RETIRING))
    if handler is None:
        self.count("unexpected_request")
        return
    try:
        payloads = self._decode(ch, hdr, data)
    except DecodeError:
        if hdr.exchange == ExchangeType.IKE_SA_INIT or ch.inb is None:
            raise
        # Integrity was fine but the content is not: answer INVALID_SYNTAX (§2.21.2)
        payloads = None
    ch.peer_id += 1
    self.last_heard = now
    if self.log is not None:
        self._log("received", hdr.exchange, False, hdr.msg_id, payloads or [], addr, hdr.length)
    if marked or self.nat_t:
        # §2.23: after the float, answer (and later send) to where requests come from
        self.nat_t = True
        self.peer_addr = addr
    self.count("requests")
    crit = _unsupported_critical(payloads or [])
    self.xch = ch
    try:
        if payloads is None:
            raise ProtocolError(NotifyType.INVALID_SYNTAX, "undecodable payloads")
        if crit is not None:
            raise ProtocolError(
                NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD, f"type {crit}", bytes([crit])
            )
        answer = handler(self, ch, Inbound(hdr, payloads, data, addr), now)
    except ProtocolError as exc:
        answer = [NotifyPayload(exc.notify, exc.data)]
        self.count("sent_" + notify_name(exc.notify))
        _t.responder_failed(self, hdr.exchange, exc)
    finally:
        self.xch = None
    if self.state is _DEAD and hdr.exchange == ExchangeType.IKE_SA_INIT:
        # stateless refusal (§2.6, §1.2): no responder SPI
        ch.spi_r = b"\x00" * 8
    pkt = self.encode(ch, hdr.exchange, True, hdr.msg_id, answer)
    ch.cached = pkt
    if hdr.exchange == ExchangeType.IKE_SA_INIT and self.state is _INIT_DONE:
        self.init_response = pkt
    self._send(pkt)
    if self._switch_after_response is not None:
        self._switch_after_response()
        self._switch_after_response = None
    self._forget_init()
    self._start_next(now)


def _forget_init(self: IkeSA) -> None:
    """Once IKE_AUTH is done the IKE_SA_INIT messages, the nonces and SK_pi/SK_pr
    (kept for AUTH, §2.15, and the first Child SA's keys, §2.17) are not needed any
    more; a retransmitted IKE_AUTH request is answered from the response cache
    (§2.1), a retransmitted IKE_SA_INIT request is older than that and dropped."""
    if self.init_request and self.state is not _INIT_DONE and self.state is not _INIT_SENT:
        self.init_request = self.init_response = self.ni = self.nr = b""
        if self.ch.keys is not None:
            self.ch.keys = self.ch.keys.after_auth()


# The cached response's own IKE header (§3.1) says which request it answers: the
# exchange type at octet 18, the message ID at 20-23 (no copy of them per SA)
_EXCHANGE_AT = 18


def _msg_id(message: bytes) -> int:
    return int.from_bytes(message[20:24], "big")


def _unsupported_critical(payloads: list[Payload]) -> int | None:
    """§2.5: an unknown payload with the critical bit set rejects the message."""
    for p in payloads:
        if isinstance(p, UnknownPayload) and p.critical and p.type not in KNOWN_PAYLOADS:
            return p.type
    return None
