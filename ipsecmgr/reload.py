"""SIGHUP: what changed between two configurations, and work only on that.

A responder for thousands of NAS reloads to add, change or remove one crypto
map; the maps that did not change must keep their SAs, and the work done (IKE
configs built, SAs deleted, ACLs parsed, fail-closed routes touched, configs
(un)indexed in the IKE endpoint, the tracer's peer table) must follow the
number of changed maps, not the number of maps (issue #19 item 7).

What stays linear in the number of maps: reading and validating the file
itself (the whole file is the input), building each map's definition and
comparing it with the running one (a tuple comparison per map, ACL rules
likewise), and C-level dict, set and list passes over the map names. The
hold-downs SIGHUP ends are those there are (``Failover.held``), not one call
per map. docs/performance.md, "Configuration at scale", has the figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import npusim
from ipsecmgr import config as cfg

if TYPE_CHECKING:
    from ipsecmgr.records import MapState


def map_definitions(config: cfg.Config) -> dict[str, object]:
    """Everything that shapes each crypto map's SAs (map, ACL, transform sets, TUN):
    equal means the map keeps its SAs. One pass over the TUNs, not one per map."""
    tuns: dict[str, list[str]] = {}
    for t in config.tuns:
        for name in t.crypto_maps:
            tuns.setdefault(name, []).append(t.name)
    return {
        name: (
            m,
            config.access_lists[m.match_address],
            [config.ike_transform_sets[t] for t in m.ike_transform_sets],
            [config.ipsec_transform_sets[t] for t in m.ipsec_transform_sets],
            tuns.get(name, []),
        )
        for name, m in config.crypto_maps.items()
    }


@dataclass(frozen=True)
class MapDiff:
    """Crypto map names by what a reload does with them."""

    kept: frozenset[str]
    changed: frozenset[str]  # in both configurations, defined differently: rebuilt
    added: frozenset[str]
    removed: frozenset[str]

    @classmethod
    def between(cls, old: Mapping[str, object], new: Mapping[str, object]) -> MapDiff:
        """From two :func:`map_definitions` results."""
        kept = frozenset(n for n, d in new.items() if old.get(n, _ABSENT) == d)
        return cls(
            kept,
            frozenset(n for n in new if n in old and n not in kept),
            frozenset(new.keys() - old.keys()),
            frozenset(old.keys() - new.keys()),
        )


_ABSENT = object()


def reuse_acls(
    old: cfg.Config, old_acls: Mapping[str, npusim.Acl], new: cfg.Config
) -> tuple[dict[str, npusim.Acl], int]:
    """The new configuration's compiled ACLs: the running objects for ACLs whose rules
    did not change, the new ones (compiled by the configuration's check, else by
    npusim here) for the others. Returns them and how many are new."""
    out: dict[str, npusim.Acl] = {}
    parsed = 0
    for name, a in new.access_lists.items():
        before = old.access_lists.get(name)
        if before is not None and before.rules == a.rules and name in old_acls:
            out[name] = old_acls[name]
        else:
            out[name] = new.compiled_acls.get(name) or npusim.parse_acl(name, list(a.rules))
            parsed += 1
    return out, parsed


def classifier_changed(old: cfg.Config, new: cfg.Config, touched: Iterable[str]) -> bool:
    """Whether what :func:`ipsecmgr.daemon.build_classifier` reads changed: the maps'
    order, or a touched (changed, added, removed) map's ACL rules or peer. A kept
    map's are equal by definition (:func:`map_definitions`), so they are not looked
    at; False means the running classifier (its indexes and counters) serves the
    new configuration as is."""
    if list(old.crypto_maps) != list(new.crypto_maps):  # names in order: a C-level compare
        return True
    return any(_classifier_input(old, n) != _classifier_input(new, n) for n in touched)


def _classifier_input(config: cfg.Config, name: str) -> object:
    m = config.crypto_maps.get(name)
    return None if m is None else (config.access_lists[m.match_address].rules, m.peer)


@dataclass
class ReloadWork:
    """What :meth:`ipsecmgr.manager.Manager.reconfigure` did (observable, for tests
    and the log): names of the map states built and dropped, SAs deleted."""

    kept: int = 0
    built: list[str] = field(default_factory=list)
    dropped: list[MapState] = field(default_factory=list)
    sas_deleted: int = 0
    children_removed: int = 0
    # The endpoint's config index: configs added and removed (IkeEndpoint.update_configs),
    # and whether it was rebuilt whole (a new config shares a peer with another map's)
    configs_indexed: int = 0
    configs_dropped: int = 0
    index_rebuilt: bool = False
    # Peer lists whose hold-downs ended (#15.5): those that had one, not every map's
    hold_downs_ended: int = 0


def rebuild_states(
    old: dict[str, MapState],
    crypto_maps: Mapping[str, cfg.CryptoMap],
    keep: set[str] | frozenset[str],
    build: Callable[[cfg.CryptoMap], MapState],
) -> tuple[dict[str, MapState], ReloadWork]:
    """The new map states in configuration order: a kept map's running state
    (its SAs, counters, queue, and its crypto map object, equal to the new one),
    a new ``build`` for the others. (The hold-downs are ended by the manager:
    ``Failover.end_hold_downs``.)

    With the same map names in the same order (a map edited), ``old`` is updated
    in place: only the rebuilt maps are looked at. Otherwise (a map added, removed
    or moved) the dict is built again in the new order."""
    work = ReloadWork()
    rebuilt = crypto_maps.keys() - keep  # set operations: C-level, not a Python loop
    if list(old) == list(crypto_maps):
        maps = old
        for name in sorted(rebuilt):
            work.dropped.append(maps[name])
            maps[name] = build(crypto_maps[name])
            work.built.append(name)
    else:
        maps = {}
        for name, cmap in crypto_maps.items():
            state = old.get(name) if name in keep else None
            if state is None:
                state = build(cmap)
                work.built.append(name)
            maps[name] = state
        work.dropped = [s for n, s in old.items() if maps.get(n) is not s]
    work.kept = len(maps) - len(work.built)
    return maps, work
