"""Prometheus metrics: ``[metrics] listen = "127.0.0.1:9754"`` (off unless configured).

Nothing is counted here. At each scrape :class:`GatewayCollector` takes the
daemon's snapshot, the one ``show crypto ... --json`` prints (in split mode that
includes asking the workers for their counters, as ``show`` does), and turns it
into metric families. The data path therefore pays nothing for the metrics, and
the figures are those of ``show crypto statistics --json``. Only the two
histograms are observed as things happen, through ``Manager.observe``: the IKE
handshake latency (our IKE_SA_INIT out → IKE SA established, initiator only) and
the first-packet wait in queue mode (first packet queued → Child SA installed).

The endpoint is served from the daemon's asyncio loop, not from a thread: the
collector reads the manager's dicts, which only the loop changes, so a scrape
always sees a consistent state. It answers ``GET /metrics`` (HTTP/1.0 style,
one request per connection); the text is prometheus-client's own exposition.

Label cardinality is bounded by the configuration: ``map`` (crypto map names),
``direction``, ``reason`` (a fixed set), ``state``. SPI labels appear only on the
per-SA families, which disappear with their SA; counters that outlive SAs
(``ipsecmgr_esp_packets_total`` ...) have none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ipsecmgr import show
from ipsecmgr.config import ConfigError
from ipsecmgr.config import Metrics as MetricsConfig
from ipsecmgr.records import ChildState

if TYPE_CHECKING:
    from ipsecmgr.daemon import Gateway
    from ipsecmgr.tls.service import TlsService

log = logging.getLogger("ipsecmgr")

#: Every value ``ipsecmgr_crypto_map_state`` reports (one-hot), as ``show crypto map`` names them.
MAP_STATES = ("up", "down", "connecting", "failed", "dead", "hold-down")
#: IKE SA states as ``show crypto ikev2-ikesa`` names them.
IKE_STATES = ("CONNECTING", "ESTABLISHED", "REKEYING", "DELETING")

# Gateway-wide data-path drops (statistics "esp" group) -> (direction, reason).
# Reasons the ESP engine names (esp.DROP_REASONS) arrive as in_<reason>/out_<reason>
# and keep their name; these are the data path's own.
_ESP_DROPS: dict[str, tuple[str, str]] = {
    "esp_unknown_spi": ("in", "no_sa"),
    "in_unknown_spi": ("in", "no_sa"),
    "in_replayed": ("in", "replay"),
    "in_icv_failed": ("in", "icv"),
    "policy_drops": ("in", "policy"),
    "esp_truncated": ("in", "truncated"),
    "classify_drops": ("out", "classify"),
    "esp_send_errors": ("out", "send_error"),
    "esp_recv_errors": ("in", "recv_error"),
    "tun_write_errors": ("in", "tun_write_error"),
}

# Histogram buckets, seconds: a LAN handshake takes ms, a lost IKE_SA_INIT costs
# a retransmission (2 s by default, doubled each time).
HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _per_map(ike: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """statistics["ike"] "map/counter" entries, grouped by map."""
    out: dict[str, dict[str, int]] = {}
    for key, value in ike.items():
        name, sep, counter = key.partition("/")
        if sep and "/" not in counter:
            out.setdefault(name, {})[counter] = value
    return out


def families(snap: show.Snapshot) -> Iterator[Metric]:
    """The metric families of one snapshot (pure: the same snapshot, the same text)."""
    stats = snap["statistics"]
    maps = [m["name"] for m in snap["crypto_maps"]]
    per_map = _per_map(stats["ike"])
    yield from _map_state(snap)
    yield from _esp_per_map(snap, maps, per_map)
    yield from _esp_drops(stats)
    yield from _map_events(maps, per_map)
    yield from _ike_sas(snap, maps)
    yield from _child_sas(snap, maps)
    uptime = GaugeMetricFamily("ipsecmgr_uptime_seconds", "Seconds since the daemon started")
    uptime.add_metric([], snap["uptime"])
    yield uptime


def _map_state(snap: show.Snapshot) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        "ipsecmgr_crypto_map_state",
        "Crypto map state as show crypto map reports it (1 for the current state)",
        labels=["map", "state"],
    )
    for m in snap["crypto_maps"]:
        for st in MAP_STATES:
            up.add_metric([m["name"], st], 1.0 if m["status"] == st else 0.0)
    yield up


def _esp_per_map(
    snap: show.Snapshot, maps: list[str], per_map: dict[str, dict[str, int]]
) -> Iterator[Metric]:
    # ESP per crypto map: the live Child SAs plus those already removed.
    packets = CounterMetricFamily(
        "ipsecmgr_esp_packets",
        "ESP packets per crypto map that passed the SA (in: decrypted, out: encrypted)",
        labels=["map", "direction"],
    )
    octets = CounterMetricFamily(
        "ipsecmgr_esp_bytes",
        "Payload bytes of those ESP packets per crypto map",
        labels=["map", "direction"],
    )
    live: dict[tuple[str, str], list[int]] = {}
    for sa in snap["child_sas"]:
        for d in ("in", "out"):
            acc = live.setdefault((sa["crypto_map"], d), [0, 0])
            acc[0] += sa["packets_in" if d == "in" else "packets_out"]
            acc[1] += sa["bytes_in" if d == "in" else "bytes_out"]
    for name in maps:
        c = per_map.get(name, {})
        for d in ("in", "out"):
            p, b = live.get((name, d), [0, 0])
            packets.add_metric([name, d], p + c.get(f"retired_packets_{d}", 0))
            octets.add_metric([name, d], b + c.get(f"retired_bytes_{d}", 0))
    yield packets
    yield octets


def _esp_drops(stats: show.Statistics) -> Iterator[Metric]:
    drops = CounterMetricFamily(
        "ipsecmgr_esp_drops",
        "Packets the data path dropped, gateway-wide, by reason (show crypto statistics, esp)",
        labels=["direction", "reason"],
    )
    summed: dict[tuple[str, str], int] = {}
    for key, value in stats["esp"].items():
        where = _ESP_DROPS.get(key)
        if where is None and key.startswith(("in_", "out_")):
            where = ("in" if key.startswith("in_") else "out", key.partition("_")[2])
        if where is not None:
            summed[where] = summed.get(where, 0) + value
    for (d, reason), value in sorted(summed.items()):
        drops.add_metric([d, reason], value)
    yield drops


def _map_events(maps: list[str], per_map: dict[str, dict[str, int]]) -> Iterator[Metric]:
    map_drops = CounterMetricFamily(
        "ipsecmgr_crypto_map_drops",
        "Packets a crypto map dropped before an SA existed, by reason "
        "(first_packet: drop mode, queue_overflow: queue mode, ...)",
        labels=["map", "reason"],
    )
    started = CounterMetricFamily(
        "ipsecmgr_ike_handshakes_started",
        "IKE handshakes this gateway initiated (no SA for a packet, or retried)",
        labels=["map"],
    )
    succeeded = CounterMetricFamily(
        "ipsecmgr_ike_handshakes_succeeded",
        "IKE SAs established (as initiator or responder)",
        labels=["map"],
    )
    failed = CounterMetricFamily(
        "ipsecmgr_ike_handshakes_failed",
        "IKE exchanges that failed, by reason (authentication_failed, timeout: no answer "
        "to our handshake, or the error notify)",
        labels=["map", "reason"],
    )
    rekeys = CounterMetricFamily(
        "ipsecmgr_rekeys", "Rekeys completed, by SA kind (ike, child)", labels=["map", "sa"]
    )
    dpd = CounterMetricFamily(
        "ipsecmgr_dpd_events",
        "Dead peer detection (RFC 7296 §2.4): liveness checks sent, peers declared dead",
        labels=["map", "event"],
    )
    for name in maps:
        c = per_map.get(name, {})
        for key, value in c.items():
            if key.endswith("_drops"):
                map_drops.add_metric([name, key.removesuffix("_drops")], value)
            elif key.startswith("exchange_failed_"):
                failed.add_metric([name, key.removeprefix("exchange_failed_")], value)
        failed.add_metric([name, "authentication_failed"], c.get("auth_failed", 0))
        failed.add_metric([name, "timeout"], c.get("handshake_timeouts", 0))
        started.add_metric([name], c.get("ike_initiated", 0))
        succeeded.add_metric([name], c.get("ike_established", 0))
        rekeys.add_metric([name, "ike"], c.get("ike_rekeyed", 0))
        rekeys.add_metric([name, "child"], c.get("child_rekeyed", 0))
        dpd.add_metric([name, "check"], c.get("liveness_checks", 0))
        dpd.add_metric([name, "peer_dead"], c.get("peer_dead", 0))
    yield from (map_drops, started, succeeded, failed, rekeys, dpd)


def _ike_sas(snap: show.Snapshot, maps: list[str]) -> Iterator[Metric]:
    # SA state and age: gauges of the live SAs (they vanish with the SA).
    now = snap["time"]
    ike_count = GaugeMetricFamily("ipsecmgr_ike_sas", "IKE SAs by state", labels=["map", "state"])
    counts: dict[tuple[str, str], int] = {(n, s): 0 for n in maps for s in IKE_STATES}
    ike_age = GaugeMetricFamily(
        "ipsecmgr_ike_sa_age_seconds",
        "Seconds since the IKE SA was established",
        labels=["map", "spi_i"],
    )
    for ike in snap["ike_sas"]:
        ikey = (ike["crypto_map"], ike["state"])
        counts[ikey] = counts.get(ikey, 0) + 1
        if ike["established_at"] is not None:
            ike_age.add_metric([ike["crypto_map"], ike["spi_i"]], now - ike["established_at"])
    for (n, s), v in sorted(counts.items()):
        ike_count.add_metric([n, s], v)
    yield ike_count
    yield ike_age


def _child_sas(snap: show.Snapshot, maps: list[str]) -> Iterator[Metric]:
    now = snap["time"]
    child_count = GaugeMetricFamily(
        "ipsecmgr_child_sas", "Child SAs by state", labels=["map", "state"]
    )
    child_age = GaugeMetricFamily(
        "ipsecmgr_child_sa_age_seconds",
        "Seconds since the Child SA was installed",
        labels=["map", "spi_in"],
    )
    sa_packets = CounterMetricFamily(
        "ipsecmgr_child_sa_packets",
        "ESP packets of one live Child SA",
        labels=["map", "spi_in", "direction"],
    )
    sa_bytes = CounterMetricFamily(
        "ipsecmgr_child_sa_bytes",
        "Payload bytes of one live Child SA",
        labels=["map", "spi_in", "direction"],
    )
    ccounts: dict[tuple[str, str], int] = {(n, str(s)): 0 for n in maps for s in ChildState}
    for sa in snap["child_sas"]:
        name, spi = sa["crypto_map"], sa["spi_in"]
        ccounts[(name, sa["state"])] = ccounts.get((name, sa["state"]), 0) + 1
        if sa["established_at"] is not None:
            child_age.add_metric([name, spi], now - sa["established_at"])
        sa_packets.add_metric([name, spi, "in"], sa["packets_in"])
        sa_packets.add_metric([name, spi, "out"], sa["packets_out"])
        sa_bytes.add_metric([name, spi, "in"], sa["bytes_in"])
        sa_bytes.add_metric([name, spi, "out"], sa["bytes_out"])
    for (n, s), v in sorted(ccounts.items()):
        child_count.add_metric([n, s], v)
    yield from (child_count, child_age, sa_packets, sa_bytes)


# [tls_map] client-side refusals (ipsecmgr.tls.proxy counters) -> reason label
_TLS_REFUSALS = {
    "refused_all_down": "all_servers_down",
    "bad_secret": "bad_secret",
    "bad_packet": "bad_packet",
}


def tls_families(snap: Mapping[str, Any]) -> Iterator[Metric]:
    """The TACACS+ over TLS families from ``show tacacs tls --json`` (pure). Labels:
    ``map`` (TLS map names) and ``server`` (its configured servers): bounded by the
    configuration, like the crypto-map families."""
    maps = snap.get("maps", ())
    yield from _tls_map_families(maps)
    yield from _tls_server_families(maps)


def _tls_map_families(maps: Iterable[Mapping[str, Any]]) -> tuple[Metric, ...]:
    """The per-map families of :func:`tls_families` (client side)."""
    conns = CounterMetricFamily(
        "ipsecmgr_tls_client_connections",
        "Legacy TACACS+ client connections a TLS map accepted",
        labels=["map"],
    )
    active = GaugeMetricFamily(
        "ipsecmgr_tls_client_connections_active", "Client connections open now", labels=["map"]
    )
    refused = CounterMetricFamily(
        "ipsecmgr_tls_client_refusals",
        "Client connections closed without an answer, by reason",
        labels=["map", "reason"],
    )
    messages = CounterMetricFamily(
        "ipsecmgr_tls_messages",
        "TACACS+ packets relayed (request: client to server, response: back)",
        labels=["map", "kind"],
    )
    failovers = CounterMetricFamily(
        "ipsecmgr_tls_failovers", "Transactions moved to the next server", labels=["map"]
    )
    for m in maps:
        name, c = m["name"], m["counters"]
        conns.add_metric([name], c.get("accepted", 0))
        active.add_metric([name], c.get("active", 0))
        for key, reason in _TLS_REFUSALS.items():
            refused.add_metric([name, reason], c.get(key, 0))
        messages.add_metric([name, "request"], c.get("requests", 0))
        messages.add_metric([name, "response"], c.get("responses", 0))
        failovers.add_metric([name], c.get("failovers", 0))
    return (conns, active, refused, messages, failovers)


def _tls_server_families(maps: Iterable[Mapping[str, Any]]) -> tuple[Metric, ...]:
    """The per-server families of :func:`tls_families` (the maps' configured servers)."""
    server_up = GaugeMetricFamily(
        "ipsecmgr_tls_server_up",
        "1 while the server is usable (not held down after a failure)",
        labels=["map", "server"],
    )
    server_conns = CounterMetricFamily(
        "ipsecmgr_tls_server_connections", "TLS connections to the server", labels=["map", "server"]
    )
    handshakes = CounterMetricFamily(
        "ipsecmgr_tls_handshakes",
        "TLS 1.3 handshakes with the server (full, or resumed from a ticket)",
        labels=["map", "server", "kind"],
    )
    failures = CounterMetricFamily(
        "ipsecmgr_tls_server_failures",
        "Connect, handshake or response failures of the server",
        labels=["map", "server"],
    )
    for m in maps:
        for srv in m["servers"]:
            labels = [m["name"], srv["server"]]
            server_up.add_metric(labels, 0.0 if srv["state"] == "held-down" else 1.0)
            server_conns.add_metric(labels, srv["connections"])
            handshakes.add_metric([*labels, "full"], srv["handshakes"])
            handshakes.add_metric([*labels, "resumed"], srv["resumed"])
            failures.add_metric(labels, srv["failures"])
    return (server_up, server_conns, handshakes, failures)


class TlsCollector(Collector):
    """Reads the TLS service's snapshot at scrape time (same source as
    ``show tacacs tls``)."""

    def __init__(self, tls: TlsService) -> None:
        self.tls = tls

    def collect(self) -> Iterable[Metric]:
        return list(tls_families(self.tls.snapshot()))


class GatewayCollector(Collector):
    """Reads the gateway's snapshot at scrape time (same source as ``show``)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def collect(self) -> Iterable[Metric]:
        return list(families(self.gw.snapshot()))


class Exporter:
    """The registry: the collector and the two histograms the manager observes."""

    def __init__(self, gw: Gateway, tls: TlsService | None = None) -> None:
        self.gw = gw
        self._observed: set[str] = set()  # crypto maps with histogram series
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(gw))
        if tls is not None:
            self.registry.register(TlsCollector(tls))
        self.histograms = {
            "ike_handshake": Histogram(
                "ipsecmgr_ike_handshake_seconds",
                "From our IKE_SA_INIT request to the IKE SA established (initiator)",
                ["map"],
                registry=self.registry,
                buckets=HANDSHAKE_BUCKETS,
            ),
            "first_packet_wait": Histogram(
                "ipsecmgr_first_packet_wait_seconds",
                "Queue mode: from the first packet queued to the Child SA installed",
                ["map"],
                registry=self.registry,
                buckets=HANDSHAKE_BUCKETS,
            ),
        }
        gw.manager.set_observer(self.observe)

    def observe(self, what: str, crypto_map: str, seconds: float) -> None:
        h = self.histograms.get(what)
        if h is not None:
            h.labels(crypto_map).observe(max(seconds, 0.0))
            self._observed.add(crypto_map)

    def render(self) -> bytes:
        # A crypto map removed by a reload takes its histogram series with it.
        for name in self._observed - self.gw.manager.map_names():
            for h in self.histograms.values():
                with contextlib.suppress(KeyError):
                    h.remove(name)
            self._observed.discard(name)
        return generate_latest(self.registry)


MAX_REQUEST = 8192  # request line and headers; a scrape sends a few hundred bytes
REQUEST_TIMEOUT = 5.0


class MetricsServer:
    """``GET /metrics`` over HTTP on the daemon's loop."""

    def __init__(self, exporter: Exporter, server: asyncio.AbstractServer) -> None:
        self.exporter = exporter
        self.server = server

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def serve(gw: Gateway, conf: MetricsConfig, tls: TlsService | None = None) -> MetricsServer:
    exporter = Exporter(gw, tls)

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            if method not in (b"GET", b"HEAD"):
                status, ctype, body = b"405 Method Not Allowed", b"text/plain", b"GET only\n"
            elif path == b"/metrics":
                status, ctype = b"200 OK", CONTENT_TYPE_LATEST.encode()
                body = exporter.render()
            else:
                status, ctype, body = b"404 Not Found", b"text/plain", b"see /metrics\n"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
                + b"\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n" + (body if method != b"HEAD" else b"")
            )  # fmt: skip
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # a client that sends nothing useful gets nothing
        except ConnectionError:
            pass
        except Exception:  # a failing scrape must not take the daemon down
            log.exception("metrics request failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    try:
        server = await asyncio.start_server(client, conf.host, conf.port, limit=MAX_REQUEST)
    except OSError as exc:  # e.g. the port is taken: the daemon does not start
        where = _hostport(conf.host, conf.port)
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError([f"metrics.listen: cannot listen on {where}: {why}"]) from None
    log.info("metrics on http://%s/metrics", _hostport(conf.host, conf.port))
    return MetricsServer(exporter, server)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
