"""Fixtures for the TLS protection tests (helpers in ``rig``)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from ipsecmgr.lab import tls_pki
from tests.tls.rig import LoopThread, Pki, Rig


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = tls_pki.write_pki(d, server_ips=["127.0.0.1", "203.0.113.49", "203.0.113.50"])
    now = dt.datetime.now(dt.UTC)
    # Same CA, so each failure test fails for its one reason only.
    exp = tls_pki.issue(ca, tls_pki.SERVER_NAME, server=True, dns=[tls_pki.SERVER_NAME],
                        ips=["127.0.0.1"], not_before=now - dt.timedelta(days=30),
                        not_after=now - dt.timedelta(days=1))  # fmt: skip
    wrong = tls_pki.issue(ca, "other.example", server=True, dns=["other.example"],
                          ips=["192.0.2.99"])  # fmt: skip
    tls_pki.write_cert(d / "other-ca.crt", tls_pki.make_ca("other CA").cert)
    tls_pki.write_cert(d / "expired.crt", exp.cert)
    tls_pki.write_key(d / "expired.key", exp.key)
    tls_pki.write_cert(d / "wrong-name.crt", wrong.cert)
    tls_pki.write_key(d / "wrong-name.key", wrong.key)
    return Pki(
        d, d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt",
        d / "client.key", d / "other-ca.crt", d / "expired.crt", d / "expired.key",
        d / "wrong-name.crt", d / "wrong-name.key",
    )  # fmt: skip


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.close()


@pytest.fixture
def rig(loop_thread: LoopThread) -> Iterator[Rig]:
    r = Rig(loop_thread)
    try:
        yield r
    finally:
        r.close()
