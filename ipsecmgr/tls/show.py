"""``ipsecmgr show tacacs tls``: the TLS maps' upstream servers and counters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ipsecmgr.control import ControlError, request

COMMAND = "tacacs tls"


def format_tls(snap: dict[str, Any]) -> str:
    lines: list[str] = []
    if not snap.get("maps"):
        return "no TLS maps configured"
    for m in snap["maps"]:
        c = m["counters"]
        lines.append(f"TLS map {m['name']}")
        lines.append(
            f"  connections accepted {c['accepted']}, active {c['active']}, "
            f"refused (all servers down) {c['refused_all_down']}, bad secret {c['bad_secret']}, "
            f"bad packet {c['bad_packet']}, failovers {c['failovers']}"
        )
        lines.append(f"  requests {c['requests']}, responses {c['responses']}")
        headers = ("Prio", "Server", "Identity", "State", "Conns", "Active", "Full",
                   "Resumed", "Failures", "Last error")  # fmt: skip
        rows = []
        for s in m["servers"]:
            state = s["state"]
            if state == "held-down":
                state = f"held-down ({s['hold_down_left']:.0f}s)"
            rows.append((s["priority"], s["server"], s["identity"], state, s["connections"],
                         s["active"], s["handshakes"], s["resumed"], s["failures"],
                         s["last_error"] or "-"))  # fmt: skip
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
        for row in (headers, *rows):
            lines.append(
                "  "
                + "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip()
            )
    if snap.get("listening"):
        lines.append("Listening: " + ", ".join(snap["listening"]))
    return "\n".join(lines)


def show_tls(socket_path: Path | str, *, as_json: bool = False, timeout: float = 5.0) -> str:
    response = request(socket_path, {"command": "tls"}, timeout=timeout)
    if not response.get("ok"):
        raise ControlError(f"daemon: {response.get('error', 'no error given')}")
    snap: dict[str, Any] = response["result"]
    return json.dumps(snap, indent=2, sort_keys=True) if as_json else format_tls(snap)
