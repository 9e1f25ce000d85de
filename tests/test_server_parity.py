"""The server's PROBABILITIES equal softmax of MONAI sliding_window_inference run in-process on
the same network (torch, from the checkpoint) within 1e-4, on odd sizes and every pixel type."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from client.api import SegmentationClient
from segserve.options import PipelineOptions
from tests.helpers import assert_matches_reference, frame_of
from training.synthetic import synthetic_slice




@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.uint16, np.int16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(777, 1001), (100, 60), (61, 47)], ids=lambda s: f"{s[1]}x{s[0]}")
def test_parity_odd_sizes_every_dtype(server, default_network, rng, shape, dtype):
    frame = frame_of(shape, dtype, rng)
    with SegmentationClient(server.grpc_url) as client:
        result = client.segment(frame, probabilities=True)
    assert result.mask.shape == shape and result.mask.dtype == np.uint8
    assert_matches_reference(result, frame, default_network, PipelineOptions())


def test_parity_2048_square(server, default_network, rng):
    frame = frame_of((2048, 2048), np.uint16, rng)
    with SegmentationClient(server.grpc_url) as client:
        result = client.segment(frame, probabilities=True)
    assert_matches_reference(result, frame, default_network, PipelineOptions())


@pytest.mark.parametrize(
    "options",
    [
        dict(overlap=0.5, blend="constant", sw_batch_size=3),
        dict(overlap=0.0, sw_batch_size=32),
        dict(intensity_min=0.0, intensity_max=0.9, overlap=0.6),
    ],
    ids=["overlap0.5-constant-batch3", "overlap0-batch32", "fixed-intensity-range"],
)
def test_parity_request_parameters(server, default_network, rng, options):
    frame = frame_of((301, 517), np.float32, rng)
    with SegmentationClient(server.grpc_url) as client:
        result = client.segment(frame, probabilities=True, **options)
    assert_matches_reference(result, frame, default_network, PipelineOptions(**options))


def test_masks_are_meaningful(server, rng):
    """The default network finds the synthetic pores and particles (not noise)."""
    image, truth = synthetic_slice((512, 768), rng, noise=0.08)
    with SegmentationClient(server.grpc_url) as client:
        mask = client.segment(image).mask
    for label in (1, 2):
        dice = 2 * np.sum((mask == label) & (truth == label)) / (np.sum(mask == label) + np.sum(truth == label))
        assert dice > 0.8, f"class {label} Dice {dice:.3f}"


def test_probabilities_sent_empty_unless_asked(grpc, rng):
    """Without probabilities=true the server skips the softmax and returns PROBABILITIES empty."""
    frame = frame_of((90, 110), np.float32, rng)
    image = grpcclient.InferInput("IMAGE", list(frame.shape), "FP32")
    image.set_data_from_numpy(frame)
    outputs = [grpcclient.InferRequestedOutput(name) for name in ("MASK", "PROBABILITIES", "CONTOUR")]
    response = grpc.infer("segment_2d", [image], outputs=outputs)
    assert response.as_numpy("MASK").shape == (90, 110)
    assert response.as_numpy("PROBABILITIES").shape == (0, 90, 110)
    assert response.as_numpy("CONTOUR").shape == (0, 110)


def merged_executions(grpc, network: str, tiles_per_request: int) -> int:
    """Executions of ``network`` that ran more tiles than one request carries."""
    statistics = grpc.get_inference_statistics(network, as_json=True)["model_stats"][0]
    return sum(int(b["compute_infer"]["count"]) for b in statistics.get("batch_stats", []) if int(b["batch_size"]) > tiles_per_request)


# Rounds of four concurrent frames given to their tiles to meet in one network execution. The
# network's batcher waits 200 us for more requests; on a machine whose cores other jobs hold,
# the four frames' tile requests can miss each other for a whole round (seen with two CPU hogs).
MERGE_ROUNDS = 5


def test_concurrent_frames_share_network_batches(server, grpc, default_network, rng):
    """Frames in flight together come back right, and their tiles meet in dynamic batches."""
    from concurrent.futures import ThreadPoolExecutor

    merged_before = merged_executions(grpc, "unet2d_particles", 4)

    def segment(frame):
        with SegmentationClient(server.grpc_url) as client:
            return client.segment(frame, probabilities=True, sw_batch_size=4)

    for _ in range(MERGE_ROUNDS):
        frames = [frame_of((300 + 17 * i, 400 - 13 * i), np.uint16, rng) for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(segment, frames))
        for frame, result in zip(frames, results):
            assert_matches_reference(result, frame, default_network, PipelineOptions(sw_batch_size=4))
        if merged_executions(grpc, "unet2d_particles", 4) > merged_before:
            break
    assert merged_executions(grpc, "unet2d_particles", 4) > merged_before, (
        f"no network execution merged tiles of two frames in {MERGE_ROUNDS} rounds of 4 concurrent frames")
