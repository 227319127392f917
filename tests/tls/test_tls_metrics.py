"""TACACS+ over TLS in the Prometheus metrics (issue #18 item 4: "the same counters go
to the metrics"): the real relay on loopback, a dead first server and a live second,
the exposition rendered by prometheus-client and read back with its own parser."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ipsecmgr.metrics import TlsCollector
from tests.tls.rig import Pki, Rig, tls_map
from tests.tls.test_tls_proxy import closed_port, login


class _Snapshots:
    """What TlsCollector reads: ``snapshot()`` as the TLS service answers it."""

    def __init__(self, rig: Rig, proxy: object) -> None:
        self.rig, self.proxy = rig, proxy

    def snapshot(self) -> dict[str, object]:
        view = self.rig.lt.call(lambda: self.proxy.view(0.0))  # type: ignore[attr-defined]
        return {"maps": [view]}


def test_tls_counters_scraped_agree_with_show(rig: Rig, pki: Pki) -> None:
    _srv, port = rig.tls_server(pki)
    dead = closed_port()
    proxy = rig.start_proxy(tls_map(pki, [("127.0.0.1", dead), ("127.0.0.1", port)]))
    for _ in range(3):
        assert login(rig)["status"] == "PASS"
    source = _Snapshots(rig, proxy)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TlsCollector(source))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    view = source.snapshot()["maps"][0]  # type: ignore[index]
    name = view["name"]
    first, second = (s["server"] for s in view["servers"])

    def value(metric: str, **labels: str) -> float:
        return samples[(metric, tuple(sorted({"map": name, **labels}.items())))]

    assert value("ipsecmgr_tls_client_connections_total") == 3 == view["counters"]["accepted"]
    assert value("ipsecmgr_tls_messages_total", kind="request") == 3
    assert value("ipsecmgr_tls_messages_total", kind="response") == 3
    assert value("ipsecmgr_tls_client_refusals_total", reason="all_servers_down") == 0
    assert value("ipsecmgr_tls_failovers_total") == view["counters"]["failovers"]
    # The dead first server: one failure, then held down (skipped by the next logins).
    assert value("ipsecmgr_tls_server_failures_total", server=first) == 1
    assert value("ipsecmgr_tls_server_up", server=first) == 0
    assert value("ipsecmgr_tls_server_up", server=second) == 1
    assert value("ipsecmgr_tls_server_connections_total", server=second) == 3
    # One full handshake, then resumed from the ticket (RFC 8446 §2.2).
    assert value("ipsecmgr_tls_handshakes_total", server=second, kind="full") == 1
    assert value("ipsecmgr_tls_handshakes_total", server=second, kind="resumed") == 2
