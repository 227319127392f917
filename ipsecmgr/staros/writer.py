"""The StarOS writer: our TOML from what the reader collected, with the notes
of every mapping that is not one to one."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from ipsecmgr.config import DH_GROUPS, MIN_LIFETIME
from ipsecmgr.staros.flows import map_flows
from ipsecmgr.staros.model import (
    _CONTROL,
    _UNSAFE,
    _Acl,
    _Interface,
    _IpsecSet,
    _is_int,
    _Key,
    _key_name,
    _Map,
    _s,
)
from ipsecmgr.staros.reader import _Reader
from npusim import AclSyntaxError, parse_acl

# StarOS names -> ours. Ciphers not offered here (ESP is AES-GCM only, RFC 8221
# prefers AEAD) map to the AES-GCM of the same key size, reported as a decision.
_ESP = {"aes-gcm-128": "aes-gcm-128", "aes-gcm-256": "aes-gcm-256"}
_ESP_NEAREST = {"aes-cbc-128": "aes-gcm-128", "aes-cbc-256": "aes-gcm-256"}
_IKE_ENC = {
    "aes-gcm-128": "aes-gcm-128",
    "aes-gcm-256": "aes-gcm-256",
    "aes-cbc-256": "aes-cbc-256",
}
_IKE_ENC_V1 = {"aes256": "aes-cbc-256", "aes-256": "aes-cbc-256"}
_HASH = {
    "sha2-256-128": "sha256", "sha2-384-192": "sha384", "sha2-512-256": "sha512",
    "sha2-256": "sha256", "sha2-384": "sha384", "sha2-512": "sha512",
    "sha256": "sha256", "sha384": "sha384", "sha512": "sha512",
}  # fmt: skip


def _group(r: _Reader, line: int, value: str, what: str, *, allow_none: bool) -> int | str | None:
    if value == "none" and allow_none:
        return "none"
    if _is_int(value) and int(value) in DH_GROUPS:
        return int(value)
    r.note(
        line, "decision",
        f"{what} {value} is not offered here (DH groups {', '.join(map(str, DH_GROUPS))}; "
        "MODP below 2048 bits is deprecated by RFC 8247): group 14 instead, the peer must "
        "offer it",
        text=_line_text(r, line),
    )  # fmt: skip
    return 14


def _line_text(r: _Reader, line: int) -> str:
    return r.line_texts.get(line, "")


class _Writer:
    """Builds the TOML from what :class:`_Reader` collected."""

    def __init__(self, r: _Reader) -> None:
        self.r = r
        self.out: list[str] = []
        self.keys: dict[str, bytes] = {}
        self.missing: list[str] = []

    def note(self, line: int, kind: str, message: str) -> None:
        self.r.note(line, kind, message, text=_line_text(self.r, line))

    def emit(self, *lines: str) -> None:
        # Names from the input also go into comments: a control character there
        # would make the TOML invalid (strings are escaped by _s already).
        self.out.extend(_CONTROL.sub("?", line) for line in lines)

    def build(self) -> str:
        r = self.r
        self.emit(
            "# Imported from a StarOS configuration by `ipsecmgr import-staros`.",
            "# Comments name the StarOS line each setting comes from; the import report",
            "# lists every line that has no equivalent or needs a decision.",
        )
        for acl in r.acls.values():
            self.acl(acl)
        ike_used = self.ike_sets()
        ipsec_extra = self.ipsec_sets()
        bound = {m: i.name for i in r.interfaces.values() for m in i.maps}
        gw_ifaces = [i for i in r.interfaces.values() if i.maps and i.addresses]
        tuns: list[tuple[str, _Map, str | None, list[str]]] = []
        for m in r.maps.values():
            tun = self.crypto_map(m, ike_used, ipsec_extra, bound, len(gw_ifaces) > 1)
            if tun is not None:
                tuns.append(tun)
        used_names: set[str] = set()
        for name, m, src, routes in tuns:
            # Linux interface names have at most 15 characters; keep them unique.
            base, i = name, 1
            while name in used_names:
                i += 1
                name = f"{base[: 15 - len(str(i))]}{i}"
            used_names.add(name)
            self.emit("", f"# line {r.interfaces[bound[m.name]].line}: interface "
                      f"{bound[m.name]} / crypto-map {m.name}")  # fmt: skip
            self.emit(f"[tun.{_key_name(name)}]")
            if src is not None:
                self.emit(f"addresses = [{_s(src + ('/32' if ':' not in src else '/128'))}]")
            self.emit(f"routes = [{', '.join(_s(x) for x in routes)}]")
            self.emit(f"crypto_maps = [{_s(m.name)}]")
        self.gateway(gw_ifaces)
        return "\n".join(self.out) + "\n"

    # --- sections

    def acl(self, acl: _Acl) -> None:
        self.emit("", f"# line {acl.line}: ip access-list {acl.name}")
        if not acl.rules:
            self.note(acl.line, "error", f"access list {acl.name} has no permit/deny line")
        for line, rule in acl.rules:
            try:
                parsed = parse_acl(acl.name, [rule])
            except AclSyntaxError as e:
                self.note(
                    line, "error",
                    f"ACL {acl.name}: unexpected {e.token!r}: expected {e.expected}. Written "
                    "as is: check-config rejects it until the line is corrected (a guess "
                    "would decide what traffic leaves in clear)",
                )  # fmt: skip
                continue
            for w in parsed.warnings:
                self.note(line, "decision", w)
        self.emit(f"[access_list.{_key_name(acl.name)}]")
        self.emit("rules = [")
        self.emit(*(f"    {_s(rule)},  # line {line}" for line, rule in acl.rules))
        self.emit("]")

    def ike_sets(self) -> set[str]:
        used: set[str] = set()
        for s in self.r.ike_sets.values():
            used.add(s.name)
            v = s.values
            self.emit("", f"# line {s.line}: " + (
                f"ikev1 policy (as {s.name})" if s.ikev1 else f"ikev2-ikesa transform-set {s.name}"
            ))  # fmt: skip
            self.emit(f"[ike_transform_set.{_key_name(s.name)}]")
            enc = "aes-gcm-256"
            if "cipher" in v:
                line, c = v["cipher"]
                if c in _IKE_ENC or c in _IKE_ENC_V1:
                    enc = _IKE_ENC.get(c) or _IKE_ENC_V1[c]
                else:
                    self.note(
                        line, "decision",
                        f"IKE cipher {c} is not offered here ({', '.join(_IKE_ENC)}): "
                        f"{enc} instead, the peer must offer it",
                    )  # fmt: skip
            else:
                self.note(
                    s.line, "decision",
                    f"{s.name}: no cipher given; the StarOS default is not assumed: {enc} "
                    "with prf sha256 (RFC 8247), the peer must offer it",
                )  # fmt: skip
            self.emit(f"encryption = {_s(enc)}")
            prf = "sha256"
            if "prf" in v:
                line, p = v["prf"]
                if p in _HASH:
                    prf = _HASH[p]
                else:
                    self.note(line, "decision", f"PRF {p} is not offered here: sha256 instead")
            self.emit(f"prf = {_s(prf)}")
            if enc.startswith("aes-cbc"):
                integ = prf
                if "hmac" in v:
                    line, h = v["hmac"]
                    integ = _HASH.get(h, "sha256")
                    if h not in _HASH:
                        self.note(line, "decision", f"integrity {h} is not offered: sha256")
                self.emit(f"integrity = {_s(integ)}")
            elif "hmac" in v and v["hmac"][1] != "none":
                self.note(v["hmac"][0], "ignored", "AES-GCM carries its own integrity (RFC 5282)")
            group = 14
            if "group" in v:
                line, g = v["group"]
                got = _group(self.r, line, g, "DH group", allow_none=False)
                group = got if isinstance(got, int) else 14
            self.emit(f"dh_group = {group}")
            if "lifetime" in v:
                line, life = v["lifetime"]
                if _is_int(life) and int(life) >= MIN_LIFETIME:
                    self.emit(f"lifetime = {int(life)}  # line {line}")
                else:
                    self.note(line, "error", f"lifetime {life!r} is not a number of seconds")
        return used

    def ipsec_sets(self) -> dict[str, dict[str, str]]:
        """Write the ipsec transform sets; payload and IKEv1 map settings land in them."""
        extra = self.ipsec_set_extras()
        for s in self.r.ipsec_sets.values():
            self.ipsec_set(s, extra[s.name])
        return extra

    def ipsec_set_extras(self) -> dict[str, dict[str, str]]:
        """The keys each ipsec transform set gets from payloads and IKEv1 maps."""
        extra: dict[str, dict[str, str]] = {s: {} for s in self.r.ipsec_sets}
        origin: dict[tuple[str, str], int] = {}

        def put(set_name: str, key: str, value: str, line: int) -> None:
            if set_name not in extra:
                return
            old = extra[set_name].get(key)
            if old is not None and old != value:
                self.note(
                    line, "decision",
                    f"ipsec transform-set {set_name} gets {key} = {old} from line "
                    f"{origin[(set_name, key)]} and {value} here: the first is kept "
                    "(one value per transform set; give each payload its own set)",
                )  # fmt: skip
                return
            extra[set_name][key] = value
            origin[(set_name, key)] = line

        for m in self.r.maps.values():
            for p in m.payloads:
                rekey = p.rekey or (p.line, "lazy")
                if p.rekey is None:
                    self.note(
                        p.line, "decision",
                        f"payload {p.name} has no 'rekey': idle Child SAs are left to expire "
                        "(rekey = \"lazy\"); 'rekey keepalive' would keep them",
                    )  # fmt: skip
                for set_name in p.sets:
                    put(set_name, "rekey", _s(rekey[1]), rekey[0])
                    if p.lifetime is not None:
                        line, secs, kb = p.lifetime
                        put(set_name, "lifetime_seconds", str(secs), line)
                        if kb is not None:
                            put(set_name, "lifetime_bytes", str(kb * 1024), line)
            if m.ikev1 and m.pfs is not None:
                line, g = m.pfs
                got = _group(self.r, line, g, "PFS group", allow_none=True)
                for set_name in m.ipsec_sets:
                    put(set_name, "pfs", _s(got) if got == "none" else str(got), line)
        return extra

    def ipsec_set(self, s: _IpsecSet, extra: dict[str, str]) -> None:
        """One ipsec transform set, with ``extra`` (consumed: its pfs is popped)."""
        v = s.values
        self.emit("", f"# line {s.line}: " + (
            "crypto ipsec transform-set" if s.ikev1 else "ipsec transform-set"
        ) + f" {s.name}")  # fmt: skip
        self.emit(f"[ipsec_transform_set.{_key_name(s.name)}]")
        esp = "aes-gcm-256"
        line, c = v.get("cipher", (s.line, ""))
        hmac = v.get("hmac", (s.line, "none"))[1]
        if c in _ESP:
            esp = _ESP[c]
        elif c:
            esp = _ESP_NEAREST.get(c, "aes-gcm-256")
            self.note(
                line, "decision",
                f"ESP {c} with hmac {hmac} is not offered here (AES-GCM only, RFC 8221): "
                f"{esp} instead, the peer must offer it",
            )  # fmt: skip
        else:
            self.note(
                s.line, "decision",
                f"{s.name}: no cipher given; the StarOS default is not assumed: {esp}, "
                "the peer must offer it",
            )  # fmt: skip
        self.emit(f"esp = {_s(esp)}")
        if "group" in v:
            gl, g = v["group"]
            got = _group(self.r, gl, g, "PFS group", allow_none=True)
            self.emit(f"pfs = {_s(got) if got == 'none' else got}  # line {gl}")
        elif "pfs" in extra:
            self.emit(f"pfs = {extra.pop('pfs')}")
        mode = "tunnel"
        if "mode" in v:
            ml, mv = v["mode"]
            if mv in ("tunnel", "transport"):
                mode = mv
            else:
                self.note(ml, "error", f"mode {mv!r} is not tunnel or transport")
        self.emit(f"mode = {_s(mode)}")
        if "lifetime" in v:
            ll, life = v["lifetime"]
            if _is_int(life) and int(life) >= MIN_LIFETIME:
                extra.setdefault("lifetime_seconds", life)
            else:
                self.note(ll, "error", f"lifetime {life!r} is not a number of seconds")
        extra.pop("pfs", None)
        for key, value in extra.items():
            self.emit(f"{key} = {value}")

    def psk(self, m: _Map, key: _Key | None, side: str) -> str:
        # The file name comes from the map's name: only characters that cannot leave
        # the output directory ("../x" becomes "___x"), and unique.
        base = f"psk-{_UNSAFE.sub('_', m.name)}-{side}"
        fname, i = base, 1
        while fname in self.keys or fname in self.missing:
            i += 1
            fname = f"{base}-{i}"
        if key is None:
            self.note(
                m.line, "action",
                f"crypto map {m.name}: no {side} pre-shared key; write it into {fname} "
                "(beside the TOML, mode 0600)",
            )  # fmt: skip
            self.missing.append(fname)
        elif key.encrypted or not key.value:
            self.note(
                key.line, "action",
                f"an encrypted StarOS key cannot be decrypted here: write the plain {side} "
                f"key of crypto map {m.name} into {fname} (beside the TOML, mode 0600)",
            )  # fmt: skip
            self.missing.append(fname)
        else:
            self.keys[fname] = key.value.encode()
        return f"{{ file = {_s(fname)} }}"

    def crypto_map(
        self,
        m: _Map,
        ike_names: set[str],
        ipsec_extra: Mapping[str, Mapping[str, str]],
        bound: Mapping[str, str],
        pick_local: bool,
    ) -> tuple[str, _Map, str | None, list[str]] | None:
        r = self.r
        kind = "ipsec-ikev1" if m.ikev1 else "ikev2-ipv4"
        self.emit("", f"# line {m.line}: crypto map {m.name} {kind}")
        self.emit(f"[crypto_map.{_key_name(m.name)}]")
        self.map_keys(m)
        ipsec = self.map_proposals(m, ike_names, ipsec_extra)
        modes = {
            (r.ipsec_sets[s].values.get("mode", (0, "tunnel"))[1]) for s in ipsec
            if s in r.ipsec_sets
        }  # fmt: skip
        mode = "transport" if modes == {"transport"} else "tunnel"
        dpd = m.dpd
        if dpd is None and m.ikev1 and r.ikev1_dpd is not None:
            dpd = r.ikev1_dpd[1:]
        if dpd is not None:
            self.emit(
                f"dpd = {{ interval = {dpd[0]:g}, timeout = {dpd[1]:g}, retries = {dpd[2]} }}"
            )
        src, routes = map_flows(self, m, mode)
        if src is not None:
            self.emit(f"src_ip = {_s(src)}")
        iface = bound.get(m.name)
        if pick_local and iface is not None and m.peer is not None:
            peer_v = ipaddress.ip_address(m.peer[1]).version
            same = [a for a in r.interfaces[iface].addresses if a.version == peer_v]
            if same:
                self.emit(f"local_address = {_s(str(same[0]))}  # interface {iface}")
        if iface is None:
            self.note(
                m.line, "decision",
                f"crypto map {m.name} is on no interface ('crypto-map {m.name}'): no TUN is "
                "written, so no traffic reaches it",
            )  # fmt: skip
            return None
        name = ("tun-" + _UNSAFE.sub("_", m.name))[:15]  # a Linux interface name
        return name, m, src if mode == "tunnel" else None, routes

    def map_keys(self, m: _Map) -> None:
        """A crypto map's ACL, peer, pre-shared keys and retransmission settings."""
        r = self.r
        if m.acl is None:
            self.note(m.line, "error", f"crypto map {m.name} has no 'match address'")
        elif m.acl not in r.acls:
            self.note(m.line, "error", f"crypto map {m.name}: no ip access-list {m.acl!r}")
        if m.acl is not None:
            self.emit(f"match_address = {_s(m.acl)}")
        if m.peer is None:
            self.note(m.line, "error", f"crypto map {m.name} has no peer")
        else:
            self.emit(f"peer = {_s(m.peer[1])}  # line {m.peer[0]}")
        self.emit(f"local_psk = {self.psk(m, m.local_key, 'local')}")
        if not m.ikev1:
            if m.remote_key is None and m.local_key is not None:
                self.note(m.line, "decision", "no remote key: the local key is used both ways")
            else:
                self.emit(f"remote_psk = {self.psk(m, m.remote_key, 'remote')}")
        if m.max_retransmission is not None:
            self.emit(f"max_retransmission = {m.max_retransmission}")
        if m.retransmission_timeout is not None:
            self.emit(f"retransmission_timeout = {m.retransmission_timeout}")

    def map_proposals(
        self, m: _Map, ike_names: set[str], ipsec_extra: Mapping[str, Mapping[str, str]]
    ) -> list[str]:
        """A crypto map's IKE and ipsec transform sets; returns the ipsec ones."""
        r = self.r
        ike = m.ike_sets or [n for n, s in r.ike_sets.items() if s.ikev1 and m.ikev1]
        for name in ike:
            if name not in ike_names:
                self.note(m.line, "error", f"crypto map {m.name}: no IKE transform set {name!r}")
        if ike:
            self.emit(f"ike_transform_sets = [{', '.join(_s(x) for x in ike)}]")
        else:
            self.note(
                m.line, "decision",
                f"crypto map {m.name} names no IKE transform set: the default proposal "
                "(aes-gcm-256, prf sha256, group 14), the peer must offer it",
            )  # fmt: skip
        ipsec = m.ipsec_sets if m.ikev1 else [s for p in m.payloads for s in p.sets]
        if len(m.payloads) > 1:
            self.note(
                m.payloads[1].line, "decision",
                f"crypto map {m.name}: {len(m.payloads)} payloads become one proposal list "
                "(one Child SA per crypto map here)",
            )  # fmt: skip
        for name in ipsec:
            if name not in ipsec_extra:
                self.note(m.line, "error", f"crypto map {m.name}: no ipsec transform-set {name!r}")
        if ipsec:
            self.emit(f"ipsec_transform_sets = [{', '.join(_s(x) for x in dict.fromkeys(ipsec))}]")
        else:
            self.note(
                m.line, "decision",
                f"crypto map {m.name} names no ipsec transform set: the default proposal "
                "(ESP aes-gcm-256, no PFS, tunnel mode), the peer must offer it",
            )  # fmt: skip
        return ipsec

    def gateway(self, ifaces: list[_Interface]) -> None:
        r = self.r
        if not ifaces:
            ifaces = [i for i in r.interfaces.values() if i.addresses]
            if ifaces and r.maps:
                self.note(
                    ifaces[0].line, "decision",
                    "no interface carries a crypto-map: gateway.local_addresses are every "
                    "interface address",
                )  # fmt: skip
        if not ifaces:
            if r.maps:
                self.note(
                    0, "error",
                    "no interface address: write [gateway] local_addresses by hand",
                )  # fmt: skip
            return
        addrs = list(dict.fromkeys(str(a) for i in ifaces for a in i.addresses))
        self.emit("", f"# line {ifaces[0].line}: interface {ifaces[0].name}")
        self.emit("[gateway]")
        self.emit(f"local_addresses = [{', '.join(_s(a) for a in addrs)}]")
        self.emit(f"management_interface = {_s(ifaces[0].name)}")
        self.note(
            ifaces[0].line, "decision",
            f"interface {ifaces[0].name}: its addresses must be on a Linux interface of "
            "this host; gateway.management_interface names the StarOS interface (rename "
            "it to the Linux one)",
        )  # fmt: skip
