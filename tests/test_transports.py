"""Every transport against the real server: same outputs, regions reused and cleaned up."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as system_shm

from client import SegmentationClient, SegmentationError
from client.shared_memory import REGION_PREFIX, cuda_available
from tests.helpers import cli, our_dev_shm_entries, registered_regions
from training.synthetic import synthetic_slice, to_detector_counts

GPU = cuda_available()


def client_for(server, transport: str, **kwargs) -> SegmentationClient:
    url = server.http_url if transport == "http" else server.grpc_url
    return SegmentationClient(url, transport=transport, **kwargs)


@pytest.fixture(scope="module")
def odd_frames(rng) -> dict[str, np.ndarray]:
    image, _ = synthetic_slice((333, 257), rng)
    return {"uint16": to_detector_counts(image, np.uint16, rng), "float32": image.astype(np.float32)}


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
@pytest.mark.parametrize("transport", ["http", "shm", pytest.param("cuda-shm", marks=pytest.mark.skipif(not GPU, reason="no GPU"))])
def test_every_transport_gives_the_grpc_outputs(server, odd_frames, transport, dtype):
    frame = odd_frames[dtype]
    with client_for(server, "grpc") as grpc:
        expected = grpc.segment(frame, probabilities=True, contour=True)
    with client_for(server, transport) as client:
        got = client.segment(frame, probabilities=True, contour=True)
    assert got.mask.shape == (333, 257)
    assert np.array_equal(got.mask, expected.mask)
    assert np.array_equal(got.contour, expected.contour)
    np.testing.assert_array_equal(got.probabilities, expected.probabilities)


@pytest.mark.skipif(not GPU, reason="no GPU")
def test_cuda_shm_sends_a_gpu_tensor_without_a_host_copy(server, odd_frames):
    import torch

    frame = odd_frames["uint16"]
    with client_for(server, "grpc") as grpc:
        expected = grpc.segment(frame).mask
    with client_for(server, "cuda-shm") as client:
        assert np.array_equal(client.segment(torch.from_numpy(frame.astype(np.int16)).cuda()).mask,
                              client.segment(frame.astype(np.int16)).mask)
        assert np.array_equal(client.segment(torch.from_numpy(frame.astype(np.float32)).cuda()).mask,
                              client.segment(frame.astype(np.float32)).mask)
    assert expected.shape == frame.shape


@pytest.mark.skipif(GPU, reason="this machine has a GPU")
def test_cuda_shm_without_a_gpu_says_so(server, odd_frames):
    """Refused when the client is made, before any request: not once per frame."""
    with pytest.raises(SegmentationError, match=r"CUDA shared memory needs a GPU.*transport='shm' \(--transport shm\)"):
        client_for(server, "cuda-shm")
    assert registered_regions(server, "cuda") == []


@pytest.mark.skipif(GPU, reason="this machine has a GPU")
def test_the_cli_refuses_cuda_shm_without_a_gpu_up_front(server, tmp_path, rng):
    """It failed each frame with the CUDA driver's words; now one line, and nothing written."""
    for name in "ab":
        np.save(tmp_path / f"{name}.npy", to_detector_counts(synthetic_slice((64, 64), rng)[0], np.uint16, rng))
    out = tmp_path / "out"
    run = subprocess.run(cli(server, str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--out", str(out),
                             transport="cuda-shm"), capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert len(run.stderr.splitlines()) == 1, run.stderr
    assert run.stderr.startswith("client: error: CUDA shared memory needs a GPU") and "--transport shm" in run.stderr
    assert run.stdout == "" and not out.exists()


def test_shm_regions_are_made_once_per_slot_reused_and_removed(server, rng):
    frames = [to_detector_counts(synthetic_slice((120, 90), rng)[0], np.uint16, rng) for _ in range(24)]
    with client_for(server, "shm") as client:
        outcomes = list(client.segment_stream(frames, inflight=3))
        assert all(o.ok for o in outcomes)
        assert client.regions_created == 3 * 2  # IMAGE and MASK per slot, for 24 frames
        live = registered_regions(server)
        assert len(live) == 6 and all(name.startswith(f"{REGION_PREFIX}_{os.getpid()}_") for name in live)
        assert len(our_dev_shm_entries()) == 6
        # A much larger frame grows only the regions that need it.
        client.segment(np.zeros((1500, 1200), np.uint16))
        assert client.regions_created == 3 * 2 + 2
    assert registered_regions(server) == []
    assert our_dev_shm_entries() == []


def test_regions_of_a_dead_client_are_removed_by_the_next_one(server, odd_frames):
    dead_pid = int(subprocess.check_output(["sh", "-c", "echo $$"]))  # a pid that has exited
    name = f"{REGION_PREFIX}_{dead_pid}_0_image_1"
    region = system_shm.create_shared_memory_region(name, f"/{name}", 4096)
    with grpcclient.InferenceServerClient(server.grpc_url) as control:
        control.register_system_shared_memory(name, f"/{name}", 4096, headers=server.token_headers())
    # What a SIGKILLed client leaves: registered on the server and present in /dev/shm.
    assert name in registered_regions(server) and name in our_dev_shm_entries()
    region._mpsm_handle.close()
    with client_for(server, "shm") as client:
        assert client.stale_regions_removed == [name]
        client.segment(odd_frames["uint16"])
    assert registered_regions(server) == [] and our_dev_shm_entries() == []


def test_a_dead_clients_region_still_in_use_is_removed_once_its_request_ends(server, rng):
    """A client killed with a frame in flight leaves a region the server still reads: the next
    client waits for that request instead of failing on "in use"."""
    dead_pid = int(subprocess.check_output(["sh", "-c", "echo $$"]))  # a pid that has exited
    name = f"{REGION_PREFIX}_{dead_pid}_0_image_1"
    frame = to_detector_counts(synthetic_slice((2048, 2048), rng)[0], np.uint16, rng)[np.newaxis]
    region = system_shm.create_shared_memory_region(name, f"/{name}", frame.nbytes)
    system_shm.set_shared_memory_region(region, [frame])
    finished = threading.Event()
    with grpcclient.InferenceServerClient(server.grpc_url) as control:
        control.register_system_shared_memory(name, f"/{name}", frame.nbytes, headers=server.token_headers())
        image = grpcclient.InferInput("IMAGE_UINT16", list(frame.shape), "UINT16")
        image.set_shared_memory(name, frame.nbytes)
        results = []
        control.async_infer("segment_2d", [image], callback=lambda result, error: (results.append((result, error)), finished.set()))
        time.sleep(0.5)  # the request is in the server (a 2048² frame takes over a second here)
        assert not finished.is_set()
        with client_for(server, "shm") as client:
            assert client.stale_regions_removed == [name]
            assert finished.is_set()  # it waited for the request, which then let the region go
        finished.wait(60)
    region._mpsm_handle.close()
    assert results and results[0][1] is None, results
    assert registered_regions(server) == [] and our_dev_shm_entries() == []


def test_unknown_transport_is_refused_before_connecting():
    with pytest.raises(ValueError, match="transport must be one of grpc, http, shm, cuda-shm, got 'udp'"):
        SegmentationClient(transport="udp")


def test_two_shm_clients_in_one_process_do_not_collide(server, odd_frames):
    with client_for(server, "shm") as first, client_for(server, "shm") as second:
        masks = [first.segment(odd_frames["uint16"]).mask, second.segment(odd_frames["uint16"]).mask]
        assert len(registered_regions(server)) == 4
    assert np.array_equal(*masks)
    assert registered_regions(server) == [] and our_dev_shm_entries() == []


def test_one_shm_client_shared_by_threads_gives_each_frame_its_own_result(server, rng):
    """Streams and single calls from four threads on one shared-memory client at once: each
    call owns its slots (connection and regions), so no frame reads another's outputs."""
    frames = [to_detector_counts(synthetic_slice((96 + 8 * i, 120), rng)[0], np.uint16, rng) for i in range(12)]
    with SegmentationClient(server.grpc_url) as reference:
        expected = [reference.segment(frame).mask for frame in frames]
    results: dict[tuple[int, int], np.ndarray] = {}
    errors: list[str] = []

    def work(thread: int) -> None:
        try:
            if thread % 2:
                for outcome in client.segment_stream(frames, inflight=3):
                    assert outcome.ok, outcome.error
                    results[thread, outcome.index] = outcome.result.mask
            else:
                for index, frame in enumerate(frames):
                    results[thread, index] = client.segment(frame).mask
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(f"thread {thread}: {error}")

    with SegmentationClient(server.grpc_url, transport="shm") as client:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        slots_made = len(client._slots)
    assert errors == [] and len(results) == 4 * len(frames)
    assert all(np.array_equal(mask, expected[index]) for (_, index), mask in results.items())
    assert slots_made <= 2 * 3 + 2  # two streams of 3 slots and two single callers at most


def _use_in_forked_child(client: SegmentationClient, frame: np.ndarray, answers) -> None:
    """Run in a child forked from the process that made ``client``: what each call gave."""
    outcome = {}
    for name, call in [("segment", lambda: client.segment(frame)), ("live_servers", client.live_servers)]:
        try:
            call()
            outcome[name] = "it worked"
        except SegmentationError as error:
            outcome[name] = str(error)
    client.close()  # the child's copy: must leave the parent's regions alone
    answers.put(outcome)


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_a_client_used_in_a_forked_process_is_refused_and_the_parents_still_works(server, odd_frames, transport):
    """Two processes writing frames into the same shared-memory regions got each other's masks,
    and the child's copy freed the parent's regions: a forked child is told to make its own."""
    import multiprocessing

    frame = odd_frames["uint16"]
    with client_for(server, transport) as client:
        expected = client.segment(frame).mask
        regions_before = registered_regions(server)
        fork = multiprocessing.get_context("fork")
        answers = fork.Queue()
        child = fork.Process(target=_use_in_forked_child, args=(client, frame, answers))
        child.start()
        outcome = answers.get(timeout=120)
        child.join(timeout=60)
        assert child.exitcode == 0
        for name in ("segment", "live_servers"):
            assert f"made in process {os.getpid()}" in outcome[name] and "forked from it" in outcome[name], outcome
        assert registered_regions(server) == regions_before
        assert np.array_equal(client.segment(frame).mask, expected)
    assert registered_regions(server) == [] and our_dev_shm_entries() == []


def some_frames(rng, count: int) -> list[np.ndarray]:
    return [to_detector_counts(synthetic_slice((120, 90), rng)[0], np.uint16, rng) for _ in range(count)]


STREAM_CLOSED = "closed while a segment_stream over it was running"


def test_leaving_the_with_block_ends_a_half_consumed_stream_and_frees_its_regions(server, rng):
    """close() (the end of the ``with``) with a stream still live: it went on through the closed
    client, making regions that stayed registered and in /dev/shm; now it ends, saying why."""
    with client_for(server, "shm") as client:
        stream = client.segment_stream(some_frames(rng, 12), inflight=3)
        assert next(stream).ok
    with pytest.raises(SegmentationError, match=STREAM_CLOSED):
        next(stream)
    assert registered_regions(server) == [] and our_dev_shm_entries() == []


def test_closing_the_client_from_another_thread_ends_its_stream_and_frees_its_regions(server, rng):
    frames = some_frames(rng, 4)
    client = client_for(server, "shm")
    stream = client.segment_stream((frames[i % 4] for i in range(400)), inflight=3)
    outcomes, errors, started = [], [], threading.Event()

    def consume() -> None:
        try:
            for outcome in stream:
                outcomes.append(outcome)
                started.set()
        except SegmentationError as error:
            errors.append(str(error))

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert started.wait(120)
    client.close()  # while the consumer goes on taking outcomes
    consumer.join(timeout=120)
    assert not consumer.is_alive()
    assert len(errors) == 1 and STREAM_CLOSED in errors[0], errors
    assert 1 <= len(outcomes) < 400 and all(o.ok for o in outcomes)
    assert registered_regions(server) == [] and our_dev_shm_entries() == []
