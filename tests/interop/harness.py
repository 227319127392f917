"""Our daemon against strongSwan in the lab: one case = one strongSwan, one
gateway of ours, IKE, and TACACS+ transactions through the tunnel.

A case says who initiates (``ours = "client"``: our initiator against a
strongSwan responder on the gw; ``ours = "gw"``: strongSwan initiates from
the client host against our responder), the proposals in strongSwan's
notation (translated into our transform sets by :func:`our_ike_set` /
:func:`our_ipsec_set`, so both ends are configured from one string), the
identity kind, the address family and the lab shape (``tunnel``: the
reference's src_ip → TACACS+ server behind the responder; ``outer``: the
transport lab, a tunnel whose selectors are the two outer addresses).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ipsecmgr.lab.configs import lab_strongswan_args
from ipsecmgr.lab.gateways import GatewayProcess, LabGateways
from ipsecmgr.lab.strongswan import PeerOptions, StrongSwanPeer
from ipsecmgr.lab.topology import Lab, LabProcess
from ipsecmgr.secret import Secret

USER, PASSWORD = "alice", "alice-interop-pw"
# One PSK per direction: what the initiator of AUTH proves, what the peer proves.
PSK_OURS = b"psk-we-authenticate-with-0123"
PSK_THEIRS = b"psk-strongswan-authenticates-with-4567"

_DH = {"modp2048": 14, "ecp256": 19, "ecp384": 20, "x25519": 31}
_IDS = {
    # kind -> (our identity, strongSwan's identity); None: the outer addresses
    "addr": None,
    "fqdn": (("fqdn", "ours.example.com"), ("fqdn", "strongswan.example.com")),
    "email": (("email", "host01@example.com"), ("email", "peer01@example.com")),
}


def our_ike_set(proposal: str, lifetime: int | None = None) -> dict[str, Any]:
    """strongSwan's ``aes256gcm16-prfsha256-modp2048`` / ``aes256-sha256-modp2048``
    as our ``[ike_transform_set]`` keys."""
    m = re.fullmatch(r"aes(128|256)(gcm16)?-(?:prf)?(sha256|sha384|sha512)-(\w+)", proposal)
    if m is None:
        raise ValueError(f"unsupported proposal {proposal!r}")
    bits, gcm, hash_, dh = m.groups()
    out: dict[str, Any] = {"dh_group": _DH[dh], "prf": hash_}
    if gcm:
        out["encryption"] = f"aes-gcm-{bits}"
    else:
        out["encryption"] = f"aes-cbc-{bits}"
        out["integrity"] = hash_  # strongSwan: aes256-sha256 = HMAC-SHA2-256-128, PRF SHA2-256
    if lifetime is not None:
        out["lifetime"] = lifetime
    return out


def our_ipsec_set(esp: str, lifetime: int | None = None) -> dict[str, Any]:
    """strongSwan's ``aes256gcm16[-modp2048][-esn]`` as ``[ipsec_transform_set]`` keys."""
    parts = esp.split("-")
    m = re.fullmatch(r"aes(128|256)gcm16", parts[0])
    if m is None:
        raise ValueError(f"unsupported ESP proposal {esp!r}")
    out: dict[str, Any] = {"esp": f"aes-gcm-{m.group(1)}", "esn": "esn" in parts[1:]}
    for p in parts[1:]:
        if p in _DH:
            out["pfs"] = _DH[p]
    if lifetime is not None:
        out["lifetime_seconds"] = lifetime
    return out


@dataclass(frozen=True)
class Case:
    name: str
    ours: str = "client"  # which side runs our daemon; the other runs strongSwan
    ike: str = "aes256gcm16-prfsha256-modp2048"
    esp: str = "aes256gcm16"
    ids: str = "addr"
    family: int = 4
    shape: str = "tunnel"  # tunnel | outer
    # extra settings for our side / strongSwan's side
    ours_map: dict[str, Any] = field(default_factory=dict)
    ours_ike_lifetime: int | None = None
    ours_child_lifetime: int | None = None
    sw: dict[str, Any] = field(default_factory=dict)
    sw_psk: bytes = PSK_OURS  # strongSwan's PSK with address identities
    # ours = "client", tunnel shape: protect the server LAN (libipsec needs a
    # local address inside its selector); False: only the server, as the lab does
    protect_lan: bool = True
    # further ESP proposals of ours (strongSwan notation), offered after ``esp``
    ours_more_esp: tuple[str, ...] = ()

    @property
    def lab_mode(self) -> str:
        return "transport" if self.shape == "outer" else "tunnel"

    def __str__(self) -> str:
        return self.name


class Files:
    """PSKs, TACACS+ secret and users, written once per lab."""

    def __init__(self, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        self.dir = d
        self.secret = self._write("tacacs-secret", b"interop-tacacs-key")
        self.users = d / "users.json"
        self.users.write_text(json.dumps({USER: {"password": PASSWORD}}))
        self.psk_ours = self._write("psk-ours", PSK_OURS)
        self.psk_theirs = self._write("psk-theirs", PSK_THEIRS)

    def _write(self, name: str, data: bytes) -> Path:
        p = self.dir / name
        p.write_bytes(data)
        p.chmod(0o600)
        return p


@dataclass
class Running:
    """One case, running: our gateway, strongSwan, the TACACS+ server."""

    case: Case
    lab: Lab
    files: Files
    ours: GatewayProcess
    sw: StrongSwanPeer
    server: LabProcess

    @property
    def server_addr(self) -> str:
        a = self.lab.addresses
        return a.server6 if self.case.family == 6 else a.server4

    @property
    def client_src(self) -> str:
        a = self.lab.addresses
        if self.case.shape == "outer":
            return a.client_wan6 if self.case.family == 6 else a.client_wan4
        src = a.src_ip6 if self.case.family == 6 else a.src_ip4
        assert src is not None
        return src

    def tacacs(self, timeout: float = 5.0) -> dict[str, Any]:
        return self.lab.tacacs_query(
            "client",
            server=self.server_addr,
            secret_file=self.files.secret,
            user=USER,
            password=PASSWORD,
            timeout=timeout,
        )

    def sw_sas(self) -> str:
        return self.sw.swanctl("--list-sas", "--raw").stdout

    def counter(self, group: str, name: str) -> int:
        return self.ours.counter(group, name)

    def ike(self, name: str) -> int:
        return self.ours.counter("ike", f"tacacs/{name}")

    def diagnostics(self) -> str:
        log = self.sw.log_path.read_text(errors="replace") if self.sw.log_path.exists() else ""
        return f"--- our log\n{self.ours.log[-4000:]}\n--- charon.log\n{log[-5000:]}"


def wait_for(what: str, cond: Callable[[], bool], timeout: float, step: float = 0.1) -> None:
    """Poll ``cond`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def sw_options(case: Case, lab: Lab, files: Files) -> tuple[str, str, PeerOptions]:
    sw_side = "gw" if case.ours == "client" else "client"
    args = lab_strongswan_args(lab.addresses, sw_side, family=case.family)
    o = replace(args.options, ike=case.ike, esp=case.esp)
    ids = _IDS[case.ids]
    if ids is not None:
        (_, ours), (_, theirs) = ids
        # strongSwan signs with the key bound to the peer's identity (ours: the
        # PSK our side expects from it) and accepts the one bound to its own.
        o = replace(
            o,
            local_id=theirs,
            remote_id=ours,
            psks_by_id=((ours, Secret(PSK_THEIRS)), (theirs, Secret(PSK_OURS))),
        )
    o = replace(o, **case.sw)
    return args.local, args.remote, o


def our_options(case: Case, lab: Lab, files: Files) -> dict[str, Any]:
    a = lab.addresses
    mp: dict[str, Any] = {"first_packet": "queue"}
    ids = _IDS[case.ids]
    if ids is not None:
        (t_ours, ours), (t_theirs, theirs) = ids
        mp["local_id"] = {"type": t_ours, "value": ours}
        mp["remote_id"] = {"type": t_theirs, "value": theirs}
        mp["remote_psk"] = {"file": str(files.psk_theirs)}
    mp.update(case.ours_map)
    first = mp.pop("first_packet")
    opts: dict[str, Any] = {
        "family": case.family,
        "first_packet": first,
        "mode": "tunnel",
        "ike_options": our_ike_set(case.ike, case.ours_ike_lifetime),
        "ipsec_options": our_ipsec_set(case.esp, case.ours_child_lifetime),
        "map_options": mp,
        "psk_file": files.psk_ours,
    }
    opts["ipsec_options"].pop("esp")
    opts["esp"] = our_ipsec_set(case.esp)["esp"]
    if case.ours_more_esp:
        opts["more_ipsec_sets"] = {
            f"more{i}": our_ipsec_set(e, case.ours_child_lifetime)
            for i, e in enumerate(case.ours_more_esp)
        }
    if case.ours == "client" and case.shape == "tunnel" and case.protect_lan:
        # libipsec needs a local address inside its selector: protect the server LAN
        opts["far_net"] = a.lan6 if case.family == 6 else a.lan4
    return opts


def psk_for_addr_ids(case: Case) -> Secret:
    return Secret(case.sw_psk)


class InteropLab:
    """A lab (one per shape) that runs cases one after the other."""

    def __init__(self, shape: str, workdir: Path) -> None:
        self.shape = shape
        self.lab = Lab("transport" if shape == "outer" else "tunnel").build()
        self.files = Files(workdir / "files")
        self.workdir = workdir
        self.server = self.lab.start_tacacs_server(
            "server", secret_file=self.files.secret, users_file=self.files.users
        )
        self._n = 0

    def close(self) -> None:
        self.lab.close()

    @contextlib.contextmanager
    def run(self, case: Case, *, initiate: bool = True) -> Iterator[Running]:
        """Start strongSwan and our gateway for ``case``; yield; stop both."""
        self._n += 1
        d = self.workdir / f"case{self._n}"
        (d / "ours").mkdir(parents=True)
        gws = LabGateways(self.lab, d / "ours")
        sw_side = "gw" if case.ours == "client" else "client"
        sw = StrongSwanPeer(self.lab.ns(sw_side), d / "sw")
        try:
            local, remote, o = sw_options(case, self.lab, self.files)
            sw.start(local=local, remote=remote, psk=psk_for_addr_ids(case), options=o)
            ours = gws.start(case.ours, verbose=1, **our_options(case, self.lab, self.files))
            running = Running(case, self.lab, self.files, ours, sw, self.server)
            if case.ours == "gw" and initiate:
                sw.initiate()
            yield running
        finally:
            try:
                gws.close()
            finally:
                sw.stop()
