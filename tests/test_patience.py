"""``--patience`` is how long the servers have been failing, not how long each frame has: one
outage clock per client, started by the first passing failure after the last success and reset
by any success (``client.stream.Outage``). A server gone for good costs a run about one
patience, not one per frame; a server back within it costs nothing.

Logic with a fake clock first, then the CLI against a server of its own stopped for good
mid-run (exits soon, every frame accounted for, the run resumable)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import client.stream as stream_logic
from client.connection import SegmentationError
from client.outage_notices import OutageNotices
from client.stream import RetryPolicy, call_with_retries, ordered_stream
from segserve.launcher import REPO_ROOT, ServerConfig, TritonServer
from tests.conftest import copy_2d_repository
from tests.helpers import FakeClock, make_stack, reference_masks, running_with_stderr, wait_for_record

DOWN = SegmentationError("failed to connect to all addresses; Connection refused", retryable=True)
BAD_FRAME = SegmentationError("IMAGE contains NaN or Inf pixels", retryable=False)


def always(error: SegmentationError):
    def call():
        raise error
    return call


def frame(clock, policy, outage, function=always(DOWN)) -> tuple[str | None, int, float]:
    """(result or None, attempts, fake seconds it took) of one frame's call_with_retries."""
    started = clock()
    try:
        result, attempts = call_with_retries(function, policy, sleep=clock.sleep, clock=clock, outage=outage)
    except SegmentationError as error:
        result, attempts = None, error.attempts
    return result, attempts, clock() - started


def test_frames_share_one_outage_so_a_dead_server_costs_one_patience_not_one_per_frame():
    """Ten frames against a server gone for good: the first rides out most of the patience, the
    next ones what is left of it (its last seconds, with short backoffs), the rest are tried
    once (no waiting): 60 s in all, not 10 x 60 s. Without a shared outage (a start-up
    question) every call counts from its own first failure, as before."""
    clock = FakeClock()
    outage = stream_logic.Outage(clock)
    policy = RetryPolicy(patience_s=60.0)
    first = frame(clock, policy, outage)
    assert first[0] is None and first[1] > 10 and 55.0 <= first[2] <= 60.0
    later = [frame(clock, policy, outage) for _ in range(9)]
    assert all(result is None for result, _, _ in later)
    assert [attempts for _, attempts, _ in later][-5:] == [1] * 5
    assert clock() <= 60.0  # the old per-frame clock: 10 x ~60 s
    assert 55.0 <= outage.lasted_s() <= 60.0
    own = [frame(clock, policy, None) for _ in range(2)]
    assert all(attempts > 10 and 55.0 <= took <= 60.0 for _, attempts, took in own)


def test_any_success_resets_the_outage_so_frames_wait_again():
    """A frame mid-retry keeps waiting when another frame gets through meanwhile (the servers
    answer again: a new outage starts at the next failure), and after a spent patience a
    success gives the next outage a whole patience again."""
    clock = FakeClock()
    outage = stream_logic.Outage(clock)
    policy = RetryPolicy(patience_s=25.0)
    others_done = []

    def sleep(seconds):  # another frame, sent meanwhile, gets through at t=20
        clock.sleep(seconds)
        if clock() >= 20.0 and not others_done:
            others_done.append(call_with_retries(lambda: "other", policy, sleep=clock.sleep, clock=clock, outage=outage))

    def down_until(t):
        def call():
            if clock() < t:
                raise DOWN
            return "done"
        return call

    result, attempts = call_with_retries(down_until(40.0), policy, sleep=sleep, clock=clock, outage=outage)
    assert result == "done" and 40.0 <= clock() <= 45.0 and others_done == [("other", 1)]
    assert outage.lasted_s() is None  # its own success ended the outage too
    # Down for good: the patience is spent, later frames fail at once...
    spent = [frame(clock, policy, outage) for _ in range(6)]
    assert spent[0][1] > 5 and spent[-1][1:] == (1, 0.0) and sum(took for _, _, took in spent) <= 25.0
    # ...until a frame gets through: the next outage gets the whole patience again.
    assert frame(clock, policy, outage, lambda: "back")[:2] == ("back", 1)
    _, attempts, took = frame(clock, policy, outage)
    assert attempts > 5 and 20.0 <= took <= 25.0


def test_final_errors_neither_start_nor_end_an_outage():
    """A bad frame is the server answering, but not a success: it is reported at once and
    leaves the outage as it was (none, or still running)."""
    clock = FakeClock()
    outage = stream_logic.Outage(clock)
    policy = RetryPolicy(patience_s=25.0)
    assert frame(clock, policy, outage, always(BAD_FRAME))[1:] == (1, 0.0)
    assert outage.lasted_s() is None
    assert frame(clock, policy, outage)[1] > 5  # the outage starts at this frame's failure
    clock.sleep(10.0)
    assert frame(clock, policy, outage, always(BAD_FRAME))[1:] == (1, 0.0)
    assert outage.lasted_s() > 25.0  # not reset
    assert frame(clock, policy, outage)[1:] == (1, 0.0)


def test_retries_still_cap_each_frame():
    """--retries N: at most N more attempts per frame within the patience, whatever the
    outage; a spent patience still wins over retries left."""
    clock = FakeClock()
    outage = stream_logic.Outage(clock)
    assert frame(clock, RetryPolicy(retries=2, patience_s=600.0), outage)[1] == 3
    assert frame(clock, RetryPolicy(retries=2, patience_s=600.0), outage)[1] == 3  # outage 1.5 s + 3 s: far from 600
    assert frame(clock, RetryPolicy(retries=5, patience_s=3.0), outage)[1:] == (1, 0.0)  # 4.5 s into a 3 s patience


def test_a_quiet_spell_starts_a_new_outage():
    """A client idle after a failed run (an API program between runs, a Dask worker between
    tasks): a frame sent much later, failing for a passing reason, gets the whole patience
    again instead of giving up on failures from long ago. Within an outage, frames started
    soon after a failure go on counting it."""
    clock = FakeClock()
    outage = stream_logic.Outage(clock)
    policy = RetryPolicy(patience_s=20.0)
    assert frame(clock, policy, outage)[1] > 5
    assert [frame(clock, policy, outage) for _ in range(6)][-1][1:] == (1, 0.0)  # right after: spent
    clock.sleep(stream_logic.QUIET_S + 1)
    _, attempts, took = frame(clock, policy, outage)
    assert attempts > 5 and 15.0 <= took <= 20.0


def test_the_frames_of_a_stream_share_its_outage():
    """Real threads: 40 frames, 4 in flight, a server down for good, patience 0.5 s. Once the
    first rounds of frames have spent it, the rest are tried once each (per-frame clocks
    retried every frame for 0.5 s). Counts attempts, not seconds: a busy machine only makes
    the patience run out sooner in frames."""
    def down(worker, item):
        raise DOWN

    items = [(i, lambda i=i: i) for i in range(40)]
    outcomes = list(ordered_stream(items, down, inflight=4, policy=RetryPolicy(backoff_s=0.02, patience_s=0.5)))
    assert [o.index for o in outcomes] == list(range(40)) and not any(o.ok for o in outcomes)
    assert sum(o.attempts == 1 for o in outcomes) >= 20, [o.attempts for o in outcomes]


def test_streams_sent_together_share_the_clients_outage():
    """Two streams of one client at once (a CLI's stream and another thread's, or one Dask
    worker's tasks): the patience spent by either is spent for both, and a stream started
    after it tries each frame once."""
    outage = stream_logic.Outage()
    policy = RetryPolicy(backoff_s=0.02, patience_s=0.5)
    results: dict[str, list] = {}

    def down(worker, item):
        raise DOWN

    def run(name):
        items = [(i, lambda i=i: i) for i in range(30)]
        results[name] = list(ordered_stream(items, down, inflight=3, policy=policy, outage=outage))

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == ["a", "b"] and all(len(r) == 30 for r in results.values())
    assert sum(o.attempts == 1 for r in results.values() for o in r) >= 30
    run("later")
    assert [o.attempts for o in results["later"]] == [1] * 30


def test_an_outage_is_told_once_past_a_few_seconds_with_its_error_and_its_end():
    """A frozen progress bar while the client waits out a restart looks like a hang: past
    ``NOTICE_AFTER_S`` the user is told why and for how long frames wait, once, and then
    when the server answers again. A blip shorter than that passes unsaid."""
    clock = FakeClock()
    outage = stream_logic.Outage(clock)
    said: list[str] = []
    notices = OutageNotices(outage, "127.0.0.1:8001", patience_s=600.0, say=said.append)

    def failing_for(seconds: float) -> None:
        for _ in range(int(seconds)):
            outage.failed(reason=str(DOWN) + "\n  debug details")
            notices.check()
            clock.sleep(1.0)

    failing_for(4)
    outage.succeeded()
    notices.check()
    assert said == []  # a blip
    failing_for(20)
    assert said == ["client: no answer from 127.0.0.1:8001 for 5 s (failed to connect to all addresses; Connection "
                    "refused); frames are tried again (until it has failed for 600 s, --patience)"]
    outage.succeeded()
    notices.check()
    notices.check()
    assert said[1:] == ["client: 127.0.0.1:8001 answers again, after about 19 s without"]


@pytest.mark.parametrize(("patience_s", "retries", "item", "rule"), [
    (600.0, 3, "frame", "frames are tried again (at most 3 more time(s) each, until it has failed for 600 s, --patience)"),
    (600.0, 0, "frame", "frames that fail are not tried again (--retries 0)"),
    (0.0, None, "frame", "--patience 0 s is spent, so each further frame is tried once"),
    (3.0, None, "chunk", "--patience 3 s is spent, so each further chunk is tried once"),
    (600.0, None, "chunk", "chunks are tried again (until it has failed for 600 s, --patience)"),
])
def test_an_outage_notice_says_what_the_retry_options_do_with_the_frames(patience_s, retries, item, rule):
    """It said frames were tried again for --patience even when --patience 0, --retries 0 or
    a patience shorter than the notice's wait meant they were not, and in segment-volume,
    whose requests are chunks."""
    clock = FakeClock()
    outage = stream_logic.Outage(clock)
    said: list[str] = []
    notices = OutageNotices(outage, "host:1", patience_s=patience_s, say=said.append, retries=retries, item=item)
    for _ in range(6):
        outage.failed(reason="down")
        notices.check()
        clock.sleep(1.0)
    assert said == [f"client: no answer from host:1 for 5 s (down); {rule}"]


# --- the CLI against a server stopped for good -----------------------------------------------

PATIENCE_S = 5
FRAMES = 48


@pytest.fixture
def own_server(tmp_path):
    """A server of this test's own (it is stopped mid-run): the 2D pipeline, one stub."""
    repository = copy_2d_repository(tmp_path / "model_repository", sliding_window_instances=1)
    config = ServerConfig(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0)
    running = TritonServer(config, log_path=tmp_path / "tritonserver.log").start()
    try:
        yield running
    finally:
        running.stop(timeout_s=2)


@pytest.mark.server
def test_a_server_stopped_for_good_ends_the_run_in_about_one_patience(own_server, rng, tmp_path):
    """48 frames, 2 in flight, --patience 5; the server stopped for good after 3 frames. The old
    per-frame patience waited 5 s per pair of frames left (~110 s); the run now exits 1 soon
    after one patience (bound: 60 s, loose for a busy machine), every frame written or listed
    failed, and --resume against the server started again completes it, equal to one
    uninterrupted run."""
    stack = make_stack(rng, FRAMES, (200, 230))
    np.save(tmp_path / "scan.npy", stack)
    out, record = tmp_path / "out", tmp_path / "out" / "scan.segment.json"
    command = [sys.executable, "-m", "client", "segment", str(tmp_path / "scan.npy"), "--out", str(out),
               "--url", own_server.grpc_url, "--token", own_server.config.token, "--inflight", "2",
               "--patience", str(PATIENCE_S), "--no-progress"]
    streaming = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        wait_for_record(record, 3, streaming, timeout_s=300)
        own_server.stop(timeout_s=2)  # for good: nothing listens on its ports any more
        stopped = time.monotonic()
        try:
            code = streaming.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the client still waits {time.monotonic() - stopped:.0f} s after the server stopped "
                        f"(--patience {PATIENCE_S}: the patience counted per frame?)")
        took = time.monotonic() - stopped
        stderr = streaming.stderr.read()
    finally:
        if streaming.poll() is None:
            streaming.kill()
            streaming.wait()
    assert code == 1, stderr
    assert took < 60
    saved = json.loads(record.read_text())
    failed = {int(k) for k in saved["failed"]}
    assert saved["done"] == FRAMES and failed and len(failed) < FRAMES, saved
    listed = stderr.split("client: failed frames:", 1)[1]
    runs = [[int(i) for i in match.split("..")] for match in re.findall(r"^  scan\.npy\[([\d.]+)\]", listed, re.MULTILINE)]
    assert failed == {i for run in runs for i in range(run[0], run[-1] + 1)}, listed
    [unfinished] = out.glob("scan_mask*.npy")  # its own name, or a partial one until the stack is finished
    masks = np.load(unfinished)
    assert all((masks[i] == 255).all() == (i in failed) for i in range(FRAMES))  # failed ones are filled
    own_server.restart()  # back, on the same ports
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    saved = json.loads(record.read_text())
    assert saved["done"] == FRAMES and saved["failed"] == {}
    assert f"{len(failed)} frame(s)" in resumed.stderr  # only the failed ones were sent again
    assert np.array_equal(np.load(out / "scan_mask.npy"), reference_masks(own_server, stack))


@pytest.mark.server
def test_a_run_says_when_its_server_stops_answering_and_when_it_answers_again(own_server, rng, tmp_path):
    """The server stopped mid-run, then started again on the same ports: the run says so
    (it looked hung for the whole outage), finishes every frame, equal to a run without one."""
    stack = make_stack(rng, FRAMES, (200, 230))
    np.save(tmp_path / "scan.npy", stack)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "client", "segment", str(tmp_path / "scan.npy"), "--out", str(out),
               "--url", own_server.grpc_url, "--token", own_server.config.token, "--inflight", "2", "--no-progress"]
    with running_with_stderr(command, cwd=REPO_ROOT) as (streaming, lines):
        wait_for_record(out / "scan.segment.json", 3, streaming, timeout_s=300)
        own_server.stop(timeout_s=2)
        deadline = time.monotonic() + 120
        while not any("no answer from" in line for line in lines) and time.monotonic() < deadline:
            assert streaming.poll() is None, "".join(lines)
            time.sleep(0.1)
        own_server.restart()
        code = streaming.wait(timeout=600)
    told = [line.strip() for line in lines if own_server.grpc_url in line]
    assert code == 0, "".join(lines)
    assert len(told) == 2 and told[0].startswith(f"client: no answer from {own_server.grpc_url} for "), told
    assert "--patience)" in told[0]
    assert told[1].startswith(f"client: {own_server.grpc_url} answers again, after about "), told
    assert np.array_equal(np.load(out / "scan_mask.npy"), reference_masks(own_server, stack))
