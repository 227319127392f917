"""ipsecmgr.loop: the single data path's fds served straight from the selector, the
rest of asyncio (readers, timers) unchanged, a failing callback logged and survived."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator

import pytest

from ipsecmgr.loop import DataPathSelector, add_data_reader, new_event_loop, remove_data_reader


@pytest.fixture
def pipes() -> Iterator[list[tuple[int, int]]]:
    made: list[tuple[int, int]] = []
    yield made
    for r, w in made:
        os.close(r)
        os.close(w)


def _pipe(made: list[tuple[int, int]]) -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    made.append((r, w))
    return r, w


def test_the_daemon_loop_serves_data_fds_from_the_selector() -> None:
    loop = new_event_loop()
    try:
        selector = loop._selector  # type: ignore[attr-defined]
        assert isinstance(selector, DataPathSelector)
    finally:
        loop.close()


def test_data_readers_asyncio_readers_and_timers_share_the_loop(
    pipes: list[tuple[int, int]],
) -> None:
    loop = new_event_loop()
    data_r, data_w = _pipe(pipes)
    ctl_r, ctl_w = _pipe(pipes)
    got: list[tuple[str, bytes]] = []

    async def main() -> None:
        done = loop.create_future()

        def on_data(tag: str) -> None:
            got.append((tag, os.read(data_r, 100)))
            os.write(ctl_w, b"c")  # the control side hears of it through asyncio

        def on_ctl() -> None:
            got.append(("ctl", os.read(ctl_r, 100)))
            loop.call_later(0, done.set_result, None)  # a timer still fires

        add_data_reader(loop, data_r, on_data, "data")
        loop.add_reader(ctl_r, on_ctl)
        os.write(data_w, b"packet")
        await asyncio.wait_for(done, 5)
        remove_data_reader(loop, data_r)
        loop.remove_reader(ctl_r)
        # Removed: a later write is no longer read by the data path.
        os.write(data_w, b"late")
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert got == [("data", b"packet"), ("ctl", b"c")]
    assert os.read(data_r, 100) == b"late"


def test_a_failing_data_callback_is_logged_and_the_loop_keeps_serving(
    pipes: list[tuple[int, int]], caplog: pytest.LogCaptureFixture
) -> None:
    loop = new_event_loop()
    bad_r, bad_w = _pipe(pipes)
    good_r, good_w = _pipe(pipes)
    calls = {"bad": 0}

    async def main() -> bytes:
        done: asyncio.Future[bytes] = loop.create_future()
        again: asyncio.Future[None] = loop.create_future()

        def bad() -> None:
            os.read(bad_r, 100)
            calls["bad"] += 1
            if calls["bad"] == 2:
                again.set_result(None)
            raise ValueError("boom")

        def good() -> None:
            if not done.done():
                done.set_result(os.read(good_r, 100))

        add_data_reader(loop, bad_r, bad)
        add_data_reader(loop, good_r, good)
        os.write(bad_w, b"x")
        os.write(good_w, b"ok")
        result = await asyncio.wait_for(done, 5)
        os.write(bad_w, b"y")  # and the failing one is still served
        await asyncio.wait_for(again, 5)
        return result

    with caplog.at_level(logging.ERROR, logger="ipsecmgr"):
        try:
            assert loop.run_until_complete(main()) == b"ok"
        finally:
            loop.close()
    assert calls["bad"] == 2
    assert sum("data path callback" in r.getMessage() for r in caplog.records) == 2


def test_on_a_plain_asyncio_loop_data_readers_are_asyncio_readers(
    pipes: list[tuple[int, int]],
) -> None:
    loop = asyncio.new_event_loop()
    r, _w = _pipe(pipes)
    try:
        add_data_reader(loop, r, lambda: None)
        assert loop.remove_reader(r)  # it was an ordinary reader
        add_data_reader(loop, r, lambda: None)
        remove_data_reader(loop, r)
        assert not loop.remove_reader(r)
    finally:
        loop.close()
