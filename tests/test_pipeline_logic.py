"""Unit tests of the server-side steps, without a server."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from monai.transforms import KeepLargestConnectedComponent, LabelToContour

from segserve.network_spec import NetworkSpec
from segserve.options import InputError, OptionError, PipelineOptions
from segserve.postprocess import class_mask, keep_largest_components, label_contour, postprocess
from segserve.preprocess import normalize, validate_frame
from segserve.sliding_window import blended_logits, resolve_sw_batch_size, window_count, window_limit

SPEC = NetworkSpec("net", "INPUT__0", "OUTPUT__0", in_channels=1, num_classes=3, tile_size=(16, 12), max_batch_size=4)


def toy_network(tiles: torch.Tensor) -> torch.Tensor:
    """A position-dependent 'network', so blending mistakes show: [B, 1, h, w] -> [B, 3, h, w]."""
    ramp = torch.linspace(0, 1, tiles.shape[-1])
    return torch.cat([tiles, tiles * ramp, 1 - tiles], dim=1)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_normalize_uses_frame_percentiles(dtype):
    frame = np.random.default_rng(0).integers(0, 120, size=(1, 50, 70)).astype(dtype)
    low, high = np.percentile(frame.astype(np.float64), [1, 99])
    expected = np.clip((frame - low) / (high - low), 0, 1)
    result = normalize(torch.from_numpy(frame), PipelineOptions())
    assert result.dtype == torch.float32 and type(result) is torch.Tensor
    np.testing.assert_allclose(result.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("bright", [1, 100, 1000])
def test_a_sparse_frame_is_scaled_by_its_min_and_max_and_a_constant_one_is_zero(bright):
    """Where under 1 % of the pixels are off the background, the 1st and 99th percentiles are
    equal: MONAI's scaler then passed the raw intensities, unclipped, to the network (a bead of
    1000 counts went in as 1000), so masks hung on the detector's scale."""
    frame = torch.full((1, 60, 50), 3, dtype=torch.int16)
    frame[0, 20:23, 30:33] = 3 + bright  # 9 of 3000 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MONAI's "Divide by zero (a_min == a_max)"
        scaled = normalize(frame, PipelineOptions())
        constant = normalize(torch.full((1, 20, 30), 7, dtype=torch.int16), PipelineOptions())
    assert torch.equal(scaled, (frame - 3).float() / bright)
    assert torch.equal(constant, torch.zeros(1, 20, 30))


def test_normalize_fixed_range_clips():
    frame = torch.tensor([[[0.0, 50.0, 100.0, 200.0]]])
    result = normalize(frame, PipelineOptions(intensity_min=50, intensity_max=150))
    assert result.tolist() == [[[0.0, 0.0, 0.5, 1.0]]]


@pytest.mark.parametrize(
    "frame, message",
    [
        (torch.zeros(5, 5), "3 dimensions"),
        (torch.zeros(1, 0, 5), "empty"),
        (torch.zeros(1, 5, 5, dtype=torch.int32), "not supported"),
        (torch.tensor([[[1.0, float("inf")]]]), "NaN or Inf"),
        (torch.zeros(1, 100, 100), "above the limit"),
    ],
)
def test_validate_frame_refuses(frame, message):
    with pytest.raises(InputError, match=message):
        validate_frame(frame, spatial_dims=2, max_pixels=5000)


@pytest.mark.parametrize("shape", [(1, 37, 29), (1, 5, 3), (1, 16, 12)])
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_blended_logits_is_monai_sliding_window(shape, blend):
    image = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    options = PipelineOptions(overlap=0.4, blend=blend, sw_batch_size=3)
    result = blended_logits(image, SPEC, toy_network, options)
    expected = sliding_window_inference(image[None], SPEC.tile_size, 3, toy_network, overlap=0.4, mode=blend)[0]
    assert result.shape == (3, *shape[1:])
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


def test_blended_logits_checks_channels_and_rank():
    with pytest.raises(InputError, match="takes 1 channel"):
        blended_logits(torch.rand(2, 20, 20), SPEC, toy_network, PipelineOptions())
    with pytest.raises(InputError, match="2D"):
        blended_logits(torch.rand(1, 4, 20, 20), SPEC, toy_network, PipelineOptions())


@pytest.mark.parametrize("tile", [(16, 12), (64, 64, 64), (128, 128)])
def test_window_count_is_the_windows_monai_runs(tile):
    """Counted as MONAI lists them (frames padded to the tile first, as sliding_window_inference does)."""
    rng = np.random.default_rng(len(tile))
    for _ in range(60):
        shape = tuple(int(rng.integers(1, 3 * t)) for t in tile)
        overlap = float(rng.choice([0.0, 0.25, 0.5, 0.75, 0.9, 0.99, rng.random()]))
        padded = tuple(max(size, t) for size, t in zip(shape, tile))
        listed = dense_patch_slices(padded, tile, _get_scan_interval(padded, tile, len(tile), [overlap] * len(tile)))
        assert window_count(shape, tile, overlap) == len(listed), (shape, overlap)


def test_a_frame_beyond_the_window_limit_is_refused_before_any_tile():
    """The limit is the largest frame's windows at overlap 0.75 (16 per tile area in 2D, 64 in
    3D); overlap 0.99 on a frame of 256x192 would take 43,621 windows of 16x12."""
    assert window_limit(None, (16, 12)) is None
    assert window_limit(16 * 12 * 10, (16, 12)) == 160 and window_limit(64**3 * 3, (64, 64, 64)) == 192
    frame = torch.rand(1, 256, 192)
    calls = []

    def counting_network(tiles):
        calls.append(tiles.shape[0])
        return toy_network(tiles)

    with pytest.raises(OptionError, match=r"overlap 0.99 cuts this 256x192 frame into 43621 windows of 16x12, "
                                          r"above the limit of 4096 per request; use a smaller overlap"):
        blended_logits(frame, SPEC, counting_network, PipelineOptions(overlap=0.99), max_windows=4096)
    assert not calls
    at_limit = PipelineOptions(overlap=0.75)
    assert window_count((256, 192), SPEC.tile_size, 0.75) <= window_limit(256 * 192, SPEC.tile_size)
    blended_logits(frame, SPEC, counting_network, at_limit, max_windows=window_limit(256 * 192, SPEC.tile_size))
    assert sum(calls) == window_count((256, 192), SPEC.tile_size, 0.75)


def test_sw_batch_size_default_and_bound():
    assert resolve_sw_batch_size(PipelineOptions(), SPEC) == 4  # default 8 capped by the network
    assert resolve_sw_batch_size(PipelineOptions(sw_batch_size=2), SPEC) == 2
    with pytest.raises(OptionError, match="exceeds the max batch size 4"):
        resolve_sw_batch_size(PipelineOptions(sw_batch_size=5), SPEC)


def test_postprocess_softmax_and_argmax():
    logits = torch.randn(3, 9, 11, generator=torch.Generator().manual_seed(2))
    result = postprocess(logits, probabilities=True)
    torch.testing.assert_close(result.probabilities.sum(0), torch.ones(9, 11))
    assert torch.equal(result.mask, result.probabilities.argmax(0).to(torch.uint8))
    assert result.mask.dtype == torch.uint8 and result.contour is None
    assert postprocess(logits).probabilities is None


def test_keep_largest_matches_monai():
    mask = torch.zeros(20, 20, dtype=torch.uint8)
    mask[1:4, 1:4] = 1
    mask[10:18, 10:18] = 1
    mask[12:14, 2:4] = 2
    mask[1:9, 14:19] = 2
    expected = KeepLargestConnectedComponent(applied_labels=[1, 2], independent=True)(mask[None])[0]
    result = keep_largest_components(mask, num_classes=3)
    assert torch.equal(result, torch.as_tensor(expected).to(torch.uint8))
    assert int((result == 1).sum()) == 64 and int((result == 2).sum()) == 40


def test_contour_keeps_class_on_borders_only():
    mask = torch.zeros(12, 12, dtype=torch.uint8)
    mask[2:10, 2:10] = 2
    contour = label_contour(mask)
    edges = torch.as_tensor(LabelToContour()(mask[None].float()))[0] != 0
    assert torch.equal(contour != 0, edges)
    assert set(contour[edges].tolist()) == {2} and contour[5, 5] == 0


def test_class_mask_is_uint8_argmax():
    logits = torch.tensor([[[0.0, 2.0]], [[1.0, 0.0]]])
    assert class_mask(logits).tolist() == [[1, 0]]


@pytest.mark.parametrize("size", [1, 2, 7, 1000, 4097])
def test_sorted_percentiles_equal_numpy(size):
    values = torch.from_numpy(np.random.default_rng(size).normal(size=size).astype(np.float32))
    expected = np.percentile(values.numpy().astype(np.float64), [1, 99])
    from segserve.preprocess import sorted_percentiles

    np.testing.assert_allclose(sorted_percentiles(values, (1.0, 99.0)), expected, rtol=1e-6, atol=1e-7)


def test_class_mask_equals_argmax_with_ties():
    logits = torch.randint(0, 3, (4, 30, 40)).float()  # many exact ties
    assert torch.equal(class_mask(logits), torch.argmax(logits, dim=0).to(torch.uint8))
