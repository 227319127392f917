"""Counter conventions shared by the classifier and the SA-flow table.

Counters are plain ``dict[str, int]`` buckets keyed by crypto-map name, so that
the hot path pays one dict increment and ``show crypto statistics`` can dump
them as JSON.  Events that belong to no crypto map go to the :data:`GLOBAL`
bucket; that name is therefore not allowed as a crypto-map name.
"""

from typing import Final

GLOBAL: Final = "*"
"""Name of the counter bucket for events that belong to no crypto map."""


def zero(counters: dict[str, dict[str, int]]) -> None:
    """Reset every counter in place (``clear crypto statistics``).

    In place, because the hot path holds references to the inner dicts:
    replacing them would silently detach the counters from the data path.
    """
    for bucket in counters.values():
        for name in bucket:
            bucket[name] = 0
