"""Exchanges as tasks (after strongSwan's libcharon ``sa/ikev2/tasks``).

Each initiator task ``build``s its request and ``process``es the response;
responder handlers live next to it and are looked up in ``RESPONDERS`` by
(exchange type, SA state). The comment above each class shows the exchange.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import events as ev
from .config import EspProposal, Identity
from .constants import (
    AuthMethod,
    EncrId,
    ExchangeType,
    NotifyType,
    PayloadType,
    ProtocolId,
    notify_name,
)
from .crypto import (
    SUPPORTED_GROUPS,
    CryptoError,
    DhKey,
    IkeSuite,
    child_keymat,
    derive_ike_keys,
    dh_generate,
    encr_key_size,
    get_prf,
    skeyseed,
    skeyseed_rekey,
)
from .errors import ProtocolError
from .payloads import (
    AuthPayload,
    DeletePayload,
    IDPayload,
    KEPayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    SAPayload,
    TrafficSelector,
    TSPayload,
    find,
    find_notify,
    notifies,
)
from .proposals import (
    accept_esp_response,
    accept_ike_response,
    esp_response_payload,
    esp_sa_payload,
    ike_groups,
    ike_sa_payload,
    is_subset,
    narrow,
    select_esp,
    select_ike,
    suite_payload,
)
from .state import NAT_T_PORT, Channel, ChildSA, Inbound, State, nat_hash

if TYPE_CHECKING:
    from .sa import IkeSA

NONCE_LEN = 32
KEY_PAD = b"Key Pad for IKEv2"  # §2.15
MAX_INIT_RETRIES = 5

# Errors that concern only the Child SA of an IKE_AUTH exchange (§1.2: the IKE SA stays up)
CHILD_ERRORS = {
    NotifyType.NO_PROPOSAL_CHOSEN,
    NotifyType.TS_UNACCEPTABLE,
    NotifyType.SINGLE_PAIR_REQUIRED,
    NotifyType.INTERNAL_ADDRESS_FAILURE,
    NotifyType.FAILED_CP_REQUIRED,
    NotifyType.INVALID_SELECTORS,
    NotifyType.NO_ADDITIONAL_SAS,
}


def _error_notify(payloads: list[Payload]) -> NotifyPayload | None:
    for n in notifies(payloads):
        if n.notify_type < 16384:
            return n
    return None


def _require(payloads: list[Payload], kind: type[Payload], what: str) -> Payload:
    p = find(payloads, kind)
    if p is None:
        raise ProtocolError(NotifyType.INVALID_SYNTAX, f"missing {what}")
    return p


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


def _algorithms(suite: IkeSuite) -> str:
    from .constants import DhGroup, IntegId, PrfId

    parts = [f"{EncrId(suite.encr).name}_{suite.key_bits}", PrfId(suite.prf).name]
    if suite.integ:
        parts.append(IntegId(suite.integ).name)
    parts.append(DhGroup(suite.dh).name)
    return "/".join(parts)


class Task:
    exchange: int = ExchangeType.INFORMATIONAL

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


# --- NAT detection (§2.23) ---------------------------------------------------------


def _nat_payloads(sa: IkeSA, spi_i: bytes, spi_r: bytes) -> list[Payload]:
    if not sa.config.nat_traversal:
        return []  # §2.23: NAT_DETECTION notifies are how support is announced
    # strongSwan's encap=yes: a source hash that cannot match makes the peer see a NAT
    src = sa.rng(20) if sa.config.fake_nat else nat_hash(spi_i, spi_r, sa.local_addr)
    return [
        NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, src),
        NotifyPayload(
            NotifyType.NAT_DETECTION_DESTINATION_IP, nat_hash(spi_i, spi_r, sa.peer_addr)
        ),
    ]


def _check_nat(sa: IkeSA, msg: Inbound) -> bool:
    """Record what the peer's NAT_DETECTION payloads say; True if it sent any."""
    h = msg.header
    srcs = [
        n.data
        for n in notifies(msg.payloads)
        if n.notify_type == NotifyType.NAT_DETECTION_SOURCE_IP
    ]
    dsts = [
        n.data
        for n in notifies(msg.payloads)
        if n.notify_type == NotifyType.NAT_DETECTION_DESTINATION_IP
    ]
    if not srcs and not dsts:
        return False
    sa.nat_detected_remote = bool(srcs) and nat_hash(h.spi_i, h.spi_r, msg.addr) not in srcs
    sa.nat_detected_local = bool(dsts) and nat_hash(h.spi_i, h.spi_r, sa.local_addr) not in dsts
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
        return sa.state in (State.NEW, State.INIT_SENT)

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
        assert isinstance(sa_p, SAPayload) and isinstance(ke, KEPayload)
        suite, _ = accept_ike_response(sa_p, sa.config.ike_proposals)
        if self.dh is None or ke.group != suite.dh or ke.group != self.group:
            raise ProtocolError(NotifyType.INVALID_SYNTAX, "KE group differs from the proposal")
        sa.nr = _nonce(p)
        sa.ch.spi_r = msg.header.spi_r
        sa.init_response = msg.raw
        try:
            g_ir = self.dh.shared_secret(ke.data)
        except CryptoError as exc:
            raise ProtocolError(NotifyType.INVALID_SYNTAX, str(exc)) from exc
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
    assert isinstance(sa_p, SAPayload) and isinstance(ke, KEPayload)
    sa.ni = _nonce(p)
    own = sa.config.ike_proposals
    # Prefer a proposal with the group of the KE we got; otherwise ask for ours (§1.2)
    same_group = [o for o in own if o.dh == ke.group]
    try:
        suite, prop = select_ike(sa_p, same_group)
    except ProtocolError:
        suite, prop = select_ike(sa_p, own)
    if ke.group != suite.dh:
        raise ProtocolError(
            NotifyType.INVALID_KE_PAYLOAD, f"want group {suite.dh}", suite.dh.to_bytes(2, "big")
        )
    dh = dh_generate(suite.dh)
    try:
        g_ir = dh.shared_secret(ke.data)
    except CryptoError as exc:
        raise ProtocolError(NotifyType.INVALID_SYNTAX, str(exc)) from exc
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
        lts, rts, transport = rekey.local_ts, rekey.remote_ts, rekey.mode == "transport"
    else:
        lts, rts = sa.config.traffic_selectors()
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
    """§2.17: KEYMAT = prf+(SK_d, [g^ir |] Ni | Nr); i→r keys first, then r→i."""
    ch = sa.ch
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
        list(local_ts),
        list(remote_ts),
        now,
    )
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
    assert isinstance(sa_p, SAPayload)
    chosen, spi_out = accept_esp_response(sa_p, sa.config.esp_proposals, o.pfs_group)
    tsi, tsr = _ts(p, PayloadType.TSi), _ts(p, PayloadType.TSr)
    if not is_subset(tsi, o.local_ts) or not is_subset(tsr, o.remote_ts):
        raise ProtocolError(NotifyType.TS_UNACCEPTABLE, "responder widened the selectors")
    g_ir = b""
    if o.dh is not None:
        ke = find(p, KEPayload)
        if ke is None or ke.group != o.dh.group:
            raise ProtocolError(NotifyType.INVALID_SYNTAX, "missing PFS KE")
        try:
            g_ir = o.dh.shared_secret(ke.data)
        except CryptoError as exc:
            raise ProtocolError(NotifyType.INVALID_SYNTAX, str(exc)) from exc
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
    assert isinstance(sa_p, SAPayload)
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
        try:
            g_ir = dh.shared_secret(ke.data)
        except CryptoError as exc:
            raise ProtocolError(NotifyType.INVALID_SYNTAX, str(exc)) from exc
    if ts_from is not None:
        local_allowed, remote_allowed = ts_from.local_ts, ts_from.remote_ts
    else:
        local_allowed, remote_allowed = sa.config.traffic_selectors()
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
    return ch.prf(ch.prf(psk, KEY_PAD), octets)


def _check_peer(sa: IkeSA, idp: IDPayload, auth: AuthPayload) -> str | None:
    """None if the peer's ID and AUTH are right, else why not."""
    try:
        ident = Identity.decode(idp.id_type, idp.data)
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
    sa.emit(
        ev.IkeSaEstablished(
            sa.name,
            ch.spi_i,
            ch.spi_r,
            sa.initiator,
            str(sa.config.local_id),
            str(sa.config.remote_id),
            _algorithms(ch.suite),
        )
    )


class IkeAuth(Task):
    exchange = ExchangeType.IKE_AUTH

    def ready(self, sa: IkeSA) -> bool:
        return sa.state == State.INIT_DONE

    def build(self, sa: IkeSA, now: float) -> list[Payload]:
        cfg = sa.config
        idi = IDPayload(cfg.local_id.id_type, cfg.local_id.encode(), PayloadType.IDi)
        out: list[Payload] = [idi]
        if cfg.initial_contact:
            out.append(NotifyPayload(NotifyType.INITIAL_CONTACT))
        out.append(IDPayload(cfg.remote_id.id_type, cfg.remote_id.encode(), PayloadType.IDr))
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
            raise ProtocolError(NotifyType.AUTHENTICATION_FAILED, why)
        _established(sa, now)
        try:
            _accept_child(sa, p, self.offer, sa.ni, sa.nr, now)
        except ProtocolError as exc:
            # §1.2: a refused Child SA leaves the IKE SA up
            sa.emit(ev.ExchangeFailed(sa.name, "IKE_AUTH", exc.notify.name, True))

    def fail(self, sa: IkeSA, exc: ProtocolError, now: float) -> None:
        if exc.notify == NotifyType.AUTHENTICATION_FAILED:
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
    idr = IDPayload(cfg.local_id.id_type, cfg.local_id.encode(), PayloadType.IDr)
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
        if old is None or old.state not in ("installed", "rekeying"):
            return None
        old.state = "rekeying"
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
            new.state = "rekeyed"
            sa.queue_task(ChildDelete(new.child_id, "rekey-collision"), now, front=True)
            return
        if self.collision is not None:
            sa.count("rekey_collision_won")
        sa.emit(ev.ChildSaRekeyed(sa.name, self.child_id, new.child_id))
        if old is not None:
            old.state = "rekeyed"
            sa.queue_task(ChildDelete(self.child_id, "rekeyed"), now, front=True)

    def fail(self, sa: IkeSA, exc: ProtocolError, now: float) -> None:
        old = sa.children.get(self.child_id)
        if old is not None and old.state == "rekeying":
            old.state = "installed"
        super().fail(sa, exc, now)


class IkeRekey(Task):
    exchange = ExchangeType.CREATE_CHILD_SA

    def __init__(self) -> None:
        self.dh: DhKey | None = None
        self.group = 0
        self.ke_retried = False

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
        assert isinstance(sa_p, SAPayload) and isinstance(ke, KEPayload) and self.dh
        suite, spi_r = accept_ike_response(sa_p, sa.config.ike_proposals)
        if len(spi_r) != 8 or ke.group != suite.dh or ke.group != self.group:
            raise ProtocolError(NotifyType.INVALID_SYNTAX, "bad IKE rekey answer")
        nr = _nonce(p)
        try:
            g_ir = self.dh.shared_secret(ke.data)
        except CryptoError as exc:
            raise ProtocolError(NotifyType.INVALID_SYNTAX, str(exc)) from exc
        new = _rekeyed_channel(sa, suite, g_ir, self.ni, nr, self.spi, spi_r, initiator=True)
        _switch_channel(sa, new, now, we_delete_old=True)


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
    sa.old_ch, sa.ch = old, new
    sa.emit(ev.IkeSaRekeyed(sa.name, old.spi_i, old.spi_r, new.spi_i, new.spi_r))
    if we_delete_old:
        sa.send_on(old, _OldIkeDelete(), now)


def _respond_create_child(sa: IkeSA, ch: Channel, msg: Inbound, now: float) -> list[Payload]:
    p = msg.payloads
    sa_p = _require(p, SAPayload, "SA")
    assert isinstance(sa_p, SAPayload)
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
    if old.state in ("deleting", "rekeyed"):
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
        old.state = "rekeyed"  # the peer deletes it next (make-before-break)
    return out


def _respond_ike_rekey(sa: IkeSA, ch: Channel, msg: Inbound, now: float) -> list[Payload]:
    p = msg.payloads
    if any(isinstance(t.task, IkeRekey) for t in [sa.ch.pending] if t is not None):
        # Simultaneous IKE rekey: refuse and let the peer retry (§2.25.2 permits
        # TEMPORARY_FAILURE; the nonce-based resolution is not implemented)
        raise ProtocolError(NotifyType.TEMPORARY_FAILURE, "IKE rekey in progress")
    sa_p = _require(p, SAPayload, "SA")
    ke = _require(p, KEPayload, "KE")
    assert isinstance(sa_p, SAPayload) and isinstance(ke, KEPayload)
    ni = _nonce(p)
    own = sa.config.ike_proposals
    same = [o for o in own if o.dh == ke.group]
    try:
        suite, prop = select_ike(sa_p, same)
    except ProtocolError:
        suite, prop = select_ike(sa_p, own)
    if len(prop.spi) != 8:
        raise ProtocolError(NotifyType.INVALID_SYNTAX, "IKE rekey needs an 8-byte SPI")
    if ke.group != suite.dh:
        raise ProtocolError(NotifyType.INVALID_KE_PAYLOAD, "group", suite.dh.to_bytes(2, "big"))
    dh = dh_generate(suite.dh)
    try:
        g_ir = dh.shared_secret(ke.data)
    except CryptoError as exc:
        raise ProtocolError(NotifyType.INVALID_SYNTAX, str(exc)) from exc
    nr = sa.rng(NONCE_LEN)
    spi_r = sa._new_spi()
    new = _rekeyed_channel(sa, suite, g_ir, ni, nr, prop.spi, spi_r, initiator=False)

    def switch() -> None:
        _switch_channel(sa, new, now, we_delete_old=False)

    sa._switch_after_response = switch  # the answer still goes out under the old keys
    return [
        suite_payload(suite, prop.number, spi_r),
        NoncePayload(nr),
        KEPayload(dh.group, dh.public),
    ]


# --- INFORMATIONAL ----------------------------------------------------------------------------
#   liveness:     HDR, SK {}                 -->  <-- HDR, SK {}            (§2.4)
#   Child delete: HDR, SK { D(ESP, spi) }    -->  <-- HDR, SK { D(ESP, spi) }
#   IKE delete:   HDR, SK { D(IKE) }         -->  <-- HDR, SK {}


class Liveness(Task):
    def build(self, sa: IkeSA, now: float) -> list[Payload]:
        return []

    def process(self, sa: IkeSA, msg: Inbound, now: float) -> None:
        sa.count("liveness_ok")


class ChildDelete(Task):
    def __init__(self, child_id: int, reason: str = "deleted") -> None:
        self.child_id = child_id
        self.reason = reason

    def build(self, sa: IkeSA, now: float) -> list[Payload] | None:
        child = sa.children.get(self.child_id)
        if child is None:
            return None
        child.state = "deleting"
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


class _OldIkeDelete(Task):
    """DELETE of the rekeyed-away IKE SA, sent on its own channel."""

    def build(self, sa: IkeSA, now: float) -> list[Payload]:
        return [DeletePayload(ProtocolId.IKE, [])]

    def process(self, sa: IkeSA, msg: Inbound, now: float) -> None:
        sa.old_ch = None

    def fail(self, sa: IkeSA, exc: ProtocolError, now: float) -> None:
        sa.old_ch = None


def _respond_informational(sa: IkeSA, ch: Channel, msg: Inbound, now: float) -> list[Payload]:
    p = msg.payloads
    out: list[Payload] = []
    for n in notifies(p):
        if n.notify_type < 16384:
            sa.count("received_" + notify_name(n.notify_type))
            if n.notify_type == NotifyType.AUTHENTICATION_FAILED:
                sa.emit(ev.AuthenticationFailed(sa.name, "peer rejected our AUTH"))
                sa._switch_after_response = lambda: sa.die("auth-failed")
    for d in p:
        if not isinstance(d, DeletePayload):
            continue
        if d.protocol == ProtocolId.IKE:
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
            reason = "rekeyed" if child.state in ("rekeyed", "rekeying") else "deleted-by-peer"
            sa.emit(
                ev.ChildSaDeleted(
                    sa.name, child.child_id, child.inbound_spi, child.outbound_spi, reason
                )
            )
            if child.state != "deleting":  # §1.4.1: crossing deletes are not echoed
                ours.append(child.inbound_spi.to_bytes(4, "big"))
        if ours:
            out.append(DeletePayload(ProtocolId.ESP, ours))
    return out


def _respond_old(sa: IkeSA, ch: Channel, msg: Inbound, now: float) -> list[Payload]:
    """Requests on the rekeyed-away IKE SA: only its DELETE matters."""
    if any(isinstance(d, DeletePayload) and d.protocol == ProtocolId.IKE for d in msg.payloads):

        def drop() -> None:
            sa.old_ch = None

        sa._switch_after_response = drop
    return []


Responder = Callable[["IkeSA", Channel, Inbound, float], list[Payload]]

RESPONDERS: dict[tuple[int, str], Responder] = {
    (ExchangeType.IKE_SA_INIT, State.NEW): respond_init,
    (ExchangeType.IKE_AUTH, State.INIT_DONE): respond_auth,
    (ExchangeType.CREATE_CHILD_SA, State.ESTABLISHED): _respond_create_child,
    (ExchangeType.INFORMATIONAL, State.ESTABLISHED): _respond_informational,
    (ExchangeType.INFORMATIONAL, State.DELETING): _respond_informational,
    (ExchangeType.INFORMATIONAL, "old"): _respond_old,
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
