"""The manager's rows for ``show`` and for ``trace --wireshark-keys``.

Read-only views of the manager's maps and the engine's IKE SAs, in the shapes
:mod:`ipsecmgr.show` renders (``ike_sas``, ``child_sas``, map status and errors).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ike
from ike.state import State
from ipsecmgr import show
from ipsecmgr.records import ChildState, MapStatus
from ipsecmgr.translate import ts_text

if TYPE_CHECKING:
    from ipsecmgr.manager import Manager

# The engine's IKE SA states as ``show crypto ikev2-ikesa`` names them
_IKE_STATE = {
    State.NEW: "CONNECTING",
    State.INIT_SENT: "CONNECTING",
    State.INIT_DONE: "CONNECTING",
    State.ESTABLISHED: "ESTABLISHED",
    State.DELETING: "DELETING",
    State.DEAD: "DELETING",
}
# Every map status as ``show`` prints it (and metrics label it)
MAP_STATUS_SHOWN: dict[MapStatus, str] = {
    MapStatus.IDLE: "down",
    MapStatus.CONNECTING: "connecting",
    MapStatus.ESTABLISHED: "up",
    MapStatus.FAILED: "failed",
    MapStatus.DEAD: "dead",
}


def _encr_name(encr: int, bits: int) -> str:
    return f"AES-GCM-16-{bits}" if encr == ike.EncrId.AES_GCM_16 else f"AES-CBC-{bits}"


def export_keys(mgr: Manager) -> dict[str, list[dict[str, str]]]:
    """Every live SA's keys, for Wireshark (``trace --wireshark-keys`` only).

    ESP rows carry the outer addresses of each direction; IKE rows are
    :meth:`ike.IkeSA.export_keys`. Never used for show output or logs."""
    esp_rows: list[dict[str, str]] = []
    for state in mgr.maps.values():
        sa = state.ike_sa
        local = sa.local_addr[0] if sa else str(state.cmap.local_address)
        peer = sa.peer_addr[0] if sa else str(state.cmap.peer)
        for rec in state.children:
            for spi, key, src, dst in (
                (rec.inbound.spi, rec.inbound_key, peer, local),
                (rec.outbound.spi, rec.outbound_key, local, peer),
            ):
                row = {"spi": f"{spi:08x}", "key": key.hex(), "src": src, "dst": dst}
                esp_rows.append(row | {"crypto_map": state.cmap.name})
    ike_rows = []
    for ike_sa in mgr.endpoint.sas:
        try:
            ike_rows.append(ike_sa.export_keys())
        except RuntimeError:  # no keys yet
            continue
    return {"esp": esp_rows, "ike": ike_rows}


def ike_sa_states(mgr: Manager, now: float, wall: float) -> list[show.IkeSaState]:
    """The ``ike_sas`` part of a snapshot. ``wall - now`` turns the loop's
    monotonic times into epoch seconds for display."""
    out: list[show.IkeSaState] = []
    for sa in mgr.endpoint.sas:
        state = mgr.maps.get(sa.name.rsplit("-", 1)[0])
        suite = sa.suite
        established = state.established_at if state and state.ike_sa is sa else None
        out.append(
            {
                "crypto_map": state.cmap.name if state else "?",
                "local": f"{sa.local_addr[0]}:{sa.local_addr[1]}",
                "remote": f"{sa.peer_addr[0]}:{sa.peer_addr[1]}",
                "spi_i": sa.spi_i.hex(),
                "spi_r": sa.spi_r.hex(),
                "role": sa.role,
                "state": _IKE_STATE.get(sa.state, sa.state.upper()),
                "encryption": _encr_name(suite.encr, suite.key_bits) if suite else "-",
                "prf": ike.PrfId(suite.prf).name if suite else "-",
                "integrity": ike.IntegId(suite.integ).name if suite and suite.integ else None,
                "dh_group": int(suite.dh) if suite else 0,
                "nat_t": sa.nat_t,
                "established_at": established + (wall - now) if established else None,
                "expires_at": None,
                "child_sas": len(sa.children),
                "local_id": str(sa.config.local_id),
                "remote_id": str(sa.config.remote_id),
                "retransmissions": sa.counters.get("retransmitted", 0),
            }
        )
    return out


def child_sa_states(mgr: Manager, now: float, wall: float) -> list[show.ChildSaState]:
    out: list[show.ChildSaState] = []
    for name, state in mgr.maps.items():
        ike_sa = state.ike_sa
        for rec in state.children:
            ts = mgr.config.ipsec_transform_sets[state.cmap.ipsec_transform_sets[0]]
            binding = mgr.datapath.binding(name)
            out.append(
                {
                    "crypto_map": name,
                    "ike_spi_i": ike_sa.spi_i.hex() if ike_sa else "",
                    "mode": rec.mode,
                    "state": str(
                        ChildState.INSTALLED
                        if binding and binding.sa is rec.outbound
                        else ChildState.REKEYED
                    ),
                    "spi_in": f"{rec.inbound.spi:08x}",
                    "spi_out": f"{rec.outbound.spi:08x}",
                    "local_ts": ts_text(rec.local_ts),
                    "remote_ts": ts_text(rec.remote_ts),
                    "encryption": f"AES-GCM-16-{rec.key_bits}",
                    "esn": rec.esn,
                    "encap": bool(binding and binding.peer[1] != 0),
                    "pfs_group": ts.pfs_group,
                    "bytes_in": rec.inbound.counters.bytes,
                    "bytes_out": rec.outbound.counters.bytes,
                    "packets_in": rec.inbound.counters.packets,
                    "packets_out": rec.outbound.counters.packets,
                    "replay_window": rec.inbound.window.size,
                    "established_at": rec.installed_at + (wall - now),
                    "expires_at": None,
                }
            )
    return out


def map_errors(mgr: Manager) -> dict[str, str]:
    return {name: s.last_error for name, s in mgr.maps.items() if s.last_error}


def map_status(mgr: Manager, now: float | None = None) -> dict[str, str]:
    out = {name: MAP_STATUS_SHOWN[s.status] for name, s in mgr.maps.items()}
    if now is not None:
        out.update(mgr.failover.status(now))
    return out
