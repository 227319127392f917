"""The namespace fixture itself: links carry traffic and teardown leaves nothing."""

from __future__ import annotations

import subprocess

import pytest

from ipsecmgr.netns import NetnsPool, check_doc_address


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_refuses_non_documentation_addresses() -> None:
    check_doc_address("198.51.100.7/24")
    check_doc_address("2001:db8::1/64")
    for bad in ("10.0.0.1/8", "8.8.8.8", "192.168.1.1/24", "2001:4860::1"):
        with pytest.raises(ValueError, match="documentation range"):
            check_doc_address(bad)


@pytest.mark.root
def test_veth_link_carries_ipv4_and_ipv6(netns: NetnsPool) -> None:
    a, b = netns.add("a"), netns.add("b")
    netns.link(
        a, b, ["198.51.100.1/24", "2001:db8:1::1/64"], ["198.51.100.2/24", "2001:db8:1::2/64"]
    )
    a.run(["ping", "-c1", "-W2", "198.51.100.2"])
    a.run(["ping", "-c1", "-W2", "2001:db8:1::2"])


@pytest.mark.root
def test_close_stops_processes_and_deletes_namespaces() -> None:
    pool = NetnsPool("t")
    ns = pool.add("x")
    proc = ns.popen(["sleep", "300"])
    assert ns.name in _netns_names()
    pool.close()
    assert proc.poll() is not None
    assert ns.name not in _netns_names()
