"""The handlers of the StarOS CLI modes: one per command, filling the reader."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipsecmgr.config import MIN_LIFETIME
from ipsecmgr.staros.model import (
    _Acl,
    _after,
    _arg,
    _Frame,
    _IkeSet,
    _Interface,
    _IpsecSet,
    _Key,
    _Map,
    _Payload,
    _TacacsServer,
)

if TYPE_CHECKING:
    from ipsecmgr.staros.reader import _Reader


def _name(r: _Reader, toks: list[str], i: int, n: int, what: str) -> str | None:
    """The name a mode command gives at ``toks[i]``; a missing one is an error note."""
    name = _arg(toks, i)
    if name is None:
        r.note(n, "error", f"{what} without a name")
    return name


# --- root / configure / context


def _h_configure(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    pass  # global configuration mode is the root here


def _h_context(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    name = _arg(toks, 1) or ""
    if name.lower() != "local":
        r.note(
            n, "decision",
            f"context {name!r}: the reference puts the TACACS+ crypto maps in the local "
            "context; this one's are imported into the same configuration",
        )  # fmt: skip
    r.push("context", name)


def _h_require(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    r.note(n, "ignored", "this gateway handles IKE and ESP in user space always (no equivalent)")


def _h_aaa(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    r.note(
        n, "ignored",
        "TACACS+ itself is the client's business on Linux (pam_tacplus); no equivalent here",
    )  # fmt: skip


def _h_shared_subnet(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    r.note(n, "ignored", "no equivalent: Linux routes a shared subnet as it is")


# --- ip access-list


def _h_acl(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    name = _name(r, toks, 2, n, "ip access-list")
    if name is None:
        return
    acl = r.acls.setdefault(name, _Acl(name, n))
    r.push("acl", acl)


def _h_acl_rule(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    assert isinstance(f.obj, _Acl)
    f.obj.rules.append((n, " ".join(toks)))


def _h_acl_other(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    r.note(n, "ignored", "no equivalent in an access list (only permit/deny lines are kept)")


# --- transform sets


def _h_ipsec_set(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    name = _name(r, toks, 2, n, "ipsec transform-set")
    if name is None:
        return
    r.push("ipsec-set", r.ipsec_sets.setdefault(name, _IpsecSet(name, n)))


def _h_ike_set(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    name = _name(r, toks, 2, n, "ikev2-ikesa transform-set")
    if name is None:
        return
    r.push("ike-set", r.ike_sets.setdefault(name, _IkeSet(name, n)))


def _h_set_value(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    """``group 14``, ``cipher aes-gcm-256``, ``hmac ...``, ``prf ...``, ``lifetime N``, ``mode``."""
    assert isinstance(f.obj, _IkeSet | _IpsecSet)
    value = _arg(toks, 1)
    if value is None:
        r.note(n, "error", f"{toks[0]} without a value")
        return
    key = toks[0].lower()
    # StarOS spells the IKE SA cipher "encryption"; one key here.
    f.obj.values["cipher" if key == "encryption" else key] = (n, value.lower())


def _h_ikev1_ipsec_set(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    # crypto ipsec transform-set NAME esp hmac H cipher C
    name = _name(r, toks, 3, n, "crypto ipsec transform-set")
    if name is None:
        return
    s = r.ipsec_sets.setdefault(name, _IpsecSet(name, n, ikev1=True))
    low = [t.lower() for t in toks]
    if "ah" in low:
        r.note(n, "error", "AH is not offered here (ESP only)")
    for key in ("hmac", "cipher"):
        if (v := _after(toks, key)) is not None:
            s.values[key] = (n, v.lower())
    r.push("ipsec-set", s)


def _h_ikev1_policy(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    prio = _arg(toks, 2) or "1"
    name = f"ikev1-policy-{prio}"
    r.note(
        n, "decision",
        f"IKEv1 policy {prio} becomes the IKEv2 proposal ike_transform_set.{name} "
        "(IKEv1 is deprecated, RFC 9395); the peer must run IKEv2",
    )  # fmt: skip
    r.push("ikev1-policy", r.ike_sets.setdefault(name, _IkeSet(name, n, ikev1=True)))


def _h_ikev1_policy_value(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    assert isinstance(f.obj, _IkeSet)
    key = toks[0].lower()
    value = (_arg(toks, 1) or "").lower()
    if key == "encryption":
        f.obj.values["cipher"] = (n, value)
    elif key == "hash":
        f.obj.values["prf"] = (n, value)
    elif key == "group":
        f.obj.values["group"] = (n, value)
    elif key == "lifetime":
        f.obj.values["lifetime"] = (n, value)
    elif key == "authentication" and value not in ("pre-share", "preshared-key", ""):
        r.note(n, "error", f"authentication {value}: only pre-shared keys are offered here")


def _h_ikev1_dpd(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    # ikev1 keepalive dpd interval I timeout T num-retry R
    interval = r.integer(_after(toks, "interval"), n, "interval")
    timeout = r.integer(_after(toks, "timeout") or "10", n, "timeout")
    retries = r.integer(_after(toks, "num-retry") or "3", n, "num-retry")
    if interval is not None and timeout is not None and retries is not None:
        r.ikev1_dpd = (n, float(interval), float(timeout), retries)
        r.note(n, "decision", "IKEv1 DPD: becomes IKEv2 liveness checks (RFC 7296 §2.4)")


# --- crypto map


def _h_map(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    name, kind = _name(r, toks, 2, n, "crypto map"), (_arg(toks, 3) or "").lower()
    if name is None:
        return
    if kind not in ("ikev2-ipv4", "ikev2-ipv6", "ipsec-ikev1"):
        r.note(n, "error", f"crypto map type {kind!r} is not imported (ikev2-ipv4, ipsec-ikev1)")
        r.push("ignored", None)
        return
    ikev1 = kind == "ipsec-ikev1"
    if ikev1:
        r.note(
            n, "decision",
            "IKEv1 crypto map becomes an IKEv2 crypto map (RFC 9395); transport mode over "
            "IKEv2 uses USE_TRANSPORT_MODE (RFC 7296 §1.3.1): the peer must run IKEv2",
        )  # fmt: skip
    if kind == "ikev2-ipv6":
        r.note(
            n, "decision",
            "IPv6 tunnel endpoints: the reference does not support TACACS+ over them; "
            "imported as given",
        )  # fmt: skip
    r.push("map", r.maps.setdefault(name, _Map(name, n, ikev1)))


def _m(f: _Frame) -> _Map:
    assert isinstance(f.obj, _Map)
    return f.obj


def _h_match_address(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    _m(f).acl = _arg(toks, 2)
    if len(toks) > 3:
        r.note(n, "ignored", "the priority has no equivalent (one access list per crypto map)")


def _h_peer(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    i = 2 if toks[0].lower() == "set" else 1
    if (a := r.address(_arg(toks, i), n, "peer")) is not None:
        _m(f).peer = (n, str(a))


def _key(toks: list[str], n: int) -> _Key:
    low = [t.lower() for t in toks]
    value = _arg(toks, len(toks) - 1) if len(toks) > 1 else None
    return _Key(n, "encrypted" in low, value)


def _h_auth(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    # authentication {local|remote} pre-shared-key [encrypted] key K
    low = [t.lower() for t in toks]
    if "pre-shared-key" not in low or "key" not in low[:-1]:
        r.note(n, "error", "only pre-shared-key authentication is offered here")
        return
    if low[1] == "local":
        _m(f).local_key = _key(toks, n)
    else:
        _m(f).remote_key = _key(toks, n)


def _h_ikev1_key(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    # set ikev1 [encrypted] preshared-key K: one key, both directions
    _m(f).local_key = _key(toks, n)


def _h_ikesa(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    m = _m(f)
    sub = (_arg(toks, 1) or "").lower()
    if sub == "max-retransmission":
        m.max_retransmission = r.integer(_arg(toks, 2), n, "max-retransmission")
    elif sub == "retransmission-timeout":
        m.retransmission_timeout = r.integer(_arg(toks, 2), n, "retransmission-timeout", lo=100)
    elif sub == "transform-set" and (_arg(toks, 2) or "").lower() == "list":
        m.ike_sets = toks[3:]
    elif sub == "rekey":
        r.note(n, "ignored", "the IKE SA is always rekeyed before its lifetime ends (no key)")
    elif sub == "policy" and "error-notification" in (t.lower() for t in toks):
        r.note(n, "ignored", "error notifications are always sent (RFC 7296 §2.21)")
    else:
        r.note(n, "ignored", "no equivalent")


def _h_payload(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    name = _arg(toks, 1) or "payload"
    match = _after(toks, "match")
    if match is not None and match.lower() != "ipv4":
        r.note(n, "decision", f"payload matches {match}: the access list decides what is protected")
    p = _Payload(name, n)
    _m(f).payloads.append(p)
    r.push("payload", p)


def _h_dpd(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    # keepalive|dpd [dpd] interval I [timeout T] [num-retry R]
    interval = r.integer(_after(toks, "interval"), n, "interval")
    timeout = r.integer(_after(toks, "timeout") or "10", n, "timeout")
    retries = r.integer(_after(toks, "num-retry") or "3", n, "num-retry")
    if interval is not None and timeout is not None and retries is not None:
        _m(f).dpd = (float(interval), float(timeout), retries)


def _h_set_transform(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    _m(f).ipsec_sets = toks[2:]


def _h_set_pfs(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    _m(f).pfs = (n, (_arg(toks, 2) or "").lower().removeprefix("group"))


def _h_map_other(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    r.note(n, "ignored", "no equivalent in a crypto map")


def _p(f: _Frame) -> _Payload:
    assert isinstance(f.obj, _Payload)
    return f.obj


def _h_payload_sets(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    _p(f).sets = toks[3:]


def _h_payload_rekey(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    keepalive = "keepalive" in (t.lower() for t in toks)
    _p(f).rekey = (n, "keepalive" if keepalive else "lazy")


def _h_payload_lifetime(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    secs = r.integer(_arg(toks, 1), n, "lifetime", lo=MIN_LIFETIME)
    kb_tok = _after(toks, "kilo-bytes")
    kb = r.integer(kb_tok, n, "kilo-bytes", lo=1) if kb_tok is not None else None
    if secs is not None:
        _p(f).lifetime = (n, secs, kb)


# --- interface


def _h_interface(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    name = _name(r, toks, 1, n, "interface")
    if name is None:
        return
    r.push("interface", r.interfaces.setdefault(name, _Interface(name, n)))


def _h_if_address(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    assert isinstance(f.obj, _Interface)
    tok = (_arg(toks, 2) or "").split("/")[0]
    if (a := r.address(tok, n, "address")) is not None:
        f.obj.addresses.append(a)


def _h_if_map(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    assert isinstance(f.obj, _Interface)
    if (name := _arg(toks, 1)) is not None:
        f.obj.maps.append(name)


def _h_if_other(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    r.note(n, "ignored", "no equivalent (the Linux interface is configured outside ipsecmgr)")


# --- tacacs mode


def _h_tacacs(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    r.push("tacacs", None)


def _h_tacacs_server(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    # server priority N ip-address A [encrypted password S] [key K] [password P]
    #   [nas-source-address A] [port P] ...   (the reference calls the source "src_ip")
    r.integer(_after(toks, "priority"), n, "priority", lo=1)
    server = r.address(_after(toks, "ip-address"), n, "ip-address")
    src_tok = _after(toks, "nas-source-address") or _after(toks, "src-ip")
    src_tok = src_tok or _after(toks, "src_ip")
    src = r.address(src_tok, n, "nas-source-address") if src_tok is not None else None
    if "password" in (t.lower() for t in toks) or "key" in (t.lower() for t in toks):
        r.note(
            n, "ignored",
            "the TACACS+ shared secret belongs to the TACACS+ client (pam_tacplus "
            "secret=...), not to ipsecmgr; it is not copied",
        )  # fmt: skip
    port_tok = _after(toks, "port")
    port = r.integer(port_tok, n, "port", lo=1) if port_tok is not None else 49
    if server is not None:
        r.tacacs.append(_TacacsServer(n, server, src, port or 49))


def _h_tacacs_other(r: _Reader, f: _Frame, toks: list[str], n: int) -> None:
    r.note(n, "ignored", "a TACACS+ client setting (pam_tacplus / tacacs-plus), not ipsecmgr's")
