"""HTTP connections against the real server: the clients (and gevent hubs) of threads that are
done are let go, so repeated streams and short-lived thread pools leave no file descriptors
behind (each stream's workers are new threads, each with its own HTTP client and hub)."""

from __future__ import annotations

import gc
import os
from concurrent.futures import ThreadPoolExecutor

from client import SegmentationClient
from tests.conftest import GOOD_FRAME

# Open file descriptors a settled client may still gain: one more generation of threads whose
# clients are not let go yet (4 threads x a socket and a hub's two), with room. A leak grows by
# as much with every stream, so it passes this bound within a stream or two.
SLACK = 16
# What the client leaves after close() in the thread that made it: that thread's gevent hub
# (an epoll and an eventfd), which the thread may still use for other things.
AFTER_CLOSE_SLACK = 4


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def assert_settles(rounds, count: int, label: str) -> None:
    """Run ``rounds()`` ``count`` times; the open fds must stay near their value after the first
    three (stopping at the first round past the bound, before a leak can exhaust the limit)."""
    for _ in range(3):
        rounds()
    settled = open_fds()
    for done in range(1, count + 1):
        rounds()
        now = open_fds()
        assert now <= settled + SLACK, f"{label}: {now} open fds after {done} more rounds, {settled} when settled"


def assert_client_leaves_no_fds(server, rounds, count: int, label: str) -> None:
    """``rounds(client)`` ``count`` times on one HTTP client (``assert_settles``); after its
    close(), the open fds must be back near their value before the client."""
    gc.collect()
    before = open_fds()
    seg = SegmentationClient(server.http_url, transport="http")
    try:
        assert_settles(lambda: rounds(seg), count, label)
    finally:
        seg.close()
    gc.collect()
    assert open_fds() <= before + AFTER_CLOSE_SLACK, f"{open_fds()} open fds after close(), {before} before the client"


def test_repeated_http_streams_do_not_leak_file_descriptors(server):
    def one_stream(seg):
        outcomes = list(seg.segment_stream([GOOD_FRAME] * 4, inflight=4))
        assert all(o.ok for o in outcomes), [o.error for o in outcomes]

    assert_client_leaves_no_fds(server, one_stream, 60, "streams")


def test_segment_from_short_lived_thread_pools_does_not_leak_file_descriptors(server):
    def one_pool(seg):
        with ThreadPoolExecutor(4) as pool:
            masks = list(pool.map(lambda _: seg.segment(GOOD_FRAME).mask, range(8)))
        assert all(mask.shape == GOOD_FRAME.shape[1:] for mask in masks)

    assert_client_leaves_no_fds(server, one_pool, 30, "thread pools")


def test_after_a_closed_http_client_the_next_answers_from_every_thread(server):
    """Closing one client's HTTP threads leaves the next client's calls, from any thread, working."""
    seg = SegmentationClient(server.http_url, transport="http")
    try:
        assert seg.segment(GOOD_FRAME).mask.shape == GOOD_FRAME.shape[1:]
        assert all(o.ok for o in seg.segment_stream([GOOD_FRAME] * 2, inflight=2))
    finally:
        seg.close()
    with SegmentationClient(server.http_url, transport="http") as again:
        with ThreadPoolExecutor(2) as pool:
            shapes = list(pool.map(lambda _: again.segment(GOOD_FRAME).mask.shape, range(4)))
        assert shapes == [GOOD_FRAME.shape[1:]] * 4
        assert again.segment(GOOD_FRAME).mask.shape == GOOD_FRAME.shape[1:]
