"""Which of our addresses each datagram leaves from (RFC 7296 §2.11).

With several local addresses the engine tells the caller, per datagram, the
address it must leave from: a response "MUST specify the address and port at
which the request was received as the source address and port".
"""

from __future__ import annotations

import random

import pytest

from ike.endpoint import IkeEndpoint
from ike.sa import IkeSA

from .pair import I_ADDR, R_ADDR, configs

SECOND = ("198.51.100.3", 500)  # a second address of the responder, same family


@pytest.mark.parametrize("arrived_at", [R_ADDR, SECOND])
def test_responses_leave_from_the_address_the_request_arrived_at(
    arrived_at: tuple[str, int],
) -> None:
    ci, cr = configs(i_peer_addr=arrived_at)  # cr's own local_addr stays R_ADDR
    i = IkeSA(ci, True, random.Random(1).randbytes)
    ep = IkeEndpoint([cr], rng=random.Random(2).randbytes)
    i.initiate(0.0)
    sources = []
    for _ in range(10):
        for data, _peer in i.datagrams_to_send(0.0):
            ep.receive_datagram(data, I_ADDR, 0.0, arrived_at)
        out = ep.datagrams_from(0.0)
        if not out:
            break
        for data, peer, local in out:
            assert peer == I_ADDR
            sources.append(local)
            i.receive_datagram(data, arrived_at, 0.0)
    assert i.established and ep.sas[0].established
    assert sources == [arrived_at, arrived_at]  # IKE_SA_INIT and IKE_AUTH responses


def test_an_initiator_sends_from_its_configured_address() -> None:
    ci, _cr = configs(i_local_addr=("198.51.100.9", 500))
    ep = IkeEndpoint([ci], rng=random.Random(3).randbytes)
    ep.initiate(ci, 0.0)
    assert [(p, local) for _d, p, local in ep.datagrams_from(0.0)] == [
        (R_ADDR, ("198.51.100.9", 500))
    ]
