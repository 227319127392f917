"""IKEv2 (RFC 7296) with PSK authentication: a sans-I/O engine.

No sockets, no clocks, no threads: bytes and ``now`` (seconds, any monotonic
origin) go in, datagrams and events come out. The daemon is the only adapter.

How the daemon drives it
------------------------
::

    ep = ike.IkeEndpoint(configs, usage=fn)    # owns every IkeSA (and its caches)
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
``rekey_ike(now)``, ``liveness_check(now, timeout=None, tries=None)`` (DPD: the
daemon decides when, from ``IkeSA.last_heard`` and its ESP counters; ``timeout``
and ``tries``: resend every ``timeout`` s without back-off, DPD style),
``delete_child(child_id, now)``, ``delete(now)``, ``abandon(reason)`` (forget
without telling the peer), ``probe(now, timeout, tries)`` (a liveness check at
once on a short schedule, after an INVALID_SPI hint); ``export_keys()`` gives
the IKE keys for Wireshark. On the endpoint, ``send_invalid_spi(spi, peer, now,
nat_t)`` answers ESP with an unknown SPI (§1.5; ``ike.invalid_spi``).
The engine owns SA lifetimes (``ike.lifetimes``): from ``IkeConfig``'s
lifetimes in seconds, packets and bytes, ``rekey_jitter`` (its random source
``jitter``) and ``rekey_lazy``, it rekeys IKE and Child SAs at their soft
limits, once per generation, make-before-break, and deletes them at their
hard limits. Volume is counted by the daemon's data path: the engine asks the
endpoint's ``usage(ike_sa_name, child_id, now) -> ChildUsage`` when the daemon calls
``IkeSA.check_usage(now)`` (now and then), and at a soft deadline under
``rekey_lazy``. Read-only facts for display: ``IkeSA.spi_i``, ``spi_r``,
``role``, ``suite``, ``state`` (``ike.State``; Child SAs ``ike.ChildState``).

Events (``ike.events``), and what the daemon does with them:

* ``IkeSaEstablished`` - log it; the IKE SA is up.
* ``ChildSaInstalled`` - build ``esp.InboundSA(inbound_spi, inbound_key)`` and
  ``esp.OutboundSA(outbound_spi, outbound_key)`` (keys are AES key ‖ 4-byte
  salt), mode, ESN, traffic selectors. With ``rekeyed_from`` set it replaces an
  older Child SA: install it, send on it at once, keep the old *inbound* SA
  until ``ChildSaDeleted`` for the old id arrives (make-before-break).
* ``ChildSaRekeyed(old_child_id, new_child_id)`` - informational pairing.
* ``ChildSaDeleted`` - remove both directions of that Child SA.
* ``IkeSaRekeyed`` - new IKE SPIs; Child SAs are unchanged.
* ``IkeSaDeleted(reason, child_ids)`` - remove every Child SA it lists.
* ``PeerDead`` - retransmissions exhausted; ``IkeSaDeleted`` follows.
* ``InitialContactReceived`` - the endpoint has already dropped every other
  IKE SA with that peer (they come as ``IkeSaDeleted``).
* ``InvalidSpiReceived(spi, child_id, authenticated)`` - the peer does not know
  the SPI we send on (§1.5): unauthenticated, only a hint for ``IkeSA.probe``.
* ``LifetimeExpired(child_id, hard, limits, action)`` - the engine started a
  rekey or a delete at a lifetime limit, or left an idle SA to expire
  (``rekey_lazy``); for logs and statistics.
* ``NatDetected``, ``AuthenticationFailed``, ``ExchangeFailed(exchange,
  notify, by_peer)`` - for logs and statistics.

Logging: set ``IkeEndpoint(log=callable)`` (or ``IkeSA.log``) to get one line
per IKE message, strongSwan style, with no secrets in it.

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
    InvalidSpiReceived,
    LifetimeExpired,
    NatDetected,
    PeerDead,
)
from .lifetimes import ChildUsage
from .payloads import TrafficSelector
from .sa import IkeSA
from .state import ChildState, State

__all__ = [
    "DEFAULT_IKE_PROPOSALS",
    "AuthenticationFailed",
    "ChildSaDeleted",
    "ChildSaInstalled",
    "ChildSaRekeyed",
    "ChildState",
    "ChildUsage",
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
    "InvalidSpiReceived",
    "LifetimeExpired",
    "NatDetected",
    "NotifyType",
    "PeerDead",
    "PrfId",
    "State",
    "TrafficSelector",
]
