"""The fused 2D pipeline: preprocessing, sliding window and postprocessing in one process.

Its outputs equal the old three-step pipeline's (normalise -> blended logits -> postprocess of
a separate copy of the logits): MASK, PROBABILITIES, CONTOUR and keep_largest, in-process
against the old code path and on the real server against MONAI; the big tensors cross no
process boundary but the frame (in its wire dtype) and the outputs; the network is called
ceil(tiles / sw_batch_size) times per frame; warm-up runs before the server is ready.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval
from monai.transforms import KeepLargestConnectedComponent, LabelToContour

from client.api import SegmentationClient
from export.network_export import ExportSettings, gpu_variant, model_config
from segserve.backend.allocator import LARGE_TENSOR_BYTES
from segserve.network_spec import NetworkSpec, load_network_spec
from segserve.options import PipelineOptions
from segserve.postprocess import postprocess, softmax_in_place
from segserve.preprocess import normalize
from segserve.sliding_window import blended_logits, pad_batch, resolve_sw_batch_size
from tests.helpers import NETWORK_DEVICE, assert_matches_reference, frame_of

SPEC = NetworkSpec("net", "INPUT__0", "OUTPUT__0", in_channels=1, num_classes=3, tile_size=(16, 12), max_batch_size=32)


def toy_network(tiles: torch.Tensor) -> torch.Tensor:
    """Position-dependent logits with large foreground regions: [B, 1, h, w] -> [B, 3, h, w]."""
    ramp = torch.linspace(-1, 1, tiles.shape[-1])
    return torch.cat([0.5 - tiles, tiles * 2 - 1 + ramp, (tiles - 0.5) * 3], dim=1) * 4


def old_pipeline(frame: torch.Tensor, options: PipelineOptions):
    """The three steps as the old ensemble ran them: each step's output a fresh tensor (what
    crossed to the next process), postprocess computing a new softmax."""
    normalized = normalize(frame, options).clone()
    logits = blended_logits(normalized, SPEC, toy_network, options).clone()
    return postprocess(logits, options.probabilities, options.keep_largest, options.contour)


def fused_pipeline(frame: torch.Tensor, options: PipelineOptions):
    """What segment_2d now does in one process (``segmentation_outputs``): mask and contour
    from the logits, then the probabilities written over them (on the server, over their copy
    in the backend's shared memory)."""
    logits = blended_logits(normalize(frame, options), SPEC, toy_network, options)
    result = postprocess(logits, probabilities=False, keep_largest=options.keep_largest, contour=options.contour)
    if options.probabilities:
        result.probabilities = softmax_in_place(logits)
    return result


@pytest.mark.parametrize("shape", [(1, 301, 517), (1, 64, 48), (1, 9, 7)], ids=lambda s: f"{s[2]}x{s[1]}")
@pytest.mark.parametrize("flags", [dict(probabilities=True), dict(probabilities=True, keep_largest=True, contour=True),
                                   dict(keep_largest=True), dict(contour=True)],
                         ids=["probabilities", "all", "keep_largest", "contour"])
def test_fused_outputs_equal_the_old_pipeline(shape, flags):
    rng = np.random.default_rng(sum(shape))
    frame = torch.from_numpy(rng.integers(0, 4000, size=shape).astype(np.uint16))
    options = PipelineOptions(overlap=0.3, sw_batch_size=5, **flags)
    old, fused = old_pipeline(frame, options), fused_pipeline(frame, options)
    assert torch.equal(fused.mask, old.mask)
    if options.keep_largest:
        assert 0 < int((old.mask > 0).sum()) < old.mask.numel(), "the toy network should find some foreground"
    for name in ("probabilities", "contour"):
        old_value, fused_value = getattr(old, name), getattr(fused, name)
        assert (old_value is None) == (fused_value is None)
        if name == "contour" and old_value is not None:
            assert torch.equal(fused_value, old_value)
        elif old_value is not None:
            # Block-wise softmax: the same values as the whole tensor's within float32 rounding.
            torch.testing.assert_close(fused_value, old_value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 2048, 2048), (3, 4099, 2053), (2, 61, 47), (3, 40, 50, 61)])
def test_softmax_in_place_is_torch_softmax(shape):
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 5
    expected = torch.softmax(logits, dim=0)
    pointer = logits.data_ptr()
    result = softmax_in_place(logits)
    assert result.data_ptr() == pointer  # no second full-size tensor
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-7)


def test_pad_batch_appends_zero_tiles():
    tiles = torch.rand(3, 1, 4, 5)
    padded = pad_batch(tiles, 8)
    assert padded.shape == (8, 1, 4, 5) and torch.equal(padded[:3], tiles) and not padded[3:].any()
    assert pad_batch(tiles, 2) is tiles


def test_padded_batches_give_the_same_logits():
    """The sliding window with the last batch padded (the GPU setting) blends the same logits."""
    image = torch.rand(1, 45, 37, generator=torch.Generator().manual_seed(3))
    calls = []

    def padded_network(tiles):
        calls.append(pad_batch(tiles, 6).shape[0])
        return toy_network(pad_batch(tiles, 6))[: tiles.shape[0]]

    options = PipelineOptions(sw_batch_size=6)
    torch.testing.assert_close(blended_logits(image, SPEC, padded_network, options),
                               blended_logits(image, SPEC, toy_network, options), rtol=0, atol=0)
    assert set(calls) == {6}


def test_default_batch_size_per_device_bounded_by_network():
    assert resolve_sw_batch_size(PipelineOptions(), SPEC, default=128) == 32
    assert resolve_sw_batch_size(PipelineOptions(), SPEC, default=16) == 16
    assert resolve_sw_batch_size(PipelineOptions(sw_batch_size=3), SPEC, default=16) == 3


def test_export_warms_up_and_sizes_gpu_batches(tmp_path):
    settings = ExportSettings("UNet", {"spatial_dims": 2, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2]},
                              None, (32, 40), "tiny")
    config = model_config(settings, 1, 3)
    assert [(w.batch_size, w.inputs["INPUT__0"].zero_data) for w in config.model_warmup] == [(8, True)]
    assert list(config.model_warmup[0].inputs["INPUT__0"].dims) == [1, 32, 40]
    gpu = gpu_variant(config, settings)
    assert gpu.max_batch_size == 256 and [w.batch_size for w in gpu.model_warmup] == [128, 256]
    settings_3d = ExportSettings("UNet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2]},
                                 None, (16, 16, 16), "tiny3d")
    gpu_3d = gpu_variant(model_config(settings_3d, 1, 3), settings_3d)
    assert gpu_3d.max_batch_size == 32 and [w.batch_size for w in gpu_3d.model_warmup] == [8, 32]


def test_network_spec_reads_the_active_variant(model_repository):
    assert load_network_spec(model_repository, "unet2d_particles").max_batch_size == 32
    assert load_network_spec(model_repository, "unet2d_particles", "gpu").max_batch_size == 256
    assert load_network_spec(model_repository, "unet2d_particles", "no_such_variant").max_batch_size == 32


# --- on the real server -------------------------------------------------------------------


def test_pipelines_are_one_python_model_with_public_tensors_only(grpc, server):
    """segment_2d and segment_3d are one Python model each, not ensembles (an ensemble allocates
    every output once more): only the frame (wire dtype) and the outputs cross. The one-input
    segment_2d_uint16 is an ensemble of that one step."""
    headers = server.token_headers("grpc")
    outputs = {"MASK", "PROBABILITIES", "CONTOUR"}
    for name in ("segment_2d", "segment_3d"):
        config = grpc.get_model_config(name, headers=headers, as_json=True)["config"]
        assert config["backend"] == "python" and "ensemble_scheduling" not in config, name
        assert {tensor["name"] for tensor in config["input"]} == {"IMAGE", "IMAGE_UINT8", "IMAGE_UINT16", "IMAGE_INT16"}
        assert {tensor["name"] for tensor in config["output"]} == outputs
    steps = grpc.get_model_config("segment_2d_uint16", headers=headers, as_json=True)["config"]["ensemble_scheduling"]["step"]
    assert [step["model_name"] for step in steps] == ["segment_2d"]
    assert steps[0]["input_map"] == {"IMAGE_UINT16": "IMAGE_UINT16"}
    assert steps[0]["output_map"] == {name: name for name in outputs}


def test_server_contour_and_keep_largest_equal_monai_on_its_mask(server, default_network, rng):
    """PROBABILITIES within 1e-4 of MONAI in-process; keep_largest and CONTOUR exactly MONAI's
    transforms of the server's plain MASK (what the postprocess step did with it)."""
    # Two synthetic frames side by side (on these, the network's classes came out connected:
    # keep_largest left the mask as it was; the in-process tests cover the cleanup itself).
    frame = np.concatenate([frame_of((389, 300), np.uint16, rng), frame_of((389, 311), np.uint16, rng)], axis=2)
    with SegmentationClient(server.grpc_url) as client:
        plain = client.segment(frame, probabilities=True)
        cleaned = client.segment(frame, probabilities=True, keep_largest=True, contour=True)
    assert_matches_reference(plain, frame, default_network, PipelineOptions())
    assert np.array_equal(cleaned.probabilities, plain.probabilities)
    keep = KeepLargestConnectedComponent(applied_labels=[1, 2], is_onehot=False, independent=True)
    expected_mask = np.asarray(keep(torch.from_numpy(plain.mask)[None]))[0]
    assert set(np.unique(plain.mask)) == {0, 1, 2}
    assert np.array_equal(cleaned.mask, expected_mask)
    edges = np.asarray(LabelToContour()(torch.from_numpy(expected_mask)[None].float()))[0] != 0
    assert np.array_equal(cleaned.contour, np.where(edges, expected_mask, 0))


def tiles_of(shape: tuple[int, ...], tile: tuple[int, ...], overlap: float = 0.25) -> int:
    """Windows MONAI's sliding window visits on a frame of ``shape`` (after padding to a tile)."""
    size = tuple(max(s, t) for s, t in zip(shape, tile))
    return len(dense_patch_slices(size, tile, _get_scan_interval(size, tile, len(tile), (overlap,) * len(tile))))


def network_requests(grpc, network: str = "unet2d_particles") -> int:
    statistics = grpc.get_inference_statistics(network, as_json=True)["model_stats"][0]
    return int(statistics["inference_stats"]["success"].get("count", 0))


@pytest.mark.parametrize("sw_batch_size", [None, 32])
def test_bls_calls_per_frame(grpc, server, rng, sw_batch_size):
    """One BLS call per batch of sw_batch_size tiles (default 8 on the CPU), nothing else."""
    frame = frame_of((700, 900), np.uint16, rng)
    before = network_requests(grpc)
    options = {} if sw_batch_size is None else {"sw_batch_size": sw_batch_size}
    with SegmentationClient(server.grpc_url) as client:
        client.segment(frame, **options)
    expected = math.ceil(tiles_of((700, 900), (128, 128)) / (sw_batch_size or 8))
    assert network_requests(grpc) - before == expected


def test_warm_up_runs_before_the_models_are_ready(server):
    """The sliding window warms itself in initialize and the network through model_warmup, both
    done before Triton reports the model loaded (so before the server is ready). The stubs'
    lines carry the time they were written (they may reach the log after Triton's own)."""
    log = server.log_path.read_text()
    for model, warmed in (("segment_2d", "segment_2d: warm-up done"),
                          ("segment_3d", "segment_3d: warm-up done"),
                          ("unet2d_particles", "unet2d_particles: first batch of 8 tiles"),
                          ("unet3d_organs", "unet3d_organs: first batch of 8 tiles")):
        warmed_at = re.search(re.escape(warmed) + r".*? \(at (\d{4} [\d:.]+)\)", log)
        loaded_at = re.search(r"^I(\d{4} [\d:.]+) .*successfully loaded '" + re.escape(model) + "'", log, re.MULTILINE)
        assert warmed_at and loaded_at, (warmed, model)
        assert warmed_at.group(1) < loaded_at.group(1), (warmed_at.group(0), loaded_at.group(0))


def test_large_probabilities_computed_in_shared_memory_equal_monai(server, default_network, rng):
    """Probabilities of at least LARGE_TENSOR_BYTES are computed in the Python backend's shared
    memory (moved there before the response: docs/benchmarks.md, peak memory) and are still
    MONAI's within 1e-4, on an odd size; the server says it moved them (CPU tensors only)."""
    frame = frame_of((2049, 1603), np.uint16, rng)
    with SegmentationClient(server.grpc_url) as client:
        result = client.segment(frame, probabilities=True, contour=True)
    assert result.probabilities.nbytes >= LARGE_TENSOR_BYTES
    assert_matches_reference(result, frame, default_network, PipelineOptions())
    edges = np.asarray(LabelToContour()(torch.from_numpy(result.mask)[None].float()))[0] != 0
    assert np.array_equal(result.contour, np.where(edges, result.mask, 0))
    if NETWORK_DEVICE == "cpu":
        log = server.log_path.read_text()
        assert "large outputs are moved into the Python backend's shared memory" in log
        assert "did not move a BLS input" not in log
