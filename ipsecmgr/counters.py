"""The gateway's counters: one type for the global counts, one per SA.

* **Global**: :data:`Counters`, named event counts (a :class:`collections.Counter`:
  a name never counted reads 0, ``c[name] += n`` counts, ``update`` adds another
  set by name). The daemon's own, the data path's (the split data path's workers
  count in their own and the control process adds them up), each crypto map's
  (:meth:`ipsecmgr.records.MapState.bump`).
* **Per SA**: :class:`esp.SaCounters` on each ESP SA (packets, payload bytes,
  drops by reason); the IKE engine counts per IKE SA and per endpoint itself.

``show`` and :mod:`ipsecmgr.metrics` read both through the daemon's snapshot:
``statistics`` for the global ones (per map as ``map/name``), the ``child_sas``
rows for the SAs.
"""

from __future__ import annotations

from collections import Counter

Counters = Counter[str]

__all__ = ["Counters"]
