"""Gateway configuration: TOML in, frozen dataclasses out.

The concepts are those of the StarOS reference (``ip access-list``,
``ikev2-ikesa transform-set``, ``ipsec transform-set``, ``crypto map``,
``interface ... crypto-map``); the syntax is TOML, read with stdlib
``tomllib``. Example (see ``examples/`` for complete, commented files)::

    [access_list.foo]
    rules = ["permit ip host 192.0.2.1 host 203.0.113.49"]

    [ike_transform_set.ikesa-foo]
    dh_group = 14

    [ipsec_transform_set.B-foo]
    mode = "tunnel"

    [crypto_map.foo]
    peer = "198.51.100.2"
    match_address = "foo"
    local_psk = { file = "/etc/ipsecmgr/psk-foo" }
    ike_transform_sets = ["ikesa-foo"]
    ipsec_transform_sets = ["B-foo"]
    src_ip = "192.0.2.1"

    [tun.tun-foo]
    addresses = ["192.0.2.1/32"]
    crypto_maps = ["foo"]

    [gateway]
    local_addresses = ["198.51.100.1"]
    management_interface = "eth0"

Validation collects every error, each naming the exact key path and saying
what was expected (``crypto_map.foo.peer: '209.165.300.1' is not an IP
address``). Unknown keys are errors: a typo (``retransmision_timeout``) must
not silently fall back to a default. PSKs are read while loading (from a file
or the environment, see :mod:`ipsecmgr.secret`) so a missing key file is
reported by ``check-config``, not at the first IKE exchange.

Modules: :mod:`.model` (types, names, bounds), :mod:`.load` (files and
``check-config``), :mod:`.parser` (sections), :mod:`.crypto_map` (the crypto
map section), :mod:`.getters` (typed getters that report by key path). This
package re-exports what the rest of the code uses (``import ipsecmgr.config
as cfg``; ``cfg.Config``, ``cfg.load_config``...).
"""

from __future__ import annotations

from ipsecmgr.config.load import (
    check_config,
    diagnose_config,
    format_diagnosis,
    load_config,
    parse_config,
)
from ipsecmgr.config.model import (
    DATAPATHS,
    DEFAULT_CONTROL_SOCKET,
    DH_GROUPS,
    ENCAPSULATIONS,
    ESP_ENCRYPTIONS,
    FIRST_PACKET,
    ID_TYPES,
    IKE_ENCRYPTIONS,
    INTEGRITIES,
    MAX_DPD_TIMEOUT,
    MAX_LIFETIME,
    MAX_RETRIES,
    MAX_TIMER,
    MAX_VOLUME,
    MIN_LIFETIME,
    MIN_TIMER,
    MODES,
    ON_STOP,
    ON_UNREACHABLE,
    PRFS,
    REKEY_POLICIES,
    ROLES,
    AccessList,
    AclValidator,
    Config,
    ConfigDiagnosis,
    ConfigError,
    CryptoMap,
    Dpd,
    Gateway,
    Identity,
    IkeTransformSet,
    IPAddress,
    IPInterface,
    IpsecTransformSet,
    Metrics,
    TunInterface,
)

__all__ = [
    "DATAPATHS",
    "DEFAULT_CONTROL_SOCKET",
    "DH_GROUPS",
    "ENCAPSULATIONS",
    "ESP_ENCRYPTIONS",
    "FIRST_PACKET",
    "ID_TYPES",
    "IKE_ENCRYPTIONS",
    "INTEGRITIES",
    "MAX_DPD_TIMEOUT",
    "MAX_LIFETIME",
    "MAX_RETRIES",
    "MAX_TIMER",
    "MAX_VOLUME",
    "MIN_LIFETIME",
    "MIN_TIMER",
    "MODES",
    "ON_STOP",
    "ON_UNREACHABLE",
    "PRFS",
    "REKEY_POLICIES",
    "ROLES",
    "AccessList",
    "AclValidator",
    "Config",
    "ConfigDiagnosis",
    "ConfigError",
    "CryptoMap",
    "Dpd",
    "Gateway",
    "IPAddress",
    "IPInterface",
    "Identity",
    "IkeTransformSet",
    "IpsecTransformSet",
    "Metrics",
    "TunInterface",
    "check_config",
    "diagnose_config",
    "format_diagnosis",
    "load_config",
    "parse_config",
]
