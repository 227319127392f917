"""The initial exchanges: IKE_SA_INIT (§1.2, §2.6, §2.23) and IKE_AUTH with PSK (§2.15)."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from .. import events as ev
from .. import lifetimes
from ..constants import (
    AuthMethod,
    ExchangeType,
    NotifyType,
    PayloadType,
    notify_name,
)
from ..crypto import (
    DhKey,
    IkeSuite,
    derive_ike_keys,
    dh_generate,
    get_prf,
    skeyseed,
)
from ..errors import ProtocolError
from ..payloads import (
    AuthPayload,
    IDPayload,
    KEPayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    SAPayload,
    find,
    find_notify,
    notifies,
)
from ..proposals import (
    accept_ike_response,
    ike_groups,
    ike_sa_payload,
    select_ike_for_ke,
    suite_payload,
)
from ..state import NAT_T_PORT, Channel, Inbound, State, nat_hash
from .base import (
    MAX_INIT_RETRIES,
    NONCE_LEN,
    Task,
    _error_notify,
    _nonce,
    _require,
    _shared,
    algorithms,
)
from .child import _accept_child, _offer, _offer_payloads, _respond_child

if TYPE_CHECKING:
    from ..sa import IkeSA

# Read in every handshake: an enum member read through its class costs ~0.2 µs (3.11)
_NEW, _INIT_SENT, _INIT_DONE = State.NEW, State.INIT_SENT, State.INIT_DONE


# --- NAT detection (§2.23) ---------------------------------------------------------


def _nat_payloads(sa: IkeSA, spi_i: bytes, spi_r: bytes) -> list[Payload]:
    if not sa.config.nat_traversal:
        return []  # §2.23: NAT_DETECTION notifies are how support is announced
    # strongSwan's encap=yes: a source hash that cannot match makes the peer see a NAT
    packed = sa.caches.packed_ip
    src = sa.rng(20) if sa.config.fake_nat else nat_hash(spi_i, spi_r, sa.local_addr, packed)
    return [
        NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, src),
        NotifyPayload(
            NotifyType.NAT_DETECTION_DESTINATION_IP, nat_hash(spi_i, spi_r, sa.peer_addr, packed)
        ),
    ]


_NAT_D_SRC = int(NotifyType.NAT_DETECTION_SOURCE_IP)  # ints: cheaper to compare than IntEnum
_NAT_D_DST = int(NotifyType.NAT_DETECTION_DESTINATION_IP)


def _check_nat(sa: IkeSA, msg: Inbound) -> bool:
    """Record what the peer's NAT_DETECTION payloads say; True if it sent any."""
    h = msg.header
    srcs: list[bytes] = []
    dsts: list[bytes] = []
    for n in notifies(msg.payloads):
        if n.notify_type == _NAT_D_SRC:
            srcs.append(n.data)
        elif n.notify_type == _NAT_D_DST:
            dsts.append(n.data)
    if not srcs and not dsts:
        return False
    packed = sa.caches.packed_ip
    remote = nat_hash(h.spi_i, h.spi_r, msg.addr, packed)
    sa.nat_detected_remote = bool(srcs) and remote not in srcs
    local = nat_hash(h.spi_i, h.spi_r, sa.local_addr, packed)
    sa.nat_detected_local = bool(dsts) and local not in dsts
    if sa.nat_detected_local or sa.nat_detected_remote:
        sa.emit(ev.NatDetected(sa.name, sa.nat_detected_local, sa.nat_detected_remote))
    return True


def _derive_initial(sa: IkeSA, suite: IkeSuite, g_ir: bytes) -> None:
    prf = get_prf(suite.prf)
    seed = skeyseed(prf, sa.ni, sa.nr, g_ir)
    keys = derive_ike_keys(prf, seed, suite, sa.ni, sa.nr, sa.ch.spi_i, sa.ch.spi_r)
    sa.ch.install_keys(suite, prf, keys)


# --- IKE_SA_INIT ---------------------------------------------------------------------
#   HDR, SA, KEi, Ni, N(NAT_D_SRC), N(NAT_D_DST)  -->
#                          <--  HDR, SA, KEr, Nr, N(NAT_D_SRC), N(NAT_D_DST)
#   (or <-- N(COOKIE) / N(INVALID_KE_PAYLOAD) / N(NO_PROPOSAL_CHOSEN), then retry or give up)


class IkeInit(Task):
    exchange = ExchangeType.IKE_SA_INIT

    def __init__(self, sa: IkeSA) -> None:
        self.group = int(sa.config.ike_proposals[0].dh)
        self.dh: DhKey | None = None
        self.cookie: bytes | None = None
        self.retries = 0

    def ready(self, sa: IkeSA) -> bool:
        return sa.state is _NEW or sa.state is _INIT_SENT

    def build(self, sa: IkeSA, now: float) -> list[Payload]:
        if self.dh is None or self.dh.group != self.group:
            self.dh = dh_generate(self.group)
        if not sa.ni:
            sa.ni = sa.rng(NONCE_LEN)
        sa.state = State.INIT_SENT
        # Proposals whose group matches our KE go first, so the responder need not ask again
        props = sorted(sa.config.ike_proposals, key=lambda p: p.dh != self.group)
        out: list[Payload] = []
        if self.cookie is not None:
            out.append(NotifyPayload(NotifyType.COOKIE, self.cookie))  # §2.6: first payload
        out += [ike_sa_payload(props), KEPayload(self.group, self.dh.public), NoncePayload(sa.ni)]
        out += _nat_payloads(sa, sa.ch.spi_i, b"\x00" * 8)
        return out

    def sent(self, sa: IkeSA, packet: bytes) -> None:
        sa.init_request = packet

    def process(self, sa: IkeSA, msg: Inbound, now: float) -> None:
        p = msg.payloads
        cookie = find_notify(p, NotifyType.COOKIE)
        invalid_ke = find_notify(p, NotifyType.INVALID_KE_PAYLOAD)
        if (cookie or invalid_ke) and self.retries < MAX_INIT_RETRIES:
            self.retries += 1
            if cookie is not None and 1 <= len(cookie.data) <= 64:
                self.cookie = cookie.data
                sa.count("cookie_retry")
            elif invalid_ke is not None and len(invalid_ke.data) == 2:
                group = int.from_bytes(invalid_ke.data, "big")
                # §1.2: retry with the group the responder asked for, if we offered it
                if group not in ike_groups(sa.config.ike_proposals) or group == self.group:
                    raise ProtocolError(NotifyType.INVALID_KE_PAYLOAD, f"cannot use group {group}")
                self.group = group
                sa.count("invalid_ke_retry")
            else:
                raise ProtocolError(NotifyType.INVALID_SYNTAX, "bad COOKIE/INVALID_KE data")
            sa.retry_task(self, now)
            return
        err = _error_notify(p)
        if err is not None:
            raise ProtocolError(err.notify_type, "refused by responder")
        if msg.header.spi_r == b"\x00" * 8:
            raise ProtocolError(NotifyType.INVALID_SYNTAX, "responder SPI is zero")
        sa_p = _require(p, SAPayload, "SA")
        ke = _require(p, KEPayload, "KE")
        suite, _ = accept_ike_response(sa_p, sa.config.ike_proposals)
        if self.dh is None or ke.group != suite.dh or ke.group != self.group:
            raise ProtocolError(NotifyType.INVALID_SYNTAX, "KE group differs from the proposal")
        sa.nr = _nonce(p)
        sa.ch.spi_r = msg.header.spi_r
        sa.init_response = msg.raw
        g_ir = _shared(self.dh, ke.data)
        _derive_initial(sa, suite, g_ir)
        if sa.config.nat_traversal:
            _check_nat(sa, msg)
        if sa.nat_detected_local or sa.nat_detected_remote or sa.config.fake_nat:
            # §2.23: both sides move to UDP 4500 once a NAT is detected
            sa.nat_t = True
            sa.peer_addr = (sa.peer_addr[0], NAT_T_PORT)
            sa.local_addr = (sa.local_addr[0], NAT_T_PORT)
        sa.state = State.INIT_DONE
        sa.queue_task(IkeAuth(), now, front=True)

    def fail(self, sa: IkeSA, exc: ProtocolError, now: float) -> None:
        sa.emit(ev.ExchangeFailed(sa.name, "IKE_SA_INIT", exc.notify.name, True))
        sa.die(f"failed: {exc.notify.name}")


def respond_init(sa: IkeSA, ch: Channel, msg: Inbound, now: float) -> list[Payload]:
    p = msg.payloads
    sa_p = _require(p, SAPayload, "SA")
    ke = _require(p, KEPayload, "KE")
    sa.ni = _nonce(p)
    suite, prop = select_ike_for_ke(sa_p, sa.config.ike_proposals, ke.group)
    dh = dh_generate(suite.dh)
    g_ir = _shared(dh, ke.data)
    sa.init_request = msg.raw
    ch.spi_r = sa._new_spi()
    sa.nr = sa.rng(NONCE_LEN)
    _derive_initial(sa, suite, g_ir)
    out: list[Payload] = [suite_payload(suite, prop.number), KEPayload(suite.dh, dh.public)]
    out.append(NoncePayload(sa.nr))
    if sa.config.nat_traversal and _check_nat(sa, msg):
        out += _nat_payloads(sa, ch.spi_i, ch.spi_r)  # §2.23: only if the initiator sent them
    sa.state = State.INIT_DONE
    sa.half_open_deadline = now + sa.config.half_open_timeout
    return out


# --- IKE_AUTH (PSK, §2.15) ---------------------------------------------------------------
#   HDR, SK { IDi, [N(INITIAL_CONTACT),] IDr, AUTH, [N(USE_TRANSPORT_MODE),] SA, TSi, TSr } -->
#                                <-- HDR, SK { IDr, AUTH, [N(USE_TRANSPORT_MODE),] SA, TSi, TSr }


def psk_auth(sa: IkeSA, psk: bytes, mine: bool, id_payload: IDPayload) -> bytes:
    """AUTH = prf(prf(PSK, "Key Pad for IKEv2"), <SignedOctets>) (§2.15).

    The signer's octets: its IKE_SA_INIT message | the peer's nonce |
    prf(SK_px, RestOfIDPayload), SK_pi for the initiator and SK_pr for the responder.
    """
    ch = sa.ch
    assert ch.prf is not None and ch.keys is not None
    signer_is_initiator = sa.initiator if mine else not sa.initiator
    if signer_is_initiator:
        octets = sa.init_request + sa.nr + ch.prf(ch.keys.sk_pi, id_payload.rest())
    else:
        octets = sa.init_response + sa.ni + ch.prf(ch.keys.sk_pr, id_payload.rest())
    # prf(PSK, "Key Pad for IKEv2") depends only on the PRF and the PSK: kept keyed
    # per endpoint (ike.caches), dropped when the endpoint's configs change
    return sa.caches.psk_key(ch.prf, psk).mac(octets)


def _check_peer(sa: IkeSA, idp: IDPayload, auth: AuthPayload) -> str | None:
    """None if the peer's ID and AUTH are right, else why not."""
    try:
        ident = sa.caches.identity(idp.id_type, idp.data)
    except ValueError as exc:
        return f"bad identity: {exc}"
    if ident != sa.config.remote_id:
        return f"unexpected identity {ident}"
    if auth.method != AuthMethod.SHARED_KEY_MIC:
        return f"unsupported auth method {auth.method}"
    want = psk_auth(sa, sa.config.peer_psk, False, idp)
    if not hmac.compare_digest(want, auth.data):
        return "PSK AUTH mismatch"
    return None


def _established(sa: IkeSA, now: float) -> None:
    ch = sa.ch
    assert ch.suite is not None
    sa.state = State.ESTABLISHED
    sa.half_open_deadline = None
    lifetimes.arm_ike(sa, now)
    sa.emit(
        ev.IkeSaEstablished(
            sa.name,
            ch.spi_i,
            ch.spi_r,
            sa.initiator,
            str(sa.config.local_id),
            str(sa.config.remote_id),
            algorithms(ch.suite),
        )
    )


class IkeAuth(Task):
    exchange = ExchangeType.IKE_AUTH

    def ready(self, sa: IkeSA) -> bool:
        return sa.state is _INIT_DONE

    def build(self, sa: IkeSA, now: float) -> list[Payload]:
        cfg = sa.config
        idi = IDPayload(cfg.local_id.id_type, sa.caches.encoded(cfg.local_id), PayloadType.IDi)
        out: list[Payload] = [idi]
        if sa.initial_contact:
            out.append(NotifyPayload(NotifyType.INITIAL_CONTACT))
        out.append(
            IDPayload(cfg.remote_id.id_type, sa.caches.encoded(cfg.remote_id), PayloadType.IDr)
        )
        out.append(AuthPayload(AuthMethod.SHARED_KEY_MIC, psk_auth(sa, cfg.local_psk, True, idi)))
        self.offer = _offer(sa, with_pfs=False)
        out += _offer_payloads(sa, self.offer, None)
        return out

    def process(self, sa: IkeSA, msg: Inbound, now: float) -> None:
        p = msg.payloads
        idr = find(p, IDPayload, lambda x: x.type == PayloadType.IDr)
        auth = find(p, AuthPayload)
        if idr is None or auth is None:
            err = _error_notify(p)
            if err is not None:  # say what the peer refused, not what is missing
                raise ProtocolError(err.notify_type, f"peer sent {notify_name(err.notify_type)}")
            raise ProtocolError(NotifyType.INVALID_SYNTAX, "no IDr/AUTH in the response")
        why = _check_peer(sa, idr, auth)
        if why is not None:
            self.we_refused = True
            raise ProtocolError(NotifyType.AUTHENTICATION_FAILED, why)
        _established(sa, now)
        try:
            _accept_child(sa, p, self.offer, sa.ni, sa.nr, now)
        except ProtocolError as exc:
            # §1.2: a refused Child SA leaves the IKE SA up
            sa.emit(ev.ExchangeFailed(sa.name, "IKE_AUTH", exc.notify.name, True))

    we_refused = False

    def fail(self, sa: IkeSA, exc: ProtocolError, now: float) -> None:
        if exc.notify == NotifyType.AUTHENTICATION_FAILED:
            if self.we_refused:
                # §2.21.2: the initiator MAY tell the responder in a separate
                # INFORMATIONAL; sent once, no answer awaited
                note: list[Payload] = [NotifyPayload(NotifyType.AUTHENTICATION_FAILED)]
                sa.send_once(ExchangeType.INFORMATIONAL, note)
            sa.emit(ev.AuthenticationFailed(sa.name, exc.detail))
            sa.die("auth-failed")
        else:
            sa.emit(ev.ExchangeFailed(sa.name, "IKE_AUTH", exc.notify.name, True))
            sa.die(f"failed: {exc.notify.name}")


def respond_auth(sa: IkeSA, ch: Channel, msg: Inbound, now: float) -> list[Payload]:
    p = msg.payloads
    cfg = sa.config
    idi = find(p, IDPayload, lambda x: x.type == PayloadType.IDi)
    auth = find(p, AuthPayload)
    if idi is None or auth is None:
        raise ProtocolError(NotifyType.INVALID_SYNTAX, "IKE_AUTH without IDi/AUTH")
    why = _check_peer(sa, idi, auth)
    if why is not None:
        raise ProtocolError(NotifyType.AUTHENTICATION_FAILED, why)
    if find_notify(p, NotifyType.INITIAL_CONTACT) is not None:
        sa.emit(ev.InitialContactReceived(sa.name, str(cfg.remote_id)))
    _established(sa, now)
    idr = IDPayload(cfg.local_id.id_type, sa.caches.encoded(cfg.local_id), PayloadType.IDr)
    out: list[Payload] = [
        idr,
        AuthPayload(AuthMethod.SHARED_KEY_MIC, psk_auth(sa, cfg.local_psk, True, idr)),
    ]
    try:
        child_part, _ = _respond_child(sa, p, sa.ni, sa.nr, now, in_ike_auth=True)
    except ProtocolError as exc:
        sa.emit(ev.ExchangeFailed(sa.name, "IKE_AUTH", exc.notify.name, False))
        child_part = [NotifyPayload(exc.notify, exc.data)]
    return out + child_part
