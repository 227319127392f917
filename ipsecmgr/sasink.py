"""The one interface between the Manager and a data path (``SaSink``).

Two data paths implement it: :class:`ipsecmgr.datapath.Datapath` (``[gateway]
datapath = "single"``: the daemon's own loop moves the packets) and
:class:`ipsecmgr.split_worker.SplitDatapath` (``"split"``: two forked workers
move them, the control process forwards every call over a socketpair). The daemon
builds one of them and gives it to the Manager at construction; the Manager
never touches sockets, the SA-flow table or a binding's fields itself.

What the Manager asks of it:

- SA pairs: :meth:`SaSink.install` puts both halves of a new Child SA in the
  data path (the inbound one into the SA-flow table, step 9; the outbound one
  ready to be bound). :meth:`SaSink.remove` forgets them; a rekey (RFC 7296
  §2.8, make-before-break) is install new, :meth:`SaSink.bind` to it, remove
  old (its inbound half possibly later: it lingers for late packets).
- The flow-to-SA binding (step 7): which outbound SA, socket and peer carry a
  crypto map's packets. :meth:`SaSink.bind` again with the same SA moves it to
  a new peer address (NAT rebinding, RFC 7296 §2.23).
- Counters: :attr:`SaSink.counters`, fresh after :meth:`SaSink.refresh_counters`
  (the split data path pulls them from its workers; they also land in the SA
  objects given to :meth:`SaSink.install`).
- "Only outgoing traffic" (RFC 7296 §2.4, ipsecmgr.invalid_spi):
  :meth:`SaSink.watch_outbound` reports the next ESP a map sends, and
  :meth:`SaSink.refresh_inbound` brings its inbound counts up to date first.
- The trace hook: :meth:`SaSink.set_trace` (``ipsecmgr trace``; ``None`` off).

What a data path reports back goes through callbacks given to it at
construction (:class:`ipsecmgr.datapath.Datapath`'s ``on_no_sa``,
``on_udp_other``, ``on_esp_from``, ``on_unknown_spi``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import esp
import npusim
from ipsecmgr.counters import Counters

if TYPE_CHECKING:
    from ipsecmgr.packets import OutboundBinding

Address = tuple[str, int]
#: ``hook(step, event, packet, **fields)`` (ipsecmgr.trace.Tracer); None: tracing off.
TraceHook = Callable[..., None]


@dataclass(frozen=True)
class SaPair:
    """Both halves of one Child SA, as the Manager built them.

    The keys travel with the SA objects only for a data path that builds its own
    copies in another process (the split workers); nothing logs them."""

    crypto_map: str
    inbound: esp.InboundSA
    outbound: esp.OutboundSA
    inbound_key: bytes
    outbound_key: bytes
    # The inbound policy (RFC 4301 §5.2): decrypted packets' sources and destinations
    remote_ts: Sequence[npusim.TrafficSelector]
    local_ts: Sequence[npusim.TrafficSelector]


def esp_peer(peer: Address, nat_t: bool) -> Address:
    """Where ESP to ``peer`` goes: its UDP 4500 address with NAT traversal (RFC 3948),
    else the bare address (port 0: a raw protocol-50 socket)."""
    return (peer[0], peer[1]) if nat_t else (peer[0], 0)


class SaSink(Protocol):
    """What the Manager needs of a data path (see the module docstring)."""

    @property
    def counters(self) -> Counters: ...

    def install(self, pair: SaPair) -> None:
        """Both halves of a new Child SA; inbound ESP for it is accepted from now on."""

    def remove(self, inbound_spi: int | None, outbound_spi: int | None) -> None:
        """Forget the SAs with these SPIs (None: that half stays, e.g. a lingering
        inbound SA that goes later)."""

    def bind(self, name: str, sa: esp.OutboundSA, peer: Address, nat_t: bool) -> None:
        """Crypto map ``name``'s packets go out on ``sa`` to ``peer`` (installed first)."""

    def unbind(self, name: str) -> None:
        """Crypto map ``name`` has no SA to send with (its packets go to ``on_no_sa``)."""

    def watch_outbound(self, name: str) -> None:
        """Report the next ESP sent for crypto map ``name`` (the ``on_esp_out`` callback)."""

    def refresh_inbound(self, name: str, spis: list[int]) -> bool:
        """Bring the packet counts of these inbound SAs (of crypto map ``name``) up to
        date. True: they are (decide now); False: they will be when the split data
        path's ``on_inbound_counted(name)`` callback runs."""

    def binding(self, name: str) -> OutboundBinding | None:
        """Crypto map ``name``'s current binding (read only: change it with bind)."""

    def send(self, name: str, packet: bytes) -> None:
        """Step 7 for a packet the Manager held (first_packet = "queue")."""

    def send_keepalive(self, peer: Address) -> None:
        """One NAT keepalive (RFC 3948 §2.3) to ``peer``'s UDP 4500; OSError if it failed."""

    def write_tun(self, name: str, packet: bytes) -> bool:
        """A packet we made (ipsecmgr.reject) into crypto map ``name``'s TUN."""

    def set_classifier(self, classifier: npusim.Classifier) -> None:
        """A new NPUSIM classifier (SIGHUP)."""

    def set_trace(self, hook: TraceHook | None) -> None:
        """Every packet step goes to ``hook`` (None: off, one branch per stage)."""

    def refresh_counters(self) -> None:
        """Bring :attr:`counters` and the installed SAs' counters up to date."""
