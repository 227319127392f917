"""A sequence diagram of one traced flow, as hand-written SVG.

Lanes as in the reference's figures: application, TUN, IpsecMgr, NPUSIM,
network, peer. One arrow per event (a loop on the IpsecMgr lane for what
happens inside it), labelled ``[step] text`` with the time since the flow's
first packet. Plain SVG 1.1: any browser shows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from xml.sax.saxutils import escape

from ipsecmgr.trace import Event
from ipsecmgr.trace.render import describe

LANES = ("application", "TUN", "IpsecMgr", "NPUSIM", "network", "peer")
LANE_W = 190
LEFT = 40
TOP = 70
ROW_H = 34
FONT = "font-family='DejaVu Sans, Arial, sans-serif'"

# (event) -> (from lane, to lane); same lane = a loop (something inside IpsecMgr)
_ARROWS: dict[str, tuple[str, str]] = {
    "app_syn": ("application", "TUN"),
    "app_syn_retransmit": ("application", "TUN"),
    "app_ack": ("application", "TUN"),
    "tun_read": ("TUN", "IpsecMgr"),
    "acl_match": ("NPUSIM", "IpsecMgr"),
    "bypass": ("NPUSIM", "network"),
    "classify_drop": ("IpsecMgr", "NPUSIM"),
    "ike_sent": ("IpsecMgr", "peer"),
    "ike_received": ("peer", "IpsecMgr"),
    "esp_sent": ("IpsecMgr", "peer"),
    "esp_received": ("peer", "IpsecMgr"),
    "saflow_match": ("IpsecMgr", "NPUSIM"),
    "decrypted": ("NPUSIM", "IpsecMgr"),
    "policy_drop": ("NPUSIM", "IpsecMgr"),
    "tun_write": ("IpsecMgr", "TUN"),
}
_COLOURS = {"ike": "#8a4baf", "drop": "#c0392b", "esp": "#1f6fb2", "clear": "#2d862d"}


def _lane_x(name: str) -> int:
    return LEFT + LANE_W // 2 + LANES.index(name) * LANE_W


def _colour(e: Event) -> str:
    ev = str(e.get("event", ""))
    if "drop" in ev:
        return _COLOURS["drop"]
    if ev.startswith(("ike", "child")):
        return _COLOURS["ike"]
    if ev.startswith("esp") or ev in ("saflow_match", "decrypted"):
        return _COLOURS["esp"]
    return _COLOURS["clear"]


def arrow_lanes(e: Event) -> tuple[str, str]:
    ev = str(e.get("event", ""))
    if ev == "esp_drop":
        return ("IpsecMgr", "NPUSIM") if e.get("step") == "9" else ("NPUSIM", "IpsecMgr")
    return _ARROWS.get(ev, ("IpsecMgr", "IpsecMgr"))


def render_svg(events: Sequence[Event], title: str) -> str:
    """The diagram of ``events`` (one flow, time order, inferred steps included)."""
    evs = [e for e in events if e.get("event") != "lost"]
    # Wide enough for the longest label (~6.3 px per character at 11 px DejaVu Sans)
    longest = max((len(describe(e)) + 6 for e in evs), default=0)
    width = max(LEFT * 2 + LANE_W * len(LANES), _lane_x("IpsecMgr") + 50 + int(longest * 6.3))
    height = TOP + ROW_H * (len(evs) + 1) + 20
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' version='1.1' width='{width}' "
        f"height='{height}' viewBox='0 0 {width} {height}'>",
        "<defs>",
    ]
    for name, colour in _COLOURS.items():
        out.append(
            f"<marker id='head-{name}' markerWidth='10' markerHeight='8' refX='9' refY='4' "
            f"orient='auto'><path d='M0,0 L10,4 L0,8 z' fill='{colour}'/></marker>"
        )
    out += [
        "</defs>",
        f"<rect width='{width}' height='{height}' fill='white'/>",
        f"<text x='{LEFT}' y='24' {FONT} font-size='15' font-weight='bold'>{escape(title)}</text>",
    ]
    bottom = height - 10
    for lane in LANES:
        x = _lane_x(lane)
        out.append(
            f"<g class='lane' data-lane='{lane}'>"
            f"<rect x='{x - 60}' y='{TOP - 32}' width='120' height='24' rx='4' "
            f"fill='#eef2f7' stroke='#556'/>"
            f"<text x='{x}' y='{TOP - 15}' text-anchor='middle' {FONT} font-size='13'>"
            f"{lane}</text>"
            f"<line x1='{x}' y1='{TOP - 8}' x2='{x}' y2='{bottom}' stroke='#99a' "
            f"stroke-dasharray='4,4'/></g>"
        )
    t0 = float(evs[0].get("t", 0.0)) if evs else 0.0
    for i, e in enumerate(evs):
        y = TOP + ROW_H * (i + 1)
        src, dst = arrow_lanes(e)
        x1, x2 = _lane_x(src), _lane_x(dst)
        colour = _colour(e)
        head = next(k for k, v in _COLOURS.items() if v == colour)
        step = escape(str(e.get("step", "-")))
        dash = " stroke-dasharray='6,3'" if e.get("inferred") else ""
        label = escape(f"[{e.get('step', '-')}] {describe(e)}")
        when = f"+{float(e.get('t', t0)) - t0:.6f}s"
        out.append(f"<g class='arrow' data-step='{step}' data-event='{escape(str(e['event']))}'>")
        if x1 == x2:
            out.append(
                f"<path d='M{x1},{y - 8} h40 v14 h-36' fill='none' stroke='{colour}' "
                f"stroke-width='1.6' marker-end='url(#head-{head})'{dash}/>"
            )
            tx, anchor = x1 + 46, "start"
        else:
            out.append(
                f"<line x1='{x1}' y1='{y}' x2='{x2}' y2='{y}' stroke='{colour}' "
                f"stroke-width='1.6' marker-end='url(#head-{head})'{dash}/>"
            )
            tx, anchor = (min(x1, x2) + 6, "start")
        out.append(
            f"<text x='{tx}' y='{y - 5}' text-anchor='{anchor}' {FONT} font-size='11' "
            f"fill='#222'>{label}</text>"
        )
        out.append(
            f"<text x='{LEFT - 34}' y='{y + 4}' {FONT} font-size='9' fill='#667'>{when}</text>"
        )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"
