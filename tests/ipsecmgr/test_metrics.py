"""[metrics] configuration and the snapshot -> Prometheus families mapping
(known answers, read back with prometheus-client's own text parser)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ipsecmgr import show
from ipsecmgr.config import ConfigError, Metrics, check_config, load_config
from ipsecmgr.metrics import families

CONFIG = """
[access_list.foo]
rules = ["permit tcp host 192.0.2.1 host 203.0.113.49 eq 49"]

[crypto_map.foo]
peer = "198.51.100.2"
match_address = "foo"
local_psk = {{ file = "{psk}" }}
src_ip = "192.0.2.1"

[[tun]]
name = "tun-foo"
addresses = ["192.0.2.1/32"]
crypto_maps = ["foo"]
routes = ["203.0.113.49/32"]

[gateway]
local_addresses = ["198.51.100.1"]
{metrics}
"""


def _write(tmp_path: Path, metrics: str) -> Path:
    psk = tmp_path / "psk"
    psk.write_bytes(b"correct horse battery staple")
    psk.chmod(0o600)
    conf = tmp_path / "gw.toml"
    conf.write_text(CONFIG.format(psk=psk, metrics=metrics))
    return conf


def test_metrics_are_off_unless_configured(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")).metrics is None


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:9754", "127.0.0.1", 9754),
        ("[::1]:9100", "::1", 9100),
        ("127.0.0.2:1", "127.0.0.2", 1),
    ],
)
def test_loopback_listen_addresses(tmp_path: Path, listen: str, host: str, port: int) -> None:
    conf = load_config(_write(tmp_path, f'[metrics]\nlisten = "{listen}"\n'))
    assert conf.metrics == Metrics(host, port, False)


def test_a_non_loopback_address_needs_allow_remote(tmp_path: Path) -> None:
    text = '[metrics]\nlisten = "192.0.2.1:9754"\n'
    assert check_config(_write(tmp_path, text)) == [
        "metrics.listen: 192.0.2.1 is not a loopback address; set allow_remote = true "
        "to serve metrics beyond this host"
    ]
    conf = load_config(_write(tmp_path, text + "allow_remote = true\n"))
    assert conf.metrics == Metrics("192.0.2.1", 9754, True)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ('listen = "localhost:9754"', "metrics.listen: 'localhost:9754' is not ADDRESS:PORT"),
        ('listen = "127.0.0.1"', "metrics.listen: '127.0.0.1' is not ADDRESS:PORT"),
        ('listen = "127.0.0.1:0"', "metrics.listen: '127.0.0.1:0' is not ADDRESS:PORT"),
        ('listen = "::1:9754"', "metrics.listen: '::1:9754' is not ADDRESS:PORT"),
        ("listen = 9754", "metrics.listen: must be a string HOST:PORT"),
        ("allow_remote = true", "metrics.listen: missing (required)"),
        ('listen = "127.0.0.1:9754"\nallow_remote = "yes"', "metrics.allow_remote: expected"),
        ('listen = "127.0.0.1:9754"\nport = 1', "metrics.port: unknown key"),
    ],
)
def test_bad_metrics_sections_are_reported(tmp_path: Path, body: str, error: str) -> None:
    errors = check_config(_write(tmp_path, f"[metrics]\n{body}\n"))
    assert len(errors) == 1 and errors[0].startswith(error), errors
    with pytest.raises(ConfigError):
        load_config(_write(tmp_path, f"[metrics]\n{body}\n"))


# ---------------------------------------------------------------- families


def _child(spi_in: str, pin: int, bin_: int, pout: int, bout: int) -> dict[str, Any]:
    return {
        "crypto_map": "tacacs", "ike_spi_i": "00" * 8, "mode": "tunnel", "state": "INSTALLED",
        "spi_in": spi_in, "spi_out": "c0ffee00", "local_ts": [], "remote_ts": [],
        "encryption": "AES-GCM-16-256", "esn": False, "encap": False, "pfs_group": None,
        "bytes_in": bin_, "bytes_out": bout, "packets_in": pin, "packets_out": pout,
        "replay_window": 64, "established_at": 1000.0, "expires_at": None,
    }  # fmt: skip


def _map(name: str, status: str) -> dict[str, Any]:
    return {"name": name, "status": status}


SNAP: dict[str, Any] = {
    "time": 1030.0,
    "hostname": "gw",
    "uptime": 42.5,
    "crypto_maps": [_map("tacacs", "up"), _map("backup", "failed")],
    "ike_sas": [
        {"crypto_map": "tacacs", "spi_i": "11" * 8, "state": "ESTABLISHED", "established_at": 990.0}
    ],
    "child_sas": [_child("aaaa0001", 10, 1000, 12, 1500)],
    "statistics": {
        "ike": {
            "unknown_spi": 3,  # endpoint-wide: not a map counter
            "tacacs/ike_initiated": 2,
            "tacacs/ike_established": 1,
            "tacacs/retired_packets_in": 5,
            "tacacs/retired_bytes_in": 500,
            "tacacs/retired_packets_out": 6,
            "tacacs/retired_bytes_out": 600,
            "tacacs/first_packet_drops": 1,
            "tacacs/liveness_checks": 4,
            "tacacs/child_rekeyed": 1,
            "backup/auth_failed": 2,
            "backup/handshake_timeouts": 5,
            "backup/exchange_failed": 3,
            "backup/exchange_failed_no_proposal_chosen": 3,
            "backup/queue_overflow_drops": 7,
        },
        "esp": {
            "esp_in_packets": 15,
            "esp_out_packets": 18,
            "esp_unknown_spi": 2,
            "in_replayed": 3,
            "in_icv_failed": 1,
            "policy_drops": 4,
            "in_bad_padding": 1,
        },
        "classifier": {},
        "tun": {},
    },
}


class _Fixed(Collector):
    def __init__(self, snap: dict[str, Any]) -> None:
        self.snap = snap

    def collect(self) -> Iterable[Any]:
        snap: show.Snapshot = self.snap  # type: ignore[assignment]
        return list(families(snap))


def _scrape(snap: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Fixed(snap))
    text = generate_latest(reg).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _v(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_families_known_answers() -> None:
    s = _scrape(SNAP)
    # per map: live SA + retired SAs
    assert _v(s, "ipsecmgr_esp_packets_total", map="tacacs", direction="in") == 15
    assert _v(s, "ipsecmgr_esp_packets_total", map="tacacs", direction="out") == 18
    assert _v(s, "ipsecmgr_esp_bytes_total", map="tacacs", direction="in") == 1500
    assert _v(s, "ipsecmgr_esp_bytes_total", map="tacacs", direction="out") == 2100
    assert _v(s, "ipsecmgr_esp_packets_total", map="backup", direction="out") == 0
    assert _v(s, "ipsecmgr_esp_drops_total", direction="in", reason="no_sa") == 2
    assert _v(s, "ipsecmgr_esp_drops_total", direction="in", reason="replay") == 3
    assert _v(s, "ipsecmgr_esp_drops_total", direction="in", reason="icv") == 1
    assert _v(s, "ipsecmgr_esp_drops_total", direction="in", reason="policy") == 4
    assert _v(s, "ipsecmgr_esp_drops_total", direction="in", reason="bad_padding") == 1
    assert _v(s, "ipsecmgr_crypto_map_drops_total", map="tacacs", reason="first_packet") == 1
    assert _v(s, "ipsecmgr_crypto_map_drops_total", map="backup", reason="queue_overflow") == 7
    assert _v(s, "ipsecmgr_ike_handshakes_started_total", map="tacacs") == 2
    assert _v(s, "ipsecmgr_ike_handshakes_succeeded_total", map="tacacs") == 1
    assert (
        _v(s, "ipsecmgr_ike_handshakes_failed_total", map="backup", reason="no_proposal_chosen")
        == 3
    )
    assert (
        _v(s, "ipsecmgr_ike_handshakes_failed_total", map="backup", reason="authentication_failed")
        == 2
    )
    assert _v(s, "ipsecmgr_ike_handshakes_failed_total", map="backup", reason="timeout") == 5
    assert _v(s, "ipsecmgr_ike_handshakes_failed_total", map="tacacs", reason="timeout") == 0
    assert _v(s, "ipsecmgr_rekeys_total", map="tacacs", sa="child") == 1
    assert _v(s, "ipsecmgr_dpd_events_total", map="tacacs", event="check") == 4
    assert _v(s, "ipsecmgr_crypto_map_state", map="tacacs", state="up") == 1
    assert _v(s, "ipsecmgr_crypto_map_state", map="tacacs", state="down") == 0
    assert _v(s, "ipsecmgr_crypto_map_state", map="backup", state="failed") == 1
    assert _v(s, "ipsecmgr_ike_sas", map="tacacs", state="ESTABLISHED") == 1
    assert _v(s, "ipsecmgr_ike_sas", map="backup", state="ESTABLISHED") == 0
    assert _v(s, "ipsecmgr_ike_sa_age_seconds", map="tacacs", spi_i="11" * 8) == 40
    assert _v(s, "ipsecmgr_child_sa_age_seconds", map="tacacs", spi_in="aaaa0001") == 30
    assert _v(s, "ipsecmgr_child_sa_packets_total", map="tacacs", spi_in="aaaa0001",
              direction="out") == 12  # fmt: skip
    assert _v(s, "ipsecmgr_uptime_seconds") == 42.5


def test_no_spi_labels_on_counters_that_outlive_sas() -> None:
    """Cardinality: SPIs only on the per-SA families (gone with the SA)."""
    s = _scrape(SNAP)
    per_sa = (
        "ipsecmgr_child_sa_packets_total", "ipsecmgr_child_sa_bytes_total",
        "ipsecmgr_child_sa_age_seconds", "ipsecmgr_ike_sa_age_seconds",
    )  # fmt: skip
    for name, labels in s:
        keys = {k for k, _ in labels}
        if name.startswith(per_sa):
            continue
        assert not keys & {"spi", "spi_in", "spi_out", "spi_i"}, name
    # With the SA gone, its per-SA series are gone; the map totals keep its counts.
    snap = {**SNAP, "child_sas": []}
    stats = SNAP["statistics"]
    snap["statistics"] = {**stats, "ike": {**stats["ike"], "tacacs/retired_packets_out": 18}}
    after = _scrape(snap)
    assert not [n for n, _ in after if n.startswith("ipsecmgr_child_sa_packets")]
    assert _v(after, "ipsecmgr_esp_packets_total", map="tacacs", direction="out") == 18


class _Manager:
    """The part of :class:`ipsecmgr.manager.Manager` the Exporter uses."""

    def __init__(self) -> None:
        self.maps: dict[str, None] = {"tacacs": None, "backup": None}
        self.observe: Callable[[str, str, float], None] | None = None

    def set_observer(self, observe: Callable[[str, str, float], None] | None) -> None:
        self.observe = observe

    def map_names(self) -> set[str]:
        return set(self.maps)


class _FakeGateway:
    """What the Exporter reads: the manager's map names and observe hook, the snapshot."""

    def __init__(self) -> None:
        self.manager = _Manager()

    def snapshot(self) -> dict[str, Any]:
        return SNAP


def test_histograms_are_observed_and_follow_the_configured_maps() -> None:
    from ipsecmgr.metrics import Exporter

    gw = _FakeGateway()
    exporter = Exporter(gw)  # type: ignore[arg-type]
    assert gw.manager.observe == exporter.observe  # the manager's hook is set
    observe = gw.manager.observe
    assert observe is not None
    observe("ike_handshake", "tacacs", 0.03)
    observe("ike_handshake", "backup", 7.0)
    observe("first_packet_wait", "tacacs", 0.04)
    observe("unknown", "tacacs", 1.0)  # ignored
    s = {}
    for fam in text_string_to_metric_families(exporter.render().decode()):
        for smp in fam.samples:
            s[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    assert _v(s, "ipsecmgr_ike_handshake_seconds_count", map="tacacs") == 1
    assert _v(s, "ipsecmgr_ike_handshake_seconds_bucket", map="tacacs", le="0.05") == 1
    assert _v(s, "ipsecmgr_ike_handshake_seconds_bucket", map="tacacs", le="0.025") == 0
    assert _v(s, "ipsecmgr_ike_handshake_seconds_bucket", map="backup", le="5.0") == 0
    assert _v(s, "ipsecmgr_ike_handshake_seconds_bucket", map="backup", le="10.0") == 1
    assert _v(s, "ipsecmgr_first_packet_wait_seconds_sum", map="tacacs") == pytest.approx(0.04)
    assert _v(s, "ipsecmgr_esp_packets_total", map="tacacs", direction="out") == 18
    # "backup" removed by a reload: its histogram series go at the next scrape
    del gw.manager.maps["backup"]
    hist = [
        (smp.name, smp.labels.get("map"))
        for fam in text_string_to_metric_families(exporter.render().decode())
        if fam.type == "histogram"
        for smp in fam.samples
    ]
    assert ("ipsecmgr_ike_handshake_seconds_count", "tacacs") in hist
    assert not [h for h in hist if h[1] == "backup"]
