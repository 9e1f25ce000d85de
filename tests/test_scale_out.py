"""Several servers behind one client: least-in-flight choice and cooldown (logic), then two real
servers with one killed mid-stream under the CLI: every frame written once, in order, per-server
counts in the summary."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import tifffile

from client.__main__ import main as client_main
from client.api import SegmentationClient
from client.servers import ServerPool, split_urls
from segserve.launcher import ServerConfig, TritonServer
from tests.conftest import copy_2d_repository
from tests.helpers import cli, make_stack, reference_masks, wait_for_record
from training.synthetic import synthetic_slice, to_detector_counts



class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_split_urls():
    assert split_urls("a:1, b:2", "x:0") == ["a:1", "b:2"]
    assert split_urls(None, "x:0") == ["x:0"]
    with pytest.raises(ValueError, match="listed twice"):
        split_urls("a:1,a:1", "x:0")
    with pytest.raises(ValueError, match="host:port"):
        split_urls("a:1,,b:2", "x:0")
    assert split_urls("[::1]:8001,gpu-2.lab:1", "x:0") == ["[::1]:8001", "gpu-2.lab:1"]


@pytest.mark.parametrize("url, reason", [("localhost:abc", "port must be a number in 1..65535, got 'abc'"),
                                         ("127.0.0.1:99999", "got '99999'"), ("127.0.0.1:0", "got '0'"),
                                         ("127.0.0.1", "expected host:port"), (":8001", "expected host:port"),
                                         ("::1", "[v6 address]:port"), ("[::1]", "[v6 address]:port"),
                                         ("http://127.0.0.1:8000", "without a scheme, e.g. '127.0.0.1:8000'")])
def test_split_urls_refuses_what_is_not_host_and_port(url, reason):
    """tritonclient takes these and fails to connect, which read as "is the server running?"."""
    with pytest.raises(ValueError, match=re.escape(reason)):
        split_urls(f"a:1,{url}", "x:0")


def test_pool_picks_least_in_flight_and_skips_failed_servers():
    clock = FakeClock()
    pool = ServerPool(["a", "b", "c"], cooldown_s=10.0, clock=clock)
    assert [pool.acquire() for _ in range(4)] == [0, 1, 2, 0]  # fewest in flight, then fewest answered
    pool.release(1, failed=True)  # b failed: passed over for 10 s
    pool.release(2, failed=False)
    assert pool.acquire() == 2 and pool.acquire() == 2  # a has 2 in flight, b is cooling down
    assert pool.acquire(exclude={2}) == 0  # b is still down, so a despite its load
    clock.now += 11.0
    assert pool.acquire() == 1  # b's pause is over
    assert "b 0 answered (1 failed, tried elsewhere)" in pool.summary()


def test_pool_uses_a_failed_server_when_all_failed():
    clock = FakeClock()
    pool = ServerPool(["a", "b"], cooldown_s=10.0, clock=clock)
    for index in (pool.acquire(), pool.acquire()):
        pool.release(index, failed=True)
        clock.now += 1.0
    assert pool.acquire() == 0  # a's pause ends first


@pytest.fixture(scope="module")
def second_server(server, tmp_path_factory):
    """A second real server with the 2D pipeline only, sharing the first one's token, whose
    sliding window splits each tile batch into 3 concurrent network requests (the ``gpu``
    variant's setting, one per GPU there)."""
    repository = copy_2d_repository(tmp_path_factory.mktemp("second") / "model_repository", 2)
    sliding_window = repository / "segment_2d" / "config.pbtxt"
    sliding_window.write_text(sliding_window.read_text()
                              + 'parameters { key: "tile_requests_in_flight" value: { string_value: "3" } }\n')
    config = ServerConfig(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0,
                          token=server.config.token)
    second = TritonServer(config, log_path=tmp_path_factory.mktemp("logs") / "second.log").start()
    yield second
    second.stop(timeout_s=20)


def frames(count: int, rng) -> list[np.ndarray]:
    return [to_detector_counts(synthetic_slice((200, 240), rng)[0], np.uint16, rng) for _ in range(count)]


def test_concurrent_tile_requests_give_the_same_result(server, second_server, rng):
    frame = frames(1, rng)[0]
    with SegmentationClient(server.grpc_url) as one, SegmentationClient(second_server.grpc_url) as split:
        sequential, concurrent = one.segment(frame, probabilities=True), split.segment(frame, probabilities=True)
    assert np.abs(sequential.probabilities - concurrent.probabilities).max() <= 1e-5
    assert np.array_equal(sequential.mask, concurrent.mask)
    deadline = time.monotonic() + 30  # stub log lines reach the server log asynchronously
    in_flight = re.compile(r"segment_2d: [^\n]*\b3 tile request\(s\) in flight per batch")
    while not in_flight.search(second_server.log_path.read_text()):
        assert time.monotonic() < deadline, second_server.log_path.read_text()[-2000:]
        time.sleep(0.5)


def test_cli_stream_survives_a_server_killed_mid_stream(server, second_server, rng, tmp_path):
    """`segment` over two servers; the second is killed (server and stubs) once 8 frames are
    written. Every frame is written once, in order, equal to a one-server run."""
    stack = make_stack(rng, 40, (200, 240))
    tifffile.imwrite(tmp_path / "scan.tif", stack)
    urls = f"{server.grpc_url},{second_server.grpc_url}"
    client = subprocess.Popen([*cli(server, str(tmp_path / "scan.tif"), "--out", str(tmp_path / "out"), "--inflight", "4",
                                    "--no-progress"), "--url", urls], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    wait_for_record(tmp_path / "out" / "scan.segment.json", 8, client)
    os.killpg(second_server.process.pid, signal.SIGKILL)
    _, err = client.communicate(timeout=300)
    assert client.returncode == 0, err
    assert np.array_equal(tifffile.imread(tmp_path / "out" / "scan_mask.tif"), reference_masks(server, stack))
    record = json.loads((tmp_path / "out" / "scan.segment.json").read_text())
    assert record["done"] == 40 and not record["failed"]
    counts = re.search(rf"per server: {re.escape(server.grpc_url)} (\d+) answered, "
                       rf"{re.escape(second_server.grpc_url)} (\d+) answered(?: \((\d+) failed)?", err)
    assert counts, err
    first, second, failed = int(counts[1]), int(counts[2]), int(counts[3] or 0)
    assert first + second == 40 and second >= 2 and first > second  # each frame answered exactly once
    assert failed >= 1  # requests in flight there when it died, answered by the first server


def test_cli_reports_per_server_counts(server, tmp_path, rng, capsys):
    """A live server and a dead one: the dead one is warned about and skipped."""
    tifffile.imwrite(tmp_path / "stack.tif", np.stack(frames(6, rng)))
    dead = "127.0.0.1:1"  # nothing listens there
    code = client_main(["segment", str(tmp_path / "stack.tif"), "--out", str(tmp_path / "out"), "--url",
                        f"{server.grpc_url},{dead}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"not ready at {dead}; using the other server(s)" in err
    assert f"per server: {server.grpc_url} 6 answered, {dead} 0 answered" in err
    assert tifffile.imread(tmp_path / "out" / "stack_mask.tif").shape == (6, 200, 240)
