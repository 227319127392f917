"""The tracer on a data path with fake sockets and real ESP SAs (no root, no kernel).

The client gateway of the lab in miniature: crypto map ``tacacs`` protects
192.0.2.1 -> 203.0.113.49; the peer is 198.51.100.2, we are 198.51.100.1.
The TUN is a pair of pipes.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP

import esp
import npusim
from ipsecmgr.datapath import Datapath
from ipsecmgr.packets import OutboundBinding
from ipsecmgr.trace import Event, Peer, Subscription, Tracer
from ipsecmgr.workers import OUTBOUND, Worker, _recv

CLIENT, SERVER = "192.0.2.1", "203.0.113.49"
LOCAL, PEER = "198.51.100.1", "198.51.100.2"
SPI_OUT, SPI_IN = 0x0000C0DE, 0x0000BEEF
KEY_OUT = bytes(range(36))  # AES-256 key ‖ 4-byte salt (RFC 4106 §8.1)
KEY_IN = bytes(range(100, 136))
SPORT = 40001


class FakeSock:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> int:
        self.sent.append((bytes(data), addr))
        return len(data)


def syn(seq: int = 1000, flags: str = "S", payload: bytes = b"") -> bytes:
    return bytes(IP(src=CLIENT, dst=SERVER) / TCP(sport=SPORT, dport=49, flags=flags, seq=seq)
                 / payload)  # fmt: skip


def reply(flags: str = "SA", seq: int = 5000, ack: int = 1001) -> bytes:
    return bytes(
        IP(src=SERVER, dst=CLIENT) / TCP(sport=49, dport=SPORT, flags=flags, seq=seq, ack=ack)
    )


class Rig:
    def __init__(self, tfilter: dict[str, str] | None = None, rate: float | None = None) -> None:
        acl = npusim.parse_acl("tacacs", [f"permit ip host {CLIENT} host {SERVER}"])
        self.classifier = npusim.Classifier([npusim.CryptoMap("tacacs", acl, (PEER,))])
        self.saflow = npusim.SaFlowTable()
        self.esp_sock, self.bypass_sock = FakeSock(), FakeSock()
        self.no_sa: list[bytes] = []
        self.dp = Datapath(
            self.classifier,
            self.saflow,
            {socket.AF_INET: self.esp_sock},  # type: ignore[dict-item]
            {socket.AF_INET: self.bypass_sock},  # type: ignore[dict-item]
            lambda name, pkt: self.no_sa.append(pkt),
        )
        self.tun_r, self.tun_in = os.pipe()  # what the kernel writes into the TUN
        os.set_blocking(self.tun_r, False)
        self.tun_out_r, tun_w = os.pipe()  # what we write to the TUN (step 12)
        self.dp.tun_for_map["tacacs"] = tun_w
        self._fds = [self.tun_r, self.tun_in, self.tun_out_r, tun_w]
        self.tracer = Tracer([self.dp], {PEER: Peer(LOCAL, "tacacs")})
        self.sub: Subscription = self.tracer.subscribe({"filter": tfilter or {}, "rate": rate})
        # The peer's side of our SAs: it encrypts what we receive.
        self.peer_out = esp.OutboundSA(SPI_IN, KEY_IN)
        self.out_sa = esp.OutboundSA(SPI_OUT, KEY_OUT)
        self.in_sa = esp.InboundSA(SPI_IN, KEY_IN)

    def install(self) -> None:
        self.dp.outbound["tacacs"] = OutboundBinding(
            self.out_sa,
            self.esp_sock,
            (PEER, 0),
            "tunnel",  # type: ignore[arg-type]
        )
        v4 = npusim.TrafficSelector
        server = int.from_bytes(socket.inet_aton(SERVER), "big")
        client = int.from_bytes(socket.inet_aton(CLIENT), "big")
        self.saflow.add(
            SPI_IN, self.in_sa, [v4(4, 0, server, server)], [v4(4, 0, client, client)], "tacacs"
        )

    def from_tun(self, packet: bytes) -> None:
        os.write(self.tun_in, packet)
        self.dp.on_tun_readable(self.tun_r)

    def from_peer(self, esp_packet: bytes) -> None:
        self.dp.handle_inbound(
            esp_packet, socket.inet_aton(PEER), socket.inet_aton(LOCAL), socket.AF_INET
        )

    def encrypt_reply(self, packet: bytes) -> bytes:
        return self.peer_out.encapsulate(packet, 4)

    def events(self) -> list[Event]:
        out = []
        while True:
            try:
                item = self.sub.queue.get_nowait()
            except asyncio.QueueEmpty:
                return out
            if item is not None:
                out.append(item)

    def cold_start(self) -> list[Event]:
        """The reference's flow: SYN (no SA), SA up, retransmitted SYN, SYN-ACK, ACK."""
        self.from_tun(syn())
        self.install()
        self.from_tun(syn())
        self.from_peer(self.encrypt_reply(reply()))
        self.from_tun(syn(1001, "A"))
        return self.events()

    def close(self) -> None:
        self.sub.close()
        for fd in self._fds:
            os.close(fd)


# -- the tracer on the data path ----------------------------------------------------------


def _steps(events: list[Event]) -> list[str]:
    return [e["step"] for e in events]


def test_cold_start_events_follow_one_flow_end_to_end() -> None:
    rig = Rig()
    try:
        evs = rig.cold_start()
    finally:
        rig.close()
    # 2, 3a (no SA: the manager's on_no_sa does 4/5), then 2, 3a, 7; 8, 9, 10, 12; 2, 3a, 7
    assert _steps(evs) == ["2", "3a", "2", "3a", "7", "8", "9", "10", "12", "2", "3a", "7"]
    assert len(rig.no_sa) == 1
    # The SYN-ACK (other direction) and the ESP before decryption join the SYN's flow.
    assert len({e["flow"] for e in evs}) == 1
    acl = evs[1]
    assert acl["event"] == "acl_match" and acl["rule"] == "ACL tacacs line 1"
    assert acl["crypto_map"] == "tacacs"
    sent = evs[4]
    assert (sent["spi"], sent["seq"], sent["peer"], sent["local"]) == (SPI_OUT, 1, PEER, LOCAL)
    # the ESP bytes in the event are the ones that went to the socket
    assert bytes.fromhex(sent["wire"]) == rig.esp_sock.sent[0][0]
    received, match, decrypted = evs[5], evs[6], evs[7]
    assert received["outer_src"] == PEER and received["crypto_map"] == "tacacs"
    assert int(received["wire"][:8], 16) == SPI_IN
    assert (match["event"], match["spi"]) == ("saflow_match", SPI_IN)
    assert decrypted["tcp_flags"] == "SA" and decrypted["five_tuple"].startswith("tcp 203.0.113.49")
    assert all(e["t"] <= f["t"] for e, f in itertools.pairwise(evs))


def test_a_split_worker_reports_the_same_events_as_the_single_data_path() -> None:
    """[gateway] datapath = "split": the worker's data path sends each step over its
    socketpair; replayed into the control process's Tracer (as SplitDatapath does),
    they are the single data path's events, stamped with the worker's clock."""
    single = Rig()
    try:
        want = single.cold_start()
    finally:
        single.close()
    rig = Rig()  # its Datapath is the template the daemon forks the workers from
    rig.tracer.unsubscribe(rig.sub)
    ctrl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ctrl.setblocking(False)
    worker = Worker(rig.dp, OUTBOUND, theirs)  # both directions: the same code per packet
    v4 = npusim.TrafficSelector
    server, client = (int.from_bytes(socket.inet_aton(a), "big") for a in (SERVER, CLIENT))
    tracer = Tracer([], {PEER: Peer(LOCAL, "tacacs")})
    sub = tracer.subscribe({})
    worker.handle(("trace", True))
    try:
        os.write(rig.tun_in, syn())
        worker.dp.on_tun_readable(rig.tun_r)
        worker.handle(("out_add", SPI_OUT, KEY_OUT, "tunnel", False))
        worker.handle(("bind", "tacacs", SPI_OUT, (PEER, 500), False))
        worker.handle(("in_add", "tacacs", SPI_IN, KEY_IN, "tunnel", False,
                       [v4(4, 0, server, server)], [v4(4, 0, client, client)]))  # fmt: skip
        for packet in (syn(), syn(1001, "A")):
            os.write(rig.tun_in, packet)
            worker.dp.on_tun_readable(rig.tun_r)
            if packet[33] == 0x02:  # after the SYN: the peer's SYN-ACK
                worker.dp.handle_inbound(
                    rig.encrypt_reply(reply()),
                    socket.inet_aton(PEER),
                    socket.inet_aton(LOCAL),
                    socket.AF_INET,
                )
        kinds = []
        while (msg := _recv(ctrl)) is not None:
            kinds.append(msg[0])
            if msg[0] == "trace":
                _, at, step, event, packet, fields = msg
                tracer(step, event, packet, at=at, source=OUTBOUND, **fields)
        got = []
        while not sub.queue.empty():
            item = sub.queue.get_nowait()
            assert item is not None
            got.append(item)
    finally:
        ctrl.close()
        theirs.close()
        rig.close()
    assert kinds.count("no_sa") == 1  # steps 4-5 went to the control process

    # The same events with the same fields (the ESP bytes differ: another IV)
    def same(e: Event) -> Event:
        return {k: v for k, v in e.items() if k not in ("t", "wall", "wire")}

    assert [same(e) for e in got] == [same(e) for e in want]
    assert all(e["t"] <= f["t"] for e, f in itertools.pairwise(got))


def test_bypass_is_step_3b_and_sent_in_clear() -> None:
    rig = Rig()
    try:
        clear = bytes(IP(src=LOCAL, dst="198.51.100.3") / TCP(sport=40002, dport=49, flags="S"))
        rig.from_tun(clear)
        evs = rig.events()
    finally:
        rig.close()
    assert [(e["step"], e["event"]) for e in evs] == [("2", "tun_read"), ("3b", "bypass")]
    assert rig.bypass_sock.sent == [(clear, ("198.51.100.3", 0))]


def test_bad_icv_shows_step_10_drop_with_the_spi() -> None:
    rig = Rig()
    try:
        rig.install()
        good = bytearray(rig.encrypt_reply(reply()))
        good[-1] ^= 0x01  # one bit of the ICV (RFC 4303 §3.4.4: checked before decryption)
        rig.from_peer(bytes(good))
        evs = rig.events()
    finally:
        rig.close()
    assert [(e["step"], e["event"]) for e in evs] == [
        ("8", "esp_received"),
        ("9", "saflow_match"),
        ("10", "esp_drop"),
    ]
    drop = evs[-1]
    assert drop["reason"] == "icv_failed" and drop["spi"] == SPI_IN
    assert {e["flow"] for e in evs} == {f"spi:{SPI_IN:08x}"}
    assert rig.dp.counters["in_icv_failed"] == 1
    assert "tun_write" not in [e["event"] for e in evs]


def test_unknown_spi_is_a_step_9_drop() -> None:
    rig = Rig()
    try:
        rig.from_peer(esp.OutboundSA(0x1234, KEY_IN).encapsulate(reply(), 4))
        evs = rig.events()
    finally:
        rig.close()
    assert [(e["step"], e["event"], e.get("reason")) for e in evs] == [
        ("8", "esp_received", None),
        ("9", "esp_drop", "unknown SPI"),
    ]
    assert evs[0]["flow"] == evs[1]["flow"] == "spi:00001234"


def test_tracer_is_installed_only_while_subscribed() -> None:
    rig = Rig()
    assert rig.dp.trace is rig.tracer
    second = rig.tracer.subscribe({})
    rig.sub.close()
    assert rig.dp.trace is rig.tracer  # one subscriber left
    second.close()
    assert rig.dp.trace is None
    rig.from_tun(syn())  # tracing off: nothing queued anywhere
    assert rig.sub.queue.empty() and second.queue.empty()
    for fd in rig._fds:
        os.close(fd)


def test_filter_by_spi_keeps_the_flow_once_it_matched() -> None:
    rig = Rig({"spi": f"{SPI_OUT:#x}"})
    try:
        evs = rig.cold_start()
    finally:
        rig.close()
    # Before step 7 nothing carries the SPI; from the first ESP on the flow is followed.
    assert _steps(evs) == ["7", "8", "9", "10", "12", "2", "3a", "7"]


def test_filter_by_port_and_crypto_map() -> None:
    rig = Rig({"dport": "50"})
    try:
        assert rig.cold_start() == []
    finally:
        rig.close()
    rig = Rig({"crypto_map": "tacacs", "proto": "tcp", "host": SERVER})
    try:
        assert len(rig.cold_start()) == 12
    finally:
        rig.close()


def test_filter_syntax_errors_name_the_problem() -> None:
    from ipsecmgr.trace import TraceFilter

    assert TraceFilter.parse(["crypto-map=tacacs,port=49"]).terms == {
        "crypto_map": "tacacs",
        "port": "49",
    }
    for bad in (["colour=red"], ["spi=zz"], ["host=not-an-ip"], ["port"]):
        with pytest.raises(ValueError):
            TraceFilter.parse(bad)


def test_rate_limit_counts_what_it_drops() -> None:
    rig = Rig(rate=2.0)
    try:
        for i in range(10):
            rig.from_tun(syn(2000 + i))
        evs = rig.events()
    finally:
        rig.close()
    assert len(evs) == 2  # the burst; the rest within the same instant are counted
    assert rig.sub.lost == 18


def test_tracing_off_costs_no_events_and_changes_nothing() -> None:
    rig = Rig()
    rig.sub.close()
    try:
        rig.install()
        rig.from_tun(syn())
        assert rig.esp_sock.sent and rig.dp.counters["esp_out_packets"] == 1
    finally:
        for fd in rig._fds:
            os.close(fd)


# -- the streaming control command ---------------------------------------------------------


def test_control_streams_events_and_unsubscribes_when_the_client_leaves(tmp_path: Path) -> None:
    from ipsecmgr.control import ControlServer
    from ipsecmgr.trace.io import TraceClient

    rig = Rig()
    rig.sub.close()
    sock = tmp_path / "ctl" / "s.sock"
    got: list[Event] = []

    async def main() -> None:
        server = ControlServer(sock, {"trace": rig.tracer.subscribe})
        await server.start()
        loop = asyncio.get_running_loop()
        client = await loop.run_in_executor(None, TraceClient, sock, {"port": "49"})
        assert rig.dp.trace is rig.tracer  # subscribed before the answer came back
        rig.from_tun(syn())

        def read_one() -> None:
            for e in client:
                got.append(e)
                break
            client.close()

        await loop.run_in_executor(None, read_one)
        deadline = loop.time() + 5
        while rig.tracer.subscribers and loop.time() < deadline:
            await asyncio.sleep(0.01)  # the server notices the client's EOF
        assert not rig.tracer.subscribers and rig.dp.trace is None
        await server.close()

    try:
        asyncio.run(main())
    finally:
        for fd in rig._fds:
            os.close(fd)
    assert got and got[0]["step"] == "2" and got[0]["dport"] == 49


def test_daemon_shutdown_ends_every_stream() -> None:
    rig = Rig()
    try:
        rig.from_tun(syn())
        rig.tracer.close_all()
        assert rig.dp.trace is None and not rig.tracer.subscribers

        async def drain() -> list[Event]:
            return [e async for e in rig.sub]  # ends at the close_all sentinel

        assert _steps(asyncio.run(drain())) == ["2", "3a"]
    finally:
        for fd in rig._fds:
            os.close(fd)


def test_no_daemon_or_a_bad_filter_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ipsecmgr.cli import main
    from ipsecmgr.control import ControlError, ControlServer
    from ipsecmgr.trace.io import TraceClient

    assert main(["trace", "--socket", str(tmp_path / "none.sock"), "--count", "1"]) == 1
    assert "is the daemon running?" in capsys.readouterr().err
    rig = Rig()
    rig.sub.close()
    sock = tmp_path / "ctl" / "s.sock"

    async def main_() -> str:
        server = ControlServer(sock, {"trace": rig.tracer.subscribe})
        await server.start()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, TraceClient, sock, {"spi": "zz"})
        except ControlError as exc:
            return str(exc)
        finally:
            await server.close()
        return ""

    try:
        error = asyncio.run(main_())
    finally:
        for fd in rig._fds:
            os.close(fd)
    assert "trace refused" in error and "zz" in error
    assert rig.dp.trace is None  # nothing stayed subscribed


def test_ike_leaves_the_triggering_flow_when_the_attempt_ends() -> None:
    rig = Rig()
    try:
        tr = rig.tracer
        tr("4", "ike_triggered", syn(), crypto_map="tacacs", peer=(PEER, 0))
        tr("ike", "ike_sent", None, crypto_map="tacacs", exchange="IKE_SA_INIT")
        tr("ike", "ike_auth_failed", None, crypto_map="tacacs", reason="AUTH mismatch")
        tr("ike", "ike_sent", None, crypto_map="tacacs", exchange="INFORMATIONAL")
        evs = rig.events()
    finally:
        rig.close()
    flow = evs[0]["flow"]
    assert [(e["step"], e["flow"]) for e in evs] == [
        ("4", flow),
        ("4", flow),
        ("4", flow),  # the failure is the end of this flow's step 4
        ("ike", "ike:tacacs"),
    ]
    assert "packet" not in evs[0]  # only where the packet enters or leaves the clear side


def test_a_packet_that_is_not_ip_is_traced_as_unparsed() -> None:
    rig = Rig()
    try:
        rig.from_tun(b"\x00\x01\x02")
        evs = rig.events()
    finally:
        rig.close()
    assert [(e["step"], e["event"], e["flow"]) for e in evs] == [
        ("2", "tun_read", "unparsed"),
        ("3", "classify_drop", "unparsed"),
    ]
    assert evs[0]["packet"] == "000102" and evs[1]["reason"] == "not_ip"
