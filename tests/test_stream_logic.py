"""Ordering, retries and run records of the streaming client, without a server."""

from __future__ import annotations

import json
import random
import threading
import time

import numpy as np
import pytest

import client.stream as stream_logic
from client.connection import SegmentationError
from client.stacks import RunRecord, is_stack_shape, open_sources, split_hdf5_argument
from client.stream import RetryPolicy, _WorkerPool, call_with_retries, ordered_stream, wait_for_recovery
from tests.helpers import FakeClock


def test_outcomes_come_back_in_input_order_whatever_the_finishing_order():
    delays = random.Random(5).choices([0.0, 0.001, 0.02], k=60)
    busy_workers: set[int] = set()
    lock = threading.Lock()

    def process(worker, frame):
        with lock:
            assert worker not in busy_workers, "a slot served two requests at once"
            busy_workers.add(worker)
        time.sleep(delays[frame])
        with lock:
            busy_workers.discard(worker)
        return frame * 10

    items = [(i, lambda i=i: i) for i in range(60)]
    outcomes = list(ordered_stream(items, process, inflight=4))
    assert [o.index for o in outcomes] == list(range(60))
    assert [o.result for o in outcomes] == [10 * i for i in range(60)]


def test_a_failed_load_or_request_is_an_outcome_not_a_lost_frame():
    def load(i):
        if i == 3:
            raise OSError("truncated file")
        return i

    def process(worker, frame):
        if frame == 5:
            raise SegmentationError("IMAGE contains NaN or Inf pixels", retryable=False)
        return frame

    outcomes = list(ordered_stream([(i, lambda i=i: load(i)) for i in range(8)], process, inflight=3,
                                   policy=RetryPolicy(retries=2, backoff_s=0)))
    assert [o.index for o in outcomes] == list(range(8))
    assert [o.ok for o in outcomes] == [True, True, True, False, True, False, True, True]
    assert "truncated file" in outcomes[3].error and outcomes[3].attempts == 0
    assert "NaN" in outcomes[5].error and outcomes[5].attempts == 1  # not retryable: tried once


@pytest.mark.parametrize("inflight", [1, 2, 4])
@pytest.mark.parametrize("fails_at", [0, 1, 3, 8, 21])
def test_a_failing_source_ends_the_stream_but_loses_no_finished_frame(fails_at, inflight):
    """Every frame taken before the source raised is yielded, in order, then the source's own
    exception (same object, its traceback still reaching into the source)."""
    error = TimeoutError("detector")
    delays = random.Random(fails_at).choices([0.0, 0.002, 0.01], k=fails_at)

    def frames():
        for i in range(40):
            if i == fails_at:
                raise error
            yield i, (lambda i=i: i)

    def process(worker, frame):
        time.sleep(delays[frame])
        return frame * 10

    got = []
    with pytest.raises(TimeoutError) as caught:
        for outcome in ordered_stream(frames(), process, inflight=inflight):
            got.append((outcome.index, outcome.result))
    assert got == [(i, 10 * i) for i in range(fails_at)]
    assert caught.value is error and caught.traceback[-1].name == "frames"


def test_a_load_raising_anything_fails_only_that_frame():
    def load(i):
        if i == 2:
            raise RuntimeError("decoder crashed")
        return i

    outcomes = list(ordered_stream([(i, lambda i=i: load(i)) for i in range(6)], lambda w, f: f, inflight=2))
    assert [o.index for o in outcomes] == list(range(6))
    assert [o.ok for o in outcomes] == [True, True, False, True, True, True]
    assert outcomes[2].error == "cannot read frame: decoder crashed" and outcomes[2].attempts == 0


@pytest.mark.parametrize("where", ["load", "source"])
@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_from_the_frames_stops_the_stream_at_once(where, interrupt):
    def load(i):
        if where == "load" and i == 2:
            raise interrupt()
        return i

    def frames():
        for i in range(10):
            if where == "source" and i == 2:
                raise interrupt()
            yield i, (lambda i=i: load(i))

    got = []
    with pytest.raises(interrupt):
        for outcome in ordered_stream(frames(), lambda w, f: f, inflight=4):
            got.append(outcome.index)
    assert got == []  # frames 0 and 1 were in flight, not waited for


def test_a_worker_busy_past_the_grace_is_reported_so_its_slot_is_not_reused():
    """Breaking out of a stream waits ``stop_grace_s`` for the requests in flight, then names
    the workers still in one (their slots must not serve anyone else); on a normal end, none."""
    release = threading.Event()
    calls: list[tuple[int, int]] = []

    def process(worker, frame):
        calls.append((worker, frame))
        if frame == 1:
            release.wait(5)
        return frame

    reported: list[set[int]] = []
    stream = ordered_stream([(i, lambda i=i: i) for i in range(20)], process, inflight=2,
                            on_stopped=reported.append, stop_grace_s=0.2)
    try:
        assert next(stream).index == 0
        started = time.monotonic()
        stream.close()
        assert time.monotonic() - started < 2.0
        [blocked] = [worker for worker, frame in calls if frame == 1]
        assert reported == [{blocked}]
        calls_at_stop = list(calls)
    finally:
        release.set()
    time.sleep(0.2)
    assert calls == calls_at_stop  # the released worker took no further frame
    reported.clear()
    assert len(list(ordered_stream([(i, lambda i=i: i) for i in range(9)], process, inflight=3,
                                   on_stopped=reported.append))) == 9
    assert reported == [set()]


def test_a_worker_takes_no_job_after_stop():
    """A job still queued when the pool stops is dropped, even by a worker that ends its
    current job after the grace."""
    release = threading.Event()
    calls: list[int] = []

    def process(worker, frame):
        calls.append(frame)
        release.wait(5)
        return frame

    pool = _WorkerPool(process, 1, RetryPolicy(), time.sleep, stream_logic.Outage())
    pool.submit(0, 0, "first")
    pool.submit(1, 1, "queued")
    while not calls:
        time.sleep(0.01)
    assert pool.stop(0.1) == {0}
    release.set()
    pool.threads[0].join(5)
    assert not pool.threads[0].is_alive() and calls == ["first"]


def test_retryable_errors_are_retried_with_doubling_backoff():
    failures = iter([SegmentationError("unavailable", retryable=True)] * 2)
    sleeps = []

    def flaky():
        error = next(failures, None)
        if error:
            raise error
        return "done"

    assert call_with_retries(flaky, RetryPolicy(retries=3, backoff_s=0.5), sleep=sleeps.append) == ("done", 3)
    assert sleeps == [0.5, 1.0]


def test_retries_are_bounded():
    def always_down():
        raise SegmentationError("connection refused", retryable=True)

    with pytest.raises(SegmentationError) as caught:
        call_with_retries(always_down, RetryPolicy(retries=2, backoff_s=0.1), sleep=lambda s: None)
    assert caught.value.attempts == 3


def test_default_patience_is_time_based_and_outlasts_a_long_restart():
    """A server away for 200 s (a full restart on a busy machine): the frame waits it out with
    the default policy, retrying at most 5 s apart; a server away longer than the patience
    fails the frame once the patience is spent."""
    clock = FakeClock()

    def back_after(seconds):
        def call():
            if clock() < seconds:
                raise SegmentationError("failed to connect to all addresses", retryable=True)
            return "done"
        return call

    result, attempts = call_with_retries(back_after(200.0), RetryPolicy(), sleep=clock.sleep, clock=clock)
    assert result == "done" and 200.0 <= clock() <= 205.0 and max(clock.sleeps) == 5.0 and attempts > 40
    clock = FakeClock()
    with pytest.raises(SegmentationError) as caught:
        call_with_retries(back_after(10_000.0), RetryPolicy(patience_s=60.0), sleep=clock.sleep, clock=clock)
    assert 55.0 <= clock() <= 60.0 and caught.value.attempts == len(clock.sleeps) + 1


def test_a_retry_follows_the_server_back_rather_than_the_next_5_s_step():
    """A server restarting from 0 to 200.6 s (not ready meanwhile): with readiness watched,
    the frame is retried within a quarter second of its return; without, up to 5 s later.
    A server that stays ready (the failure was not about readiness) gets the whole backoff."""
    def retried_at(watch_readiness: bool) -> float:
        clock = FakeClock()

        def call():
            if clock() < 200.6:
                raise SegmentationError("failed to connect to all addresses", retryable=True)
            return "done"

        def wait(seconds: float) -> None:
            if watch_readiness:
                wait_for_recovery(seconds, lambda: clock() >= 200.6, sleep=clock.sleep, clock=clock)
            else:
                clock.sleep(seconds)

        call_with_retries(call, RetryPolicy(), sleep=wait, clock=clock)
        return clock()

    assert 200.6 <= retried_at(True) <= 200.85 < 201.0 < retried_at(False)
    clock = FakeClock()
    wait_for_recovery(5.0, lambda: True, sleep=clock.sleep, clock=clock)
    assert clock() == pytest.approx(5.0)


def test_final_errors_are_not_retried_whatever_the_patience():
    clock = FakeClock()

    def bug():
        raise SegmentationError("division by zero", retryable=False)

    with pytest.raises(SegmentationError) as caught:
        call_with_retries(bug, RetryPolicy(), sleep=clock.sleep, clock=clock)
    assert caught.value.attempts == 1 and clock.sleeps == []


def test_bad_stream_settings_are_refused():
    with pytest.raises(ValueError, match="inflight"):
        list(ordered_stream([], lambda w, f: f, inflight=0))
    with pytest.raises(ValueError, match="retries"):
        RetryPolicy(retries=-1)
    with pytest.raises(ValueError, match="patience_s"):
        RetryPolicy(patience_s=-1)


def test_run_record_resumes_after_the_done_prefix_and_retries_failures(tmp_path):
    settings = {"network": "unet", "overlap": 0.5}
    record = RunRecord(tmp_path / "x.segment.json", 10, settings)
    for index in range(6):
        record.mark(index, "bad frame" if index == 2 else None)
    record.save()
    resumed = RunRecord.load(tmp_path / "x.segment.json", 10, settings)
    assert resumed.remaining() == [2, 6, 7, 8, 9]
    assert not RunRecord.is_complete_file(tmp_path / "x.segment.json")
    # The refusal names what differs and the way out (--resume again would loop).
    with pytest.raises(ValueError, match=r"other settings \(overlap 0.5 there, 0.25 now\).*add --overwrite"):
        RunRecord.load(tmp_path / "x.segment.json", 10, {"network": "unet", "overlap": 0.25})
    with pytest.raises(ValueError, match=r"network 'unet' there, 'other' now"):
        RunRecord.load(tmp_path / "x.segment.json", 10, {"network": "other", "overlap": 0.5})
    with pytest.raises(ValueError, match="had 10 frames, this input 12; add --overwrite"):
        RunRecord.load(tmp_path / "x.segment.json", 12, settings)
    assert json.loads((tmp_path / "x.segment.json").read_text())["failed"] == {"2": "bad frame"}
    assert RunRecord(tmp_path / "empty.segment.json", 0, settings).is_finished()  # a stack of no frames


def test_a_run_record_takes_the_servers_defaults_named_for_the_run_that_named_none(tmp_path):
    """A record of options left to the server (None) was refused when --resume named their
    defaults ("overlap None there, 0.25 now"); the tiles per network call are speed only."""
    left = {"network": "unet", "overlap": None, "blend": None, "keep_largest": None, "sw_batch_size": None}
    RunRecord(tmp_path / "x.segment.json", 4, left).save()
    named = {"network": "unet", "overlap": 0.25, "blend": "gaussian", "keep_largest": False, "sw_batch_size": 3}
    assert RunRecord.load(tmp_path / "x.segment.json", 4, named).remaining() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"other settings \(blend 'gaussian' there, 'constant' now, overlap 0.25 there, "
                                         r"0.5 now\)"):
        RunRecord.load(tmp_path / "x.segment.json", 4, {**named, "overlap": 0.5, "blend": "constant"})


def test_a_run_record_from_before_networks_were_resolved_resumes_with_any_network(tmp_path):
    """Records once kept ``network: None`` for the server's default; which network that was
    is unknown, so it is not held against the resume (as before)."""
    RunRecord(tmp_path / "x.segment.json", 4, {"network": None, "overlap": 0.5}).save()
    resumed = RunRecord.load(tmp_path / "x.segment.json", 4, {"network": "unet", "overlap": 0.5})
    assert resumed.remaining() == [0, 1, 2, 3]


def test_rgb_tiffs_have_their_samples_as_channels(tmp_path):
    """RGB samples are stored last ([H, W, 3]); frames take channels first, and one RGB image
    is one frame. For a one-channel network it is made grey, as PNG colour frames are."""
    import tifffile

    from client.frames import read_frame

    rgb = np.arange(40 * 50 * 3, dtype=np.uint16).reshape(40, 50, 3)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    assert np.array_equal(read_frame(tmp_path / "rgb.tif"), np.moveaxis(rgb, -1, 0))
    [single] = open_sources([str(tmp_path / "rgb.tif")], in_channels=3)
    assert single.kind == "files" and single.load(0).shape == (3, 40, 50)
    [grey] = open_sources([str(tmp_path / "rgb.tif")], in_channels=1)
    assert grey.kind == "files" and grey.load(0).shape == (40, 50) and grey.load(0).dtype == np.uint16
    stack = np.stack([rgb, rgb + 1])
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="rgb")
    [source] = open_sources([str(tmp_path / "stack.tif")], in_channels=3)
    assert source.kind == "tiff" and source.count == 2 and source.frame_shape == (3, 40, 50)
    assert np.array_equal(source.load(1), np.moveaxis(rgb + 1, -1, 0))


def test_stack_or_frame_is_decided_by_rank_and_channels(tmp_path):
    assert is_stack_shape((5, 64, 64), in_channels=1)
    assert not is_stack_shape((64, 64), in_channels=1)
    assert not is_stack_shape((3, 64, 64), in_channels=3)
    assert is_stack_shape((5, 3, 64, 64), in_channels=3)
    np.save(tmp_path / "one.npy", np.zeros((8, 8), np.float32))
    np.save(tmp_path / "many.npy", np.zeros((4, 8, 8), np.float32))
    sources = open_sources([str(tmp_path / "one.npy"), str(tmp_path / "many.npy"), str(tmp_path / "one.npy")], 1)
    assert [(s.kind, s.count) for s in sources] == [("files", 1), ("npy", 4), ("files", 1)]
    assert split_hdf5_argument("scan.h5:/entry/data") is not None
    assert split_hdf5_argument("C:/frames/a.tif") is None
