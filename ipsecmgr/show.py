"""``show crypto ...`` output: StarOS-like tables from the daemon's state snapshot.

The daemon answers the control command ``snapshot`` with a :class:`Snapshot`
(plain JSON: dicts, lists, strings, numbers); the CLI renders it here. The
formatters are pure: ages are computed from ``snapshot["time"]``, not from the
clock, so the same snapshot always prints the same text. ``--json`` prints the
snapshot part as it is (:func:`render` with ``as_json=True``).

Commands (as in the reference's Monitoring section, without IKEv1)::

    show crypto map
    show crypto ikev2-ikesa security-associations [summary]
    show crypto ipsec security-associations [summary]
    show crypto statistics

No key material is part of the snapshot schema: SPIs and counters only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from ipsecmgr.config import Config
from ipsecmgr.control import ControlError, request


class CryptoMapState(TypedDict):
    name: str
    type: str  # "ikev2-ipv4" | "ikev2-ipv6"
    peer: str
    local_address: str
    match_address: str
    acl_rules: list[str]
    mode: str  # "tunnel" | "transport"
    role: str  # "initiator" | "responder"
    ike_transform_sets: list[str]
    ipsec_transform_sets: list[str]
    tun: str | None
    src_ip: str | None
    status: str  # "up" | "down" | "connecting"
    local_id: str
    remote_id: str
    last_error: NotRequired[str]  # why the last IKE attempt failed, in plain words
    # Failover (ipsecmgr.failover.MapFailover): each peer's state, the map's hold-down
    peers: NotRequired[list[dict[str, Any]]]
    hold_down_left: NotRequired[float | None]
    hold_down_reason: NotRequired[str]
    preempt: NotRequired[bool]
    on_unreachable: NotRequired[str]


class IkeSaState(TypedDict):
    crypto_map: str
    local: str  # "address[:port]"
    remote: str
    spi_i: str  # 16 hex digits
    spi_r: str
    role: str  # "initiator" | "responder"
    state: str  # "CONNECTING" | "ESTABLISHED" | "REKEYING" | "DELETING"
    encryption: str
    prf: str
    integrity: str | None
    dh_group: int
    nat_t: bool
    established_at: float | None  # epoch seconds
    expires_at: float | None  # rekey deadline, epoch seconds
    child_sas: int
    local_id: str
    remote_id: str
    messages_in: NotRequired[int]
    messages_out: NotRequired[int]
    retransmissions: NotRequired[int]


class ChildSaState(TypedDict):
    crypto_map: str
    ike_spi_i: str
    mode: str
    state: str  # "INSTALLED" | "REKEYING" | "REKEYED"
    spi_in: str  # 8 hex digits
    spi_out: str
    local_ts: list[str]
    remote_ts: list[str]
    encryption: str
    esn: bool
    encap: bool  # UDP encapsulation (RFC 3948)
    pfs_group: int | None
    bytes_in: int
    bytes_out: int
    packets_in: int
    packets_out: int
    replay_window: int
    established_at: float | None
    expires_at: float | None


class Statistics(TypedDict):
    """Counter groups; each maps a counter name to its value."""

    ike: dict[str, int]
    esp: dict[str, int]
    classifier: dict[str, int]
    tun: dict[str, int]


class Snapshot(TypedDict):
    time: float  # epoch seconds when the snapshot was taken
    hostname: str
    uptime: float
    crypto_maps: list[CryptoMapState]
    ike_sas: list[IkeSaState]
    child_sas: list[ChildSaState]
    statistics: Statistics


# ---------------------------------------------------------------- helpers


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{days}d{h:02d}h{m:02d}m" if days else f"{h:02d}:{m:02d}:{s:02d}"


def _age(now: float, at: float | None) -> str:
    return "-" if at is None else _duration(now - at)


def _left(now: float, at: float | None) -> str:
    return "-" if at is None else _duration(at - now)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns under a dashed rule, as StarOS prints its summaries."""
    cells = [[str(c) for c in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, " ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fields(pairs: Sequence[tuple[str, object]], indent: int = 2) -> list[str]:
    width = max(len(k) for k, _ in pairs)
    return [f"{' ' * indent}{k.ljust(width)} : {'-' if v is None else v}" for k, v in pairs]


# ---------------------------------------------------------------- formatters


def format_crypto_map(snap: Snapshot) -> str:
    """``show crypto map``: one block per map, with its ACL rules."""
    out: list[str] = []
    for m in snap["crypto_maps"]:
        out.append(f"Map Name : {m['name']}")
        out += _fields(
            [
                ("Map Type", m["type"]),
                ("Status", m["status"].capitalize()),
                ("Peer", m["peer"]),
                ("Local Address", m["local_address"]),
                ("Local ID", m["local_id"]),
                ("Remote ID", m["remote_id"]),
                ("Role", m["role"]),
                ("Mode", m["mode"]),
                ("Source IP", m["src_ip"]),
                ("TUN Interface", m["tun"]),
                ("IKE Transform Sets", ", ".join(m["ike_transform_sets"])),
                ("IPsec Transform Sets", ", ".join(m["ipsec_transform_sets"])),
                ("Match Address", m["match_address"]),
            ]
        )
        out += [f"      {rule}" for rule in m["acl_rules"]]
        if m.get("last_error"):
            out += _fields([("Last Error", m["last_error"])])
        out += _failover_lines(m)
        out.append("")
    out.append(f"Total crypto maps: {len(snap['crypto_maps'])}")
    return "\n".join(out)


def _failover_lines(m: CryptoMapState) -> list[str]:
    """Hold-down and, for a map with several peers, one row per peer (issue #20)."""
    pairs: list[tuple[str, object]] = []
    left = m.get("hold_down_left")
    if left is not None:
        why = m.get("hold_down_reason") or "every peer held down"
        pairs.append(("Hold-down", f"{left:.1f} s left ({why})"))
    peers = m.get("peers") or []
    shown = len(peers) > 1 or any(p.get("hold_down_left") is not None for p in peers)
    if shown:
        pairs += [("Preempt", "yes" if m.get("preempt", True) else "no"),
                  ("On Unreachable", m.get("on_unreachable", "icmp"))]  # fmt: skip
    # aligned with the map's other fields ("IPsec Transform Sets" is the widest)
    out = [f"  {k.ljust(20)} : {v}" for k, v in pairs]
    if shown:
        rows = []
        for i, p in enumerate(peers, 1):
            held = p.get("hold_down_left")
            detail = f"retry in {held:.1f} s: {p['reason']}" if held is not None else ""
            rows.append((i, p["address"], p["state"], "*" if p["active"] else "",
                         p["failures"], detail))  # fmt: skip
        table_text = table(("#", "Peer", "State", "Active", "Failures", "Hold-down"), rows)
        out.append(f"  {'Peers'.ljust(20)} :")
        out += ["      " + line for line in table_text.splitlines()]
    return out


def format_ike_sas(snap: Snapshot, *, summary: bool = False) -> str:
    """``show crypto ikev2-ikesa security-associations [summary]``."""
    now, sas = snap["time"], snap["ike_sas"]
    established = sum(1 for sa in sas if sa["state"] == "ESTABLISHED")
    total = f"Total IKEv2 SAs: {len(sas)}  Established: {established}"
    if summary:
        rows = [
            (sa["crypto_map"], sa["local"], sa["remote"], sa["state"], sa["role"],
             sa["child_sas"], _age(now, sa["established_at"]))
            for sa in sas
        ]  # fmt: skip
        headers = ("Crypto Map", "Local", "Remote", "State", "Role", "Child SAs", "Age")
        return table(headers, rows) + "\n\n" + total
    out: list[str] = []
    for sa in sas:
        algs = [sa["encryption"], f"prf-{sa['prf']}"]
        if sa["integrity"]:
            algs.append(f"hmac-{sa['integrity']}")
        algs.append(f"group {sa['dh_group']}")
        out.append(f"Crypto Map : {sa['crypto_map']}")
        out += _fields(
            [
                ("Local / Remote", f"{sa['local']} / {sa['remote']}"),
                ("Local ID / Remote ID", f"{sa['local_id']} / {sa['remote_id']}"),
                ("SPI (initiator)", sa["spi_i"]),
                ("SPI (responder)", sa["spi_r"]),
                ("Role", sa["role"]),
                ("State", sa["state"]),
                ("Algorithms", ", ".join(algs)),
                ("NAT-T", "yes (UDP 4500)" if sa["nat_t"] else "no"),
                ("Age", _age(now, sa["established_at"])),
                ("Rekey in", _left(now, sa["expires_at"])),
                ("Child SAs", sa["child_sas"]),
                ("Messages in / out", f"{sa.get('messages_in', 0)} / {sa.get('messages_out', 0)}"),
                ("Retransmissions", sa.get("retransmissions", 0)),
            ]
        )
        out.append("")
    out.append(total)
    return "\n".join(out)


def format_child_sas(snap: Snapshot, *, summary: bool = False) -> str:
    """``show crypto ipsec security-associations [summary]``."""
    now, sas = snap["time"], snap["child_sas"]
    total = f"Total IPsec SAs: {len(sas)}"
    if summary:
        rows = [
            (sa["crypto_map"], sa["mode"], sa["state"], sa["spi_in"], sa["spi_out"],
             f"{sa['packets_in']}/{sa['packets_out']}", _age(now, sa["established_at"]))
            for sa in sas
        ]  # fmt: skip
        headers = ("Crypto Map", "Mode", "State", "SPI In", "SPI Out", "Pkts In/Out", "Age")
        return table(headers, rows) + "\n\n" + total
    out: list[str] = []
    for sa in sas:
        out.append(f"Crypto Map : {sa['crypto_map']}")
        out += _fields(
            [
                ("IKE SA (SPI i)", sa["ike_spi_i"]),
                ("Mode", sa["mode"] + (" (UDP-encapsulated)" if sa["encap"] else "")),
                ("State", sa["state"]),
                ("Local TS", ", ".join(sa["local_ts"])),
                ("Remote TS", ", ".join(sa["remote_ts"])),
                ("Inbound SPI", sa["spi_in"]),
                ("Outbound SPI", sa["spi_out"]),
                ("Cipher", sa["encryption"] + (", ESN" if sa["esn"] else "")),
                ("PFS", f"group {sa['pfs_group']}" if sa["pfs_group"] else "none"),
                ("Replay window", sa["replay_window"]),
                ("Bytes in / out", f"{sa['bytes_in']} / {sa['bytes_out']}"),
                ("Packets in / out", f"{sa['packets_in']} / {sa['packets_out']}"),
                ("Age", _age(now, sa["established_at"])),
                ("Rekey in", _left(now, sa["expires_at"])),
            ]
        )
        out.append("")
    out.append(total)
    return "\n".join(out)


def format_statistics(snap: Snapshot) -> str:
    """``show crypto statistics``: every counter group, sorted by name."""
    out = [f"Uptime: {_duration(snap['uptime'])}", ""]
    stats = snap["statistics"]
    titles = (
        ("ike", "IKEv2"), ("esp", "ESP"), ("classifier", "Classifier (NPUSIM)"), ("tun", "TUN"),
    )  # fmt: skip
    for key, title in titles:
        counters: dict[str, int] = stats[key]  # type: ignore[literal-required]
        out.append(f"{title} statistics:")
        if counters:
            out += _fields([(k, v) for k, v in sorted(counters.items())])
        else:
            out.append("  (none)")
        out.append("")
    return "\n".join(out).rstrip("\n")


# ---------------------------------------------------------------- dispatch

_VIEWS: dict[str, tuple[str, Callable[[Snapshot], str]]] = {
    "crypto map": ("crypto_maps", format_crypto_map),
    "crypto ikev2-ikesa security-associations": ("ike_sas", format_ike_sas),
    "crypto ikev2-ikesa security-associations summary": (
        "ike_sas",
        lambda s: format_ike_sas(s, summary=True),
    ),
    "crypto ipsec security-associations": ("child_sas", format_child_sas),
    "crypto ipsec security-associations summary": (
        "child_sas",
        lambda s: format_child_sas(s, summary=True),
    ),
    "crypto statistics": ("statistics", format_statistics),
}

SHOW_COMMANDS = tuple(_VIEWS)


def render(command: str, snap: Snapshot, *, as_json: bool = False) -> str:
    """Render ``show <command>`` (e.g. ``"crypto map"``); ``as_json``: that part of the snapshot."""
    try:
        key, fmt = _VIEWS[" ".join(command.split())]
    except KeyError:
        raise ValueError(f"unknown show command {command!r} (known: {', '.join(_VIEWS)})") from None
    if as_json:
        part: Any = snap[key]  # type: ignore[literal-required]
        return json.dumps(part, indent=2, sort_keys=True)
    return fmt(snap)


# ---------------------------------------------------------------- daemon and CLI glue


def crypto_map_states(
    cfg: Config,
    status: Mapping[str, str] | None = None,
    errors: Mapping[str, str] | None = None,
    failover: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[CryptoMapState]:
    """The ``crypto_maps`` part of a snapshot, from the config (``status``: map -> up/down/...)."""
    status = status or {}
    tun_of = {m: tun.name for tun in cfg.tuns for m in tun.crypto_maps}
    out: list[CryptoMapState] = []
    for name, cm in cfg.crypto_maps.items():
        acl = cfg.access_lists.get(cm.match_address)
        out.append(
            {
                "name": name,
                "type": f"ikev2-ipv{cm.peer.version}",
                "peer": str(cm.peer),
                "local_address": str(cm.local_address),
                "match_address": cm.match_address,
                "acl_rules": list(acl.rules) if acl else [],
                "mode": cm.mode,
                "role": cm.role,
                "ike_transform_sets": list(cm.ike_transform_sets),
                "ipsec_transform_sets": list(cm.ipsec_transform_sets),
                "tun": tun_of.get(name),
                "src_ip": str(cm.src_ip) if cm.src_ip is not None else None,
                "status": status.get(name, "down"),
                "last_error": (errors or {}).get(name, ""),
                "local_id": str(cm.local_id),
                "remote_id": str(cm.remote_id),
            }
        )
        if failover and name in failover:
            out[-1].update(failover[name])  # type: ignore[typeddict-item]
    return out


def empty_snapshot(cfg: Config, *, now: float, hostname: str, uptime: float) -> Snapshot:
    """A snapshot with the configured maps and no SAs (the daemon fills in the rest)."""
    return {
        "time": now,
        "hostname": hostname,
        "uptime": uptime,
        "crypto_maps": crypto_map_states(cfg),
        "ike_sas": [],
        "child_sas": [],
        "statistics": {"ike": {}, "esp": {}, "classifier": {}, "tun": {}},
    }


def show(
    socket_path: Path | str, command: str, *, as_json: bool = False, timeout: float = 5.0
) -> str:
    """``ipsecmgr show <command> [--json]``: ask the daemon for its snapshot and render it.

    Raises :class:`ipsecmgr.control.ControlError` if the daemon is unreachable or
    answers with an error, ``ValueError`` for an unknown show command.
    """
    if " ".join(command.split()) not in _VIEWS:
        raise ValueError(f"unknown show command {command!r} (known: {', '.join(_VIEWS)})")
    response = request(socket_path, {"command": "snapshot"}, timeout=timeout)
    if not response.get("ok"):
        raise ControlError(f"daemon: {response.get('error', 'no error given')}")
    snap: Snapshot = response["result"]
    return render(command, snap, as_json=as_json)
