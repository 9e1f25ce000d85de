"""The Python API with what a notebook hands it, against the real server: a source refilling
one buffer, numpy scalars as options, tensors and byte orders numpy or tritonclient would
trip on, and a client closed or never closed. Each case either gives the result the plain
call gives, or a ValueError/TypeError before anything is sent."""

from __future__ import annotations

import gc
import re

import numpy as np
import pytest
import torch

from client import ChunkSettings, SegmentationClient, SegmentationError
from tests.helpers import frame_of, our_dev_shm_entries, registered_regions
from tests.test_transports import client_for


@pytest.fixture(scope="module")
def frames(rng) -> list[np.ndarray]:
    return [frame_of((96, 80), np.uint16, rng)[0] for _ in range(8)]


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_a_source_refilling_one_buffer_gets_each_frames_own_mask(server, frames, transport):
    """The stream reads ahead; without a copy taken as each frame is yielded, frames 0..2
    were sent after the buffer held a later frame, and got its mask."""
    def refilled():
        buffer = np.empty_like(frames[0])
        for frame in frames:
            buffer[...] = frame
            yield buffer

    with client_for(server, transport) as client:
        expected = [client.segment(frame).mask for frame in frames]
        outcomes = list(client.segment_stream(refilled(), inflight=4))
    assert all(outcome.ok for outcome in outcomes)
    assert all(np.array_equal(outcome.result.mask, mask) for outcome, mask in zip(outcomes, expected))


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_numpy_scalars_are_taken_as_options(server, frames, transport):
    """``frame.min()`` is a numpy scalar, which tritonclient refuses; that refusal was taken for
    a passing failure and retried for the whole patience."""
    frame = frames[0]
    with client_for(server, transport) as client:
        expected = client.segment(frame, overlap=0.5, intensity_min=float(frame.min()), intensity_max=float(frame.max()),
                                  probabilities=True)
        got = client.segment(frame, overlap=np.float32(0.5), intensity_min=frame.min(), intensity_max=frame.max(),
                             probabilities=np.bool_(True))
        [streamed] = client.segment_stream([frame], retries=0, patience_s=0, intensity_min=frame.min(),
                                           intensity_max=frame.max(), overlap=np.float32(0.5))
    assert np.array_equal(got.mask, expected.mask) and np.array_equal(got.probabilities, expected.probabilities)
    assert streamed.ok and np.array_equal(streamed.result.mask, expected.mask)


@pytest.mark.parametrize("call, error, message", [
    (lambda c, f: c.segment(f, probabilities="false"), ValueError, "probabilities must be True or False, got 'false'"),
    (lambda c, f: c.segment(f, overlap="0.5"), ValueError, "overlap must be a number, got '0.5'"),
    (lambda c, f: c.segment(f, sw_batch_size=2.5), ValueError, "sw_batch_size must be an integer"),
    (lambda c, f: c.segment_stream([f], overlapp=0.5), TypeError, "unknown option 'overlapp'; the options are probabilities, "),
    (lambda c, f: c.segment(f, network="unet2d_particles"), TypeError,
     "network is chosen per client, not per call: SegmentationClient(url, network=...)"),
    (lambda c, f: c.segment_stream([f], inflight=0), ValueError, "inflight must be an integer >= 1, got 0"),
    (lambda c, f: c.segment(torch.from_numpy(f.astype(np.float32)).bfloat16()), ValueError,
     "pixel type bfloat16 is not supported"),
    (lambda c, f: c.segment(f[:0]), ValueError, "frame is empty: shape [1, 0, 80]"),
    # Finite, but Inf once float32: the server refused "NaN or Inf pixels" the frame did not have.
    (lambda c, f: c.segment(f.astype(np.float64) * 1e300), ValueError,
     "pixel(s) beyond float32's range (|value| > 3.4e+38, the network computes in float32), such as "),
], ids=["string-boolean", "string-number", "float-integer", "misspelt-keyword", "network-per-call", "inflight-0", "bfloat16",
        "empty", "float64-beyond-float32"])
def test_bad_calls_are_refused_before_anything_is_sent(server, frames, call, error, message):
    """Raised by the call itself (a stream too, not at its first ``next()``); ``probabilities=
    "false"`` used to ask for the output the server then left out."""
    with client_for(server, "shm") as client:
        with pytest.raises(error, match=re.escape(message)):
            call(client, frames[0])
        assert client.regions_created == 0


def test_tensors_and_byte_orders_are_taken_as_their_values(server, frames):
    frame = frames[0]
    with client_for(server, "grpc") as client:
        expected = client.segment(frame.astype(np.float32)).mask
        assert np.array_equal(client.segment(frame.astype(">u2")).mask, client.segment(frame).mask)
        tensor = torch.from_numpy(frame.astype(np.float32)).requires_grad_()
        assert np.array_equal(client.segment(tensor).mask, expected)


@pytest.mark.parametrize("transport", ["grpc", "http", "shm"])
def test_results_are_writable_on_every_transport(server, frames, transport):
    with client_for(server, transport) as client:
        result = client.segment(frames[0], probabilities=True, contour=True)
    result.mask[result.mask == 2] = 0
    result.probabilities[0] = 1.0
    result.contour[:] = 0


def test_a_closed_client_takes_no_requests(server, frames):
    client = client_for(server, "grpc")
    client.segment(frames[0])
    client.close()
    with pytest.raises(SegmentationError, match="closed"):
        client.segment(frames[0])
    with pytest.raises(SegmentationError, match="closed"):
        client.segment_stream(frames)
    client.close()  # still idempotent


def test_an_unclosed_shared_memory_client_frees_its_regions_when_collected(server, frames):
    """It used to be kept alive by its exit hook, its regions with it, for the whole session."""
    files, registered = set(our_dev_shm_entries()), set(registered_regions(server))
    client = client_for(server, "shm")
    client.segment(frames[0])
    assert set(our_dev_shm_entries()) > files and set(registered_regions(server)) > registered
    del client
    gc.collect()
    assert set(our_dev_shm_entries()) <= files and set(registered_regions(server)) <= registered


def test_bad_volume_settings_are_refused_before_anything_is_sent(server, rng):
    volume = np.zeros((20, 30, 40), np.int16)
    with SegmentationClient(server.grpc_url, model="segment_3d") as client:
        with pytest.raises(TypeError, match=r"chunks must be a ChunkSettings .*got \(0, 0, 176\)"):
            client.segment_volume(volume, chunks=(0, 0, 176))
        with pytest.raises(ValueError, match="inflight must be an integer >= 1, got 0"):
            client.segment_volume(volume, inflight=0)
        with pytest.raises(ValueError, match="retries must be None or an integer >= 0, got -1"):
            client.segment_volume(volume, retries=-1)
        with pytest.raises(TypeError, match="progress must be a callable"):
            client.segment_volume(volume, progress="yes")
        with pytest.raises(ValueError, match="overlap must be a number, got '0.5'"):
            client.segment_volume(volume, overlap="0.5", chunks=ChunkSettings(shape=(0, 0, 160)))


def test_enumerate_frames_in_a_stream_is_refused_naming_the_tuple(server, frames):
    """``segment_stream(enumerate(frames))``: each frame failed with numpy's "setting an array
    element with a sequence ... inhomogeneous shape"; now the stream says what it got and takes."""
    with client_for(server, "grpc") as client:
        stream = client.segment_stream(enumerate(frames))
        with pytest.raises(TypeError, match=re.escape("item 0 is a tuple (int, ndarray)")) as refused:
            next(stream)
    message = str(refused.value)
    assert "segment_stream takes 2D arrays [H, W] or [C, H, W]" in message and "pass frames itself" in message


@pytest.mark.parametrize("shape", [(20, 96, 80), (2, 20, 96, 80)], ids=["DHW", "CDHW"])
def test_a_volume_given_to_the_2d_model_is_pointed_to_segment_3d(server, rng, shape):
    """[D, H, W] was refused as "takes 1 channel(s), IMAGE has 20", [C, D, H, W] as a frame of
    the wrong rank: neither said where volumes go."""
    volume = rng.random(shape, dtype=np.float32)
    with client_for(server, "grpc") as client:
        with pytest.raises((ValueError, SegmentationError), match=re.escape("model 'segment_3d'")) as refused:
            client.segment(volume)
        [outcome] = client.segment_stream([volume], retries=0)
    assert "segment_volume(volume)" in str(refused.value) and "segment-volume" in str(refused.value)
    assert not outcome.ok and "model 'segment_3d'" in outcome.error


def test_a_channels_last_picture_is_not_taken_for_a_volume(server, rng):
    with client_for(server, "grpc") as client, pytest.raises(SegmentationError, match="channels-last") as refused:
        client.segment(rng.random((96, 80, 3), dtype=np.float32))
    assert "segment_3d" not in str(refused.value)


def test_a_stream_to_servers_that_never_answer_yields_a_failed_outcome_per_frame(rng):
    """Its first question (the pipeline's dimensions) failing raised out of the first next(),
    where a client that had asked it before yielded failed outcomes: "failures become outcomes"."""
    from segserve.launcher import free_ports

    frames = [rng.random((40, 40), dtype=np.float32) for _ in range(3)]
    with SegmentationClient(f"127.0.0.1:{free_ports(1)[0]}") as client:
        outcomes = list(client.segment_stream([frames[0], (7, lambda: frames[1]), frames[2]], patience_s=0))
    assert [outcome.index for outcome in outcomes] == [0, 7, 2]
    assert all(not outcome.ok and outcome.retryable and outcome.result is None for outcome in outcomes)
    assert all("127.0.0.1" in outcome.error for outcome in outcomes), outcomes[0].error
