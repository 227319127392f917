"""The StarOS reader: CLI modes as a stack of frames, one handler table per mode."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from ipsecmgr.staros.handlers import (
    _h_aaa,
    _h_acl,
    _h_acl_other,
    _h_acl_rule,
    _h_auth,
    _h_configure,
    _h_context,
    _h_dpd,
    _h_if_address,
    _h_if_map,
    _h_if_other,
    _h_ike_set,
    _h_ikesa,
    _h_ikev1_dpd,
    _h_ikev1_ipsec_set,
    _h_ikev1_key,
    _h_ikev1_policy,
    _h_ikev1_policy_value,
    _h_interface,
    _h_ipsec_set,
    _h_map,
    _h_map_other,
    _h_match_address,
    _h_payload,
    _h_payload_lifetime,
    _h_payload_rekey,
    _h_payload_sets,
    _h_peer,
    _h_require,
    _h_set_pfs,
    _h_set_transform,
    _h_set_value,
    _h_shared_subnet,
    _h_tacacs,
    _h_tacacs_other,
    _h_tacacs_server,
)
from ipsecmgr.staros.model import (
    IPAddress,
    Note,
    _Acl,
    _Frame,
    _IkeSet,
    _Interface,
    _IpsecSet,
    _is_int,
    _Map,
    _TacacsServer,
    _tokens,
    mask_secrets,
)

Handler = Callable[["_Reader", _Frame, list[str], int], None]


class _Reader:
    """StarOS CLI modes as a stack of frames; one handler table per mode."""

    def __init__(self) -> None:
        self.notes: list[Note] = []
        self.acls: dict[str, _Acl] = {}
        self.ike_sets: dict[str, _IkeSet] = {}
        self.ipsec_sets: dict[str, _IpsecSet] = {}
        self.maps: dict[str, _Map] = {}
        self.interfaces: dict[str, _Interface] = {}
        self.tacacs: list[_TacacsServer] = []
        self.ikev1_dpd: tuple[int, float, float, int] | None = None
        self.stack: list[_Frame] = [_Frame("root")]
        self.text = ""  # the current line, secrets masked
        self.line_texts: dict[int, str] = {}  # every line, secrets masked

    def note(self, line: int, kind: str, message: str, text: str | None = None) -> None:
        self.notes.append(Note(line, kind, self.text if text is None else text, message))

    def read(self, source: str) -> None:
        for lineno, raw in enumerate(source.splitlines(), start=1):
            stripped = raw.strip()
            self.line_texts[lineno] = mask_secrets(_tokens(stripped))
            if not stripped or stripped.startswith("!"):
                continue
            low = stripped.lower()
            if low in ("#exit", "exit"):
                if len(self.stack) > 1:
                    self.stack.pop()
                continue
            if low == "end":
                del self.stack[1:]
                continue
            if stripped.startswith("#"):
                continue  # a comment
            toks = _tokens(stripped)
            self.text = mask_secrets(toks)
            self.dispatch(toks, lineno)

    def dispatch(self, toks: list[str], lineno: int) -> None:
        # The current mode first, then enclosing modes (a missing "#exit").
        for depth in range(len(self.stack) - 1, -1, -1):
            handler = _find(_TABLES[self.stack[depth].kind], toks)
            if handler is not None:
                del self.stack[depth + 1 :]
                handler(self, self.stack[depth], toks, lineno)
                return
        kind = self.stack[-1].kind
        self.note(lineno, "ignored", f"not a command this importer knows (in {kind} mode)")
        # It may enter a mode of its own (``show configuration`` is full of them:
        # ``subscriber default`` ... ``#exit``); that ``#exit`` must close it, not the
        # enclosing known mode. If it was a one-line command, the next known line
        # closes the frame through the search above.
        self.push("unknown", None)

    def push(self, kind: str, obj: object) -> None:
        self.stack.append(_Frame(kind, obj))

    # --- small value readers: report and return None on a bad value

    def integer(self, tok: str | None, lineno: int, what: str, lo: int = 0) -> int | None:
        if tok is None or not _is_int(tok) or int(tok) < lo:
            self.note(lineno, "error", f"{what}: expected an integer >= {lo}, got {tok!r}")
            return None
        return int(tok)

    def address(self, tok: str | None, lineno: int, what: str) -> IPAddress | None:
        try:
            return ipaddress.ip_address(tok or "")
        except ValueError:
            self.note(lineno, "error", f"{what}: {tok!r} is not an IP address")
            return None


def _find(table: list[tuple[tuple[str, ...], Handler]], toks: list[str]) -> Handler | None:
    low = [t.lower() for t in toks]
    for prefix, handler in table:
        if tuple(low[: len(prefix)]) == prefix:
            return handler
    return None


_SET_KEYS = (
    ("group",), ("cipher",), ("hmac",), ("prf",), ("lifetime",), ("mode",), ("encryption",),
)  # fmt: skip

_TABLES: dict[str, list[tuple[tuple[str, ...], Handler]]] = {
    "root": [
        (("configure",), _h_configure),
        (("config",), _h_configure),
        (("context",), _h_context),
        (("require", "crypto"), _h_require),
        (("aaa", "tacacs+"), _h_aaa),
        (("tacacs", "mode"), _h_tacacs),
    ],
    "context": [
        (("ip", "access-list"), _h_acl),
        (("ipsec", "transform-set"), _h_ipsec_set),
        (("ikev2-ikesa", "transform-set"), _h_ike_set),
        (("crypto", "ipsec", "transform-set"), _h_ikev1_ipsec_set),
        (("crypto", "map"), _h_map),
        (("ikev1", "policy"), _h_ikev1_policy),
        (("ikev1", "keepalive", "dpd"), _h_ikev1_dpd),
        (("interface",), _h_interface),
        (("tacacs", "mode"), _h_tacacs),
        (("aaa", "tacacs+"), _h_aaa),
        (("ip", "routing", "shared-subnet"), _h_shared_subnet),
    ],
    "acl": [
        (("permit",), _h_acl_rule),
        (("deny",), _h_acl_rule),
        (("remark",), _h_acl_other),
        (("readdress",), _h_acl_other),
        (("redirect",), _h_acl_other),
    ],
    "ipsec-set": [(k, _h_set_value) for k in _SET_KEYS],
    "ike-set": [(k, _h_set_value) for k in _SET_KEYS],
    "ikev1-policy": [
        (("encryption",), _h_ikev1_policy_value),
        (("hash",), _h_ikev1_policy_value),
        (("group",), _h_ikev1_policy_value),
        (("lifetime",), _h_ikev1_policy_value),
        (("authentication",), _h_ikev1_policy_value),
    ],
    "map": [
        (("match", "address"), _h_match_address),
        (("peer",), _h_peer),
        (("set", "peer"), _h_peer),
        (("authentication",), _h_auth),
        (("set", "ikev1", "encrypted", "preshared-key"), _h_ikev1_key),
        (("set", "ikev1", "preshared-key"), _h_ikev1_key),
        (("set", "transform-set"), _h_set_transform),
        (("set", "pfs"), _h_set_pfs),
        (("ikev2-ikesa",), _h_ikesa),
        (("payload",), _h_payload),
        (("keepalive",), _h_dpd),
        (("dpd",), _h_dpd),
        (("control-dont-fragment",), _h_map_other),
        (("natt",), _h_map_other),
        (("set",), _h_map_other),
    ],
    "payload": [
        (("ipsec", "transform-set", "list"), _h_payload_sets),
        (("rekey",), _h_payload_rekey),
        (("lifetime",), _h_payload_lifetime),
    ],
    "interface": [
        (("ip", "address"), _h_if_address),
        (("ipv6", "address"), _h_if_address),
        (("crypto-map",), _h_if_map),
        (("description",), _h_if_other),
        (("ip", "mtu"), _h_if_other),
    ],
    "tacacs": [
        (("server",), _h_tacacs_server),
        (("accounting",), _h_tacacs_other),
        (("authorization",), _h_tacacs_other),
        (("authentication",), _h_tacacs_other),
        (("on-unknown-user",), _h_tacacs_other),
        (("max-sessions",), _h_tacacs_other),
        (("timeout",), _h_tacacs_other),
        (("retries",), _h_tacacs_other),
        (("priv-lvl",), _h_tacacs_other),
        (("user-id",), _h_tacacs_other),
    ],
    "ignored": [],
    "unknown": [],
}
