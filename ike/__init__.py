"""IKEv2 (RFC 7296) with PSK authentication: a sans-I/O engine.

No sockets, no clocks, no threads: bytes and ``now`` (seconds, any monotonic
origin) go in, datagrams and events come out. The daemon is the only adapter.

How the daemon drives it
------------------------
::

    ep = ike.IkeEndpoint(configs)              # one per process; owns every IkeSA
    sa = ep.initiate(config, now)              # first matching packet: start IKE

    # on every UDP datagram (port 500, or 4500 with the 4-byte non-ESP marker
    # still in front: the engine strips it):
    ep.receive_datagram(data, (src_ip, src_port), now, local_addr=(dst_ip, dst_port))

    # after every input, and when the timer fires:
    for data, (ip, port) in ep.datagrams_to_send(now):
        # send from local port 4500 when port == 4500 (data then already starts
        # with the non-ESP marker), else from port 500
        ...
    while (event := ep.next_event()) is not None:
        dispatch(event)                        # isinstance() on ike.events classes
    deadline = ep.get_timer()                  # absolute time or None; at that time:
    ep.handle_timer(now)

A single :class:`IkeSA` has the same five methods (``receive_datagram``
without ``local_addr``) and can be used without the endpoint; a responder is
then built with :meth:`IkeSA.respond_to`.

Commands on an ``IkeSA`` (queued; one request in flight per SA, §2.3):
``initiate(now)``, ``create_child(now)``, ``rekey_child(child_id, now)``,
``rekey_ike(now)``, ``liveness_check(now)``, ``delete_child(child_id, now)``,
``delete(now)``; ``export_keys()`` gives the IKE keys for Wireshark.

Events (``ike.events``): ``IkeSaEstablished``, ``ChildSaInstalled`` (SPIs,
AES key ‖ salt per direction, mode, ESN, traffic selectors; ``rekeyed_from``
on a rekey: install the new SA, send on it, keep the old inbound SA until its
``ChildSaDeleted``), ``ChildSaRekeyed``, ``ChildSaDeleted``, ``IkeSaRekeyed``,
``IkeSaDeleted(reason)`` (covers all its Child SAs), ``PeerDead`` (followed by
``IkeSaDeleted``), ``InitialContactReceived``, ``NatDetected``,
``AuthenticationFailed``, ``ExchangeFailed(notify)``.

Nothing a peer sends raises out of ``receive_datagram``: bad datagrams are
dropped and counted in ``counters`` (per SA and per endpoint).
"""

from .config import DEFAULT_IKE_PROPOSALS, EspProposal, Identity, IkeConfig, IkeProposal
from .constants import DhGroup, EncrId, IdType, IntegId, NotifyType, PrfId
from .endpoint import IkeEndpoint
from .events import (
    AuthenticationFailed,
    ChildSaDeleted,
    ChildSaInstalled,
    ChildSaRekeyed,
    ExchangeFailed,
    IkeEvent,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaRekeyed,
    InitialContactReceived,
    NatDetected,
    PeerDead,
)
from .payloads import TrafficSelector
from .sa import IkeSA

__all__ = [
    "DEFAULT_IKE_PROPOSALS",
    "AuthenticationFailed",
    "ChildSaDeleted",
    "ChildSaInstalled",
    "ChildSaRekeyed",
    "DhGroup",
    "EncrId",
    "EspProposal",
    "ExchangeFailed",
    "IdType",
    "Identity",
    "IkeConfig",
    "IkeEndpoint",
    "IkeEvent",
    "IkeProposal",
    "IkeSA",
    "IkeSaDeleted",
    "IkeSaEstablished",
    "IkeSaRekeyed",
    "InitialContactReceived",
    "IntegId",
    "NatDetected",
    "NotifyType",
    "PeerDead",
    "PrfId",
    "TrafficSelector",
]
