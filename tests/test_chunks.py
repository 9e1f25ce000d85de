"""Chunk planning against MONAI itself: window positions equal ``dense_patch_slices``, and a
volume stitched from chunks equals the whole-volume ``sliding_window_inference`` bit for bit
(one window per network call, so no batch-dependent rounding of the network can hide a seam)."""

from __future__ import annotations

import math

import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

from client.chunks import ChunkingError, minimum_chunk_extent, plan_chunks, split_axis, window_starts


@pytest.mark.parametrize("tile", [8, 13, 64])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_window_starts_are_monais(tile, overlap):
    for length in range(tile, 4 * tile + 7):
        interval = _get_scan_interval((length,), (tile,), 1, (overlap,))
        expected = [window[0].start for window in dense_patch_slices((length,), (tile,), interval)]
        assert window_starts(length, tile, overlap) == expected, length


@pytest.mark.parametrize("length,tile,overlap,extent", [(197, 64, 0.25, 160), (500, 64, 0.5, 200), (75, 16, 0.3, 40),
                                                       (300, 64, 0.0, 128), (1000, 96, 0.25, 250)])
def test_axis_spans_tile_the_axis(length, tile, overlap, extent):
    spans = split_axis(length, tile, overlap, extent)
    assert len(spans) > 1
    assert spans[0].keep_start == 0 and spans[-1].keep_stop == length
    for before, after in zip(spans, spans[1:]):
        assert before.keep_stop == after.keep_start  # kept parts abut: every voxel written once
    for span in spans:
        assert span.stop - span.start <= extent and span.stop - span.start >= tile
        assert span.start <= span.keep_start < span.keep_stop <= span.stop


def test_bad_chunk_settings_name_the_value():
    with pytest.raises(ChunkingError, match=f"chunk extent 100 is too small .* at least {minimum_chunk_extent(64, 0.25)}"):
        split_axis(400, 64, 0.25, 100)
    with pytest.raises(ChunkingError, match="needs 3 values"):
        plan_chunks((100, 100, 100), (16, 16, 16), max_extents=(50, 50))
    with pytest.raises(ChunkingError, match=r"overlap must be in \[0, 1\), got 1.5"):
        plan_chunks((100, 100, 100), (16, 16, 16), overlap=1.5)
    with pytest.raises(ChunkingError, match=r"min_shared \(--chunk-overlap\) must be >= 0, got -5"):
        plan_chunks((100, 100, 100), (16, 16, 16), max_voxels=1000, min_shared=-5)


def test_default_extents_cut_slowest_axis_first_among_equals():
    chunks = plan_chunks((512, 512, 512), (64, 64, 64), max_voxels=512 * 512 * 256)
    assert len(chunks) == 3  # 512 slices in chunks of <= 256, sharing one window at each seam
    assert all(c.sent[1:] == (slice(0, 512), slice(0, 512)) for c in chunks)
    assert all(math.prod(c.shape) <= 512 * 512 * 256 for c in chunks)
    assert len(plan_chunks((256, 512, 512), (64, 64, 64))) == 1



@pytest.mark.parametrize("shape, max_voxels", [
    ((1000, 1000, 1000), 2**22),  # the old extents, (160, 1000, 1000), sent 160000000 voxels
    ((256, 512, 512), 2**24),  # old: 41943040 voxels
    ((1024, 1024, 1024), 512 * 512 * 256),  # the default limit; old: 167772160 voxels
    ((300, 401, 517), 5_000_000),
])
def test_default_chunks_stay_within_the_limit(shape, max_voxels):
    chunks = plan_chunks(shape, (64, 64, 64), max_voxels=max_voxels)
    assert len(chunks) > 1 and max(math.prod(c.shape) for c in chunks) <= max_voxels


@pytest.mark.parametrize("shape, max_voxels", [((512, 2048, 2048), 512 * 512 * 256), ((1024, 1024, 1024), 512 * 512 * 256),
                                                ((300, 401, 517), 5_000_000), ((512, 512, 512), 512 * 512 * 256)])
def test_default_chunks_send_no_more_than_cubes_or_slabs_within_the_limit(shape, max_voxels):
    """Halos cost network work: the default sends the fewest voxels of the plans within the
    limit. Slowest-axis slabs sent 2.44x a 512x2048x2048 volume where 400^3 cubes send 1.5x."""
    def sent(plan) -> int:
        return sum(math.prod(c.shape) for c in plan)

    chosen = plan_chunks(shape, (64, 64, 64), max_voxels=max_voxels)
    alternatives = [plan_chunks(shape, (64, 64, 64), max_extents=extents)
                    for size in (160, 208, 256, 304, 352, 400, 448, 512)
                    for extents in ((size, size, size), (size, 0, 0), (size, size, 0))]
    within = [plan for plan in alternatives if max(math.prod(c.shape) for c in plan) <= max_voxels]
    assert within and sent(chosen) <= min(sent(plan) for plan in within)


def test_default_chunks_consider_spans_between_later_windows():
    """Near an axis's end MONAI shifts the last window back, so spans between later windows
    differ from those from the first: (320, 288, 288) sent 125091820 voxels here while a search
    over spans from the first window only chose a plan sending 136479980."""
    def sent(plan) -> int:
        return sum(math.prod(c.shape) for c in plan)

    shape, limit = (556, 575, 287), 24969472
    chosen = plan_chunks(shape, (64, 64, 64), max_voxels=limit)
    assert max(math.prod(c.shape) for c in chosen) <= limit
    assert sent(chosen) <= sent(plan_chunks(shape, (64, 64, 64), max_extents=(320, 288, 288))) == 125091820


def test_default_chunks_leave_room_for_the_shared_margin():
    """--chunk-overlap makes the smallest chunk larger; the default extents allow for it (they
    were cut to the margin-less minimum, and split_axis refused them)."""
    chunks = plan_chunks((1024, 1024, 1024), (64, 64, 64), max_voxels=512 * 512 * 256, min_shared=64)
    assert max(math.prod(c.shape) for c in chunks) <= 512 * 512 * 256
    with pytest.raises(ChunkingError, match=r"below the smallest chunk .*\[208, 208, 208\]"):
        plan_chunks((1000, 1000, 1000), (64, 64, 64), max_voxels=2**22, min_shared=64)


def test_a_limit_below_the_smallest_chunk_is_refused_with_the_size_it_needs():
    with pytest.raises(ChunkingError, match=r"2097152 is below the smallest chunk .*\[160, 160, 160\] = 4096000 voxels"):
        plan_chunks((1000, 1000, 1000), (64, 64, 64), max_voxels=2**21)
    with pytest.raises(ChunkingError, match=r"\[40, 50, 60\] = 120000 voxels"):
        plan_chunks((40, 50, 60), (64, 64, 64), max_voxels=1000)  # smaller than one tile: cannot be cut at all
    with pytest.raises(ChunkingError, match="chunk extent 16 cannot cut an axis of 64 voxels"):
        plan_chunks((64, 96, 96), (64, 64, 64), max_extents=(16, 0, 0))

@pytest.fixture(scope="module")
def small_network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.Tanh(),
                               torch.nn.Conv3d(3, 3, 3, padding=1)).eval()


# The first three run MONAI over the volume dozens of times (20-30 s each on this machine): `slow`,
# left to `make test`; the edit loop keeps the other two.
@pytest.mark.parametrize("tile,overlap,extents,min_shared", [
    pytest.param((16, 16, 16), 0.25, (40, 45, 0), 0, marks=pytest.mark.slow),
    pytest.param((16, 12, 20), 0.3, (50, 30, 48), 0, marks=pytest.mark.slow),
    pytest.param((16, 16, 16), 0.5, (0, 0, 40), 0, marks=pytest.mark.slow),
    ((16, 16, 16), 0.0, (32, 40, 0), 0),
    ((16, 16, 16), 0.25, (60, 0, 0), 20),
])
@torch.no_grad()
def test_stitched_chunks_equal_whole_volume(small_network, tile, overlap, extents, min_shared):
    volume = torch.rand((1, 1, 75, 67, 53), generator=torch.Generator().manual_seed(1))
    whole = sliding_window_inference(volume, tile, 1, small_network, overlap=overlap, mode="gaussian")
    stitched = torch.full_like(whole, float("nan"))
    chunks = plan_chunks(tuple(volume.shape[2:]), tile, overlap, extents, min_shared=min_shared)
    assert len(chunks) > 1
    for chunk in chunks:
        part = sliding_window_inference(volume[(..., *chunk.sent)].contiguous(), tile, 1, small_network,
                                        overlap=overlap, mode="gaussian")
        stitched[(..., *chunk.kept)] = part[(..., *chunk.sent_kept)]
    assert torch.equal(stitched, whole)
