"""SIGHUP: what changed between two configurations, and work only on that.

A responder for thousands of NAS reloads to add, change or remove one crypto
map; the maps that did not change must keep their SAs, and the work done (IKE
configs built, SAs deleted, ACLs parsed, fail-closed routes touched, configs
(un)indexed in the IKE endpoint, the tracer's peer table) must follow the
number of changed maps, not the number of maps (issue #19 item 7).

What stays linear in the number of maps: reading and validating the file
itself (the whole file is the input), comparing each crypto map with the
running one (one dataclass comparison per map, :meth:`MapDiff.of`; ACLs and
transform sets once each), and C-level dict, set and list passes over the
names. The hold-downs SIGHUP ends are those there are (``Failover.held``), not
one call per map. docs/performance.md, "Configuration at scale", has the
figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import npusim
from ipsecmgr import config as cfg

if TYPE_CHECKING:
    from ipsecmgr.records import MapState


@dataclass(frozen=True)
class MapDiff:
    """Crypto map names by what a reload does with them."""

    kept: frozenset[str]
    changed: frozenset[str]  # in both configurations, defined differently: rebuilt
    added: frozenset[str]
    removed: frozenset[str]

    @classmethod
    def of(cls, old: cfg.Config, new: cfg.Config) -> MapDiff:
        """Compare the two configurations' crypto maps. A map is kept when
        everything that shapes its SAs is equal: the map itself (its PSKs too:
        :class:`~ipsecmgr.secret.Secret` compares the bytes read from the file or
        the environment, so a key file rewritten under the same name is a
        change), its ACL's rules, its transform sets and its TUN.

        The sections a map refers to by name are compared once each, not once per
        map that refers to them, and nothing is built per map: the one Python
        step per map is the comparison of its :class:`~ipsecmgr.config.CryptoMap`
        with the running one (docs/performance.md, "SIGHUP")."""
        acls = _changed(old.access_lists, new.access_lists)
        ikes = _changed(old.ike_transform_sets, new.ike_transform_sets)
        ipsecs = _changed(old.ipsec_transform_sets, new.ipsec_transform_sets)
        moved = _moved(old.tuns, new.tuns)
        running = old.crypto_maps
        kept = frozenset(
            name
            for name, m in new.crypto_maps.items()
            if name not in moved
            and m.match_address not in acls
            and (not ikes or ikes.isdisjoint(m.ike_transform_sets))
            and (not ipsecs or ipsecs.isdisjoint(m.ipsec_transform_sets))
            and running.get(name) == m
        )
        old_names, new_names = running.keys(), new.crypto_maps.keys()
        return cls(
            kept,
            frozenset(new_names & old_names) - kept,  # set operations: C-level
            frozenset(new_names - old_names),
            frozenset(old_names - new_names),
        )


def _changed(old: Mapping[str, object], new: Mapping[str, object]) -> set[str]:
    """Names of the sections in ``new`` that are not in ``old`` or differ there."""
    return {name for name, s in new.items() if old.get(name, _ABSENT) != s}


def _moved(old: Iterable[cfg.TunInterface], new: Iterable[cfg.TunInterface]) -> set[str]:
    """Crypto maps whose TUN changed: bound to a TUN in one file and not in the
    other. A TUN's list is compared whole first (C-level): the maps of a TUN
    whose list did not change are not looked at one by one."""
    before = {t.name: t.crypto_maps for t in old}
    moved: set[str] = set()
    for t in new:
        maps = before.pop(t.name, ())
        if maps != t.crypto_maps:
            moved.update(set(maps).symmetric_difference(t.crypto_maps))
    for maps in before.values():  # TUNs no longer there
        moved.update(maps)
    return moved


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
    map's are equal by definition (:meth:`MapDiff.of`), so they are not looked
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
