"""NPUSIM: ACL classification, crypto-map verdicts and the SA-flow table.

Pure: bytes in, verdicts and counters out; no sockets, clocks or threads.

* :mod:`npusim.acl`: the ACL language (``parse_acl``) compiled to integer masks.
* :mod:`npusim.classifier`: outbound verdicts (reference step 3).
* :mod:`npusim.fieldindex`: the classifier's per-field rule index (bit vectors).
* :mod:`npusim.saflow`: inbound SPI lookup and policy check (steps 9-10).
* :mod:`npusim.packet`: the shared bounds-checked selector parser.
"""

from npusim.acl import Acl, AclSyntaxError, Rule, parse_acl
from npusim.classifier import BYPASS, Bypass, Classifier, CryptoMap, Drop, Protect, Verdict
from npusim.counters import GLOBAL
from npusim.saflow import SaFlow, SaFlowTable, TrafficSelector

__all__ = [
    "BYPASS",
    "GLOBAL",
    "Acl",
    "AclSyntaxError",
    "Bypass",
    "Classifier",
    "CryptoMap",
    "Drop",
    "Protect",
    "Rule",
    "SaFlow",
    "SaFlowTable",
    "TrafficSelector",
    "Verdict",
    "parse_acl",
]
