"""An in-memory network of :class:`Manager` gateways with a fake clock (no kernel).

IKE datagrams and ESP packets are queued by destination address and delivered at
once by :meth:`Net.flush`; nothing reads a clock: :meth:`Net.run_until` fires every
timer due in time order. A gateway named in ``net.down`` neither sends nor hears.
Used by test_manager_timers.py, test_invalid_spi_recovery.py and test_failover.py.

Two choices, where the copies this module replaced differed, are options of
:class:`Net`; each test file keeps what it had:

- ``tun``: each gateway's TUN is one end of a datagram socketpair, so a test reads
  the exact bytes the kernel would get (on in test_failover.py, which reads them).
  Off (test_manager_timers.py, test_invalid_spi_recovery.py), decrypted packets
  have nowhere to go: they count as ``tun_write_errors``, not ``esp_in_packets``.
  Nothing reads a TUN there, and an unread socketpair blocks the writer once its
  send buffer is full.
- ``esp_out_hook``: the daemon's wiring of ``Datapath.on_esp_out`` to
  ``Manager.on_esp_out`` (the first ESP after a quiet spell, ipsecmgr.invalid_spi):
  on in test_manager_timers.py and test_invalid_spi_recovery.py (whose silence
  probes need it), off in test_failover.py.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import npusim
from ike.constants import ExchangeType
from ipsecmgr import config as cfg
from ipsecmgr import show
from ipsecmgr.daemon import parse_acls, validate_acl
from ipsecmgr.datapath import Datapath
from ipsecmgr.manager import Manager
from ipsecmgr.records import Address

IKE_SA_INIT = ExchangeType.IKE_SA_INIT
CREATE_CHILD_SA = ExchangeType.CREATE_CHILD_SA


@dataclass
class Sent:
    """One IKE message a gateway put on the wire."""

    time: float
    side: str
    dst: str
    exchange: int
    response: bool
    size: int


class FakeSock:
    """Stands in for the raw ESP sockets of both families: ``sendto`` queues on the net."""

    def __init__(self, net: Net, side: Side) -> None:
        self.net, self.side = net, side

    def sendto(self, data: bytes, addr: Address) -> int:
        self.net.queue.append(("esp", self.side.name, addr[0], data))
        return len(data)


class Side:
    """One gateway without the kernel: config, classifier, data path, manager."""

    def __init__(self, net: Net, name: str, data: dict[str, Any], address: str) -> None:
        diag = cfg.parse_config(data, base_dir=net.tmp, validate_acl=validate_acl)
        assert diag.config is not None, diag.errors
        self.config = diag.config
        acls = parse_acls(self.config)
        self.classifier = npusim.Classifier(
            [
                npusim.CryptoMap(n, acls[m.match_address], (str(m.peer),))
                for n, m in self.config.crypto_maps.items()
            ]
        )
        self.saflow = npusim.SaFlowTable()
        self.name, self.net, self.address = name, net, address
        sock = FakeSock(net, self)
        esp_socks: dict[int, Any] = {socket.AF_INET: sock, socket.AF_INET6: sock}
        options: dict[str, Any] = {}
        if net.esp_out_hook:
            options["on_esp_out"] = self._esp_out
        self.datapath = Datapath(
            self.classifier, self.saflow, esp_socks, {}, self._no_sa, **options
        )
        if net.tun:
            self.tun, self.tun_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.tun_peer.setblocking(False)
            self.datapath.add_tun(self.tun.fileno(), ["tacacs"], None, False)
        # The engine's rekey jitter, fixed: its source is part of the engine config
        self.manager = Manager(self.config, acls, self.datapath, self._send, jitter=lambda: 0.5)

    @property
    def state(self) -> Any:
        return self.manager.maps["tacacs"]

    def counter(self, name: str) -> int:
        return int(self.state.counters.get(name, 0))

    def _no_sa(self, name: str, packet: bytes) -> None:
        self.manager.on_no_sa(name, packet, self.net.now)

    def _esp_out(self, name: str, packet: bytes) -> None:
        self.manager.on_esp_out(name, packet, self.net.now)

    def _send(self, data: bytes, peer: Address, local: Address | None) -> None:
        self.net.ike(self.name, peer[0], data)

    def send(self, packet: bytes, *, flush: bool = True) -> None:
        """``packet`` read from the TUN (the protected side); then, unless ``flush`` is
        False (a burst that nothing may answer in between), the net delivers."""
        self.datapath.handle_outbound(packet, self.classifier.classify(packet))
        if flush:
            self.net.flush()

    def tun_packets(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.tun_peer.recv(65535))
            except BlockingIOError:
                return out

    def ike_sas(self) -> list[Any]:
        return [sa for sa in self.manager.endpoint.sas if sa.established]

    def show(self) -> str:
        now = self.net.now
        snap = show.empty_snapshot(self.config, now=now, hostname="t", uptime=0)
        snap["crypto_maps"] = show.crypto_map_states(
            self.config,
            self.manager.map_status(now),
            self.manager.map_errors(),
            self.manager.failover.rows(now),
        )
        snap["time"] = now
        return show.format_crypto_map(snap)


@dataclass
class Net:
    """Zero-latency network and fake clock (see the module docstring for the options)."""

    tmp: Path
    tun: bool = True
    esp_out_hook: bool = False
    now: float = 0.0
    sides: dict[str, Side] = field(default_factory=dict)
    # Which side answers on an address that several sides have (a standby taking over)
    owner: dict[str, str] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    hold: set[str] = field(default_factory=set)  # IKE from these waits in ``held``
    held: list[tuple[str, str, str, bytes]] = field(default_factory=list)
    queue: list[tuple[str, str, str, bytes]] = field(default_factory=list)  # kind, sender, dst
    log: list[Sent] = field(default_factory=list)

    def psk(self, content: bytes = b"lab-psk-0123456789") -> Path:
        path = self.tmp / f"psk-{len(list(self.tmp.iterdir()))}"
        path.write_bytes(content)
        path.chmod(0o600)
        return path

    def add(self, name: str, data: dict[str, Any], address: str) -> Side:
        side = self.sides[name] = Side(self, name, data, address)
        self.owner.setdefault(address, name)
        return side

    def takeover(self, name: str) -> None:
        """``name`` answers on its address from now on."""
        self.owner[self.sides[name].address] = name

    def by_address(self, addr: str) -> Side | None:
        name = self.owner.get(addr)
        return None if name is None else self.sides[name]

    def ike(self, sender: str, dst: str, data: bytes) -> None:
        if sender in self.down:
            return
        self.log.append(Sent(self.now, sender, dst, data[18], bool(data[19] & 0x20), len(data)))
        (self.held if sender in self.hold else self.queue).append(("ike", sender, dst, data))

    def release(self) -> None:
        self.hold.clear()
        self.queue += self.held
        self.held.clear()
        self.flush()

    def flush(self) -> None:
        while self.queue:
            kind, sender, dst, data = self.queue.pop(0)
            side = self.by_address(dst)
            if side is None or side.name in self.down or sender in self.down:
                continue
            src = self.sides[sender].address
            if kind == "ike":
                side.manager.on_ike_datagram(data, (dst, 500), (src, 500), self.now)
            else:
                fam = socket.AF_INET6 if ":" in src else socket.AF_INET
                side.datapath.handle_inbound(data, socket.inet_pton(fam, src), b"", fam)

    def call(self, fn: Callable[[], object]) -> None:
        """``fn`` (something a gateway is told from outside), then the net delivers."""
        fn()
        self.flush()

    def run_until(self, t: float) -> None:
        """Fire every timer due up to ``t`` in time order, then set the clock to ``t``."""
        while True:
            live = [s for n, s in self.sides.items() if n not in self.down]
            due = [(d, s) for s in live if (d := s.manager.next_deadline()) is not None]
            if not due or min(d for d, _ in due) > t:
                break
            when = min(d for d, _ in due)
            self.now = max(self.now, when)
            for d, s in due:
                if d <= when:
                    s.manager.on_timer(self.now)
            self.flush()
        self.now = t

    def sent(self, side: str, exchange: int, response: bool = False) -> list[float]:
        """When ``side`` sent an ``exchange`` request (or response)."""
        return [
            s.time
            for s in self.log
            if s.side == side and s.exchange == exchange and s.response == response
        ]

    def inits(self, side: str, to: str | None = None, child: bool = False) -> list[float]:
        """When ``side`` sent IKE_SA_INIT requests (``child``: or CREATE_CHILD_SA)."""
        kinds = (IKE_SA_INIT, CREATE_CHILD_SA) if child else (IKE_SA_INIT,)
        return [
            s.time
            for s in self.log
            if s.side == side
            and s.exchange in kinds
            and not s.response
            and (to is None or s.dst == to)
        ]
