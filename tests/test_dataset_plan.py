"""Dataset planning without a server: blocks with halos on MONAI's window grid, tasks owning
whole output chunks, the exact whole-volume percentiles, and input names."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest

from client.chunks import window_starts
from client.dataset_ranges import exact_percentiles, intensity_range
from client.dataset_sources import open_source, release_handles, split_zarr_argument
from client.datasets import default_block, plan_stack, plan_volume
from client.volumes import whole_volume_range
from tests.helpers import resident_file_mb


def covering_windows(length: int, tile: int, overlap: float, voxel: int) -> list[tuple[int, int]]:
    size = min(tile, length)
    return [(s, s + size) for s in window_starts(length, tile, overlap) if s <= voxel < s + size]


@pytest.mark.parametrize("length,tile,overlap,block", [(197, 64, 0.25, 50), (171, 64, 0.3, 64), (45, 64, 0.25, 16),
                                                         (300, 96, 0.5, 97), (64, 64, 0.25, 10)])
def test_blocks_send_every_window_of_their_voxels_and_windows_only(length, tile, overlap, block):
    """Each kept voxel's windows (of the whole axis) lie inside the sent region, and the sent
    region is a run of whole windows, so the server places the same windows there."""
    tasks = plan_volume((length,), (tile,), (block,), overlap)
    kept = [t.kept[0] for t in tasks]
    assert kept[0].start == 0 and kept[-1].stop == length
    assert all(a.stop == b.start for a, b in zip(kept, kept[1:]))  # abutting: each voxel written once
    starts = window_starts(length, tile, overlap)
    for task in tasks:
        sent, region = task.sent[0], task.kept[0]
        assert sent.start in starts and sent.stop in [s + min(tile, length) for s in starts]
        for voxel in range(region.start, region.stop):
            assert all(sent.start <= a and b <= sent.stop for a, b in covering_windows(length, tile, overlap, voxel))
        relative = window_starts(sent.stop - sent.start, tile, overlap)
        inside = [s - sent.start for s in starts if sent.start <= s and s + min(tile, length) <= sent.stop]
        assert relative == inside


def test_volume_tasks_cover_the_volume_once_in_whole_chunks():
    shape, block = (70, 41, 90), (32, 41, 40)
    tasks = plan_volume(shape, (64, 64, 64), block)
    assert len(tasks) == 3 * 1 * 3
    covered = np.zeros(shape, np.int32)
    for task in tasks:
        covered[task.kept] += 1
        assert all(k.start % b == 0 for k, b in zip(task.kept, block))  # one output chunk per task
    assert (covered == 1).all()


def test_stack_tasks_and_bad_values():
    assert [t.kept[0] for t in plan_stack(10, 4)] == [slice(0, 4), slice(4, 8), slice(8, 10)]
    with pytest.raises(ValueError, match="frames per task must be >= 1, got 0"):
        plan_stack(10, 0)
    with pytest.raises(ValueError, match=r"block extents must be >= 1, got \[0, 4\]"):
        plan_volume((10, 10), (4, 4), (0, 4))


@pytest.mark.parametrize("shape, tile, max_voxels", [
    ((1000, 1000, 1000), (64, 64, 64), 512 * 512 * 256),
    ((300, 300, 300), (32, 32, 32), 2**20),  # the old estimate (a tile of halo per axis) sent 1124864 voxels here
    ((777, 500, 300), (96, 64, 64), 2**25),
    ((2000, 2000, 2000), (128, 128, 128), 2**27),
    ((300, 1000, 1000), (16, 128, 128), 2**23),  # a flat tile: cubes of 128 (15922432 voxels sent) were refused
    ((300, 1000, 1000), (16, 128, 128), 2**24),
])
def test_default_block_sends_at_most_the_request_limit_and_is_the_largest_that_does(shape, tile, max_voxels):
    def largest_sent(extents: tuple[int, ...]) -> int:
        return max(math.prod(s.stop - s.start for s in task.sent) for task in plan_volume(shape, tile, extents))

    block = default_block(shape, tile, max_voxels)
    assert largest_sent(block) <= max_voxels
    scale = max(b // t for b, t in zip(block, tile))
    assert scale & (scale - 1) == 0 and block == tuple(min(t * scale, n) for t, n in zip(tile, shape))
    doubled = tuple(min(2 * scale * t, n) for t, n in zip(tile, shape))
    assert largest_sent(doubled) > max_voxels


def test_default_block_keeps_the_tiles_proportions():
    assert default_block((300, 1000, 1000), (16, 128, 128), 2**23) == (16, 128, 128)
    assert default_block((300, 1000, 1000), (16, 128, 128), 2**24) == (32, 256, 256)
    assert default_block((1000, 1000, 1000), (64, 64, 64), 512 * 512 * 256) == (256, 256, 256)


def test_default_block_of_a_small_volume_is_the_volume_and_a_too_small_limit_is_refused():
    assert default_block((40, 50, 60), (64, 64, 64), 512 * 512 * 256) == (40, 50, 60)
    assert default_block((100, 100, 100), (64, 64, 64), 512 * 512 * 256) == (100, 100, 100)
    with pytest.raises(ValueError, match=r"--max-chunk-voxels 1048576 is below the smallest request .* \(3796416 voxels"):
        default_block((300, 300, 300), (64, 64, 64), 2**20)


@pytest.mark.parametrize("dtype", ["float32", "uint16", "int16", "uint8", "float64"])
def test_exact_percentiles_equal_numpy_over_blocks(dtype):
    rng = np.random.default_rng(5)
    if dtype.startswith("float"):
        volume = (rng.normal(size=(9, 31, 23)) * 300).astype(dtype)
        volume[:4] = 0  # many equal values: a bin with one value counted thousands of times
    else:
        info = np.iinfo(dtype)
        volume = rng.integers(max(info.min, -3000), min(info.max, 60000), (9, 31, 23)).astype(dtype)
    blocks = [lambda z=z, y=y: volume[z:z + 4, y:y + 16] for z, y in itertools.product(range(0, 9, 4), range(0, 31, 16))]
    expected = np.percentile(volume.astype(np.float32), [1.0, 99.0])
    assert exact_percentiles(blocks).tolist() == expected.tolist()


def test_the_intensity_range_of_a_sparse_volume_is_its_min_and_max_and_of_a_constant_one_none():
    """As the server's default window (segserve.preprocess.default_window) and as
    client.volumes.whole_volume_range: a sparse volume's 1st and 99th percentiles are equal,
    and each block was scaled on its own (the stitched mask was not the whole volume's)."""
    volume = np.zeros((9, 31, 23), np.uint16)
    volume[4, 10:12, 5:7] = 900  # 4 of 6417 voxels
    blocks = [lambda z=z: volume[z:z + 4] for z in range(0, 9, 4)]
    assert intensity_range(blocks) == whole_volume_range(volume) == (0.0, 900.0)
    constant = np.full((9, 31, 23), 5, np.int16)
    assert intensity_range([lambda: constant[:4], lambda: constant[4:]]) is whole_volume_range(constant) is None


def test_zarr_argument_names_a_store_and_a_path(tmp_path):
    assert split_zarr_argument("data/scan.zarr/raw/s0") == ("data/scan.zarr", "raw/s0")
    assert split_zarr_argument("scan.zarr:/raw") == ("scan.zarr", "raw")
    assert split_zarr_argument("scan.tif") is None
    with pytest.raises(FileNotFoundError, match="no such zarr store"):
        open_source(str(tmp_path / "missing.zarr"), 2)
    with pytest.raises(ValueError, match="unsupported input"):
        (tmp_path / "x.png").write_bytes(b"")
        open_source(str(tmp_path / "x.png"), 2)


def test_ome_zarr_image_opens_level_zero_without_singleton_axes(tmp_path):
    import zarr

    group = zarr.open_group(tmp_path / "image.ome.zarr", mode="w", zarr_format=3)
    group.create_array("0", shape=(1, 1, 5, 30, 40), chunks=(1, 1, 1, 30, 40), dtype="uint16")
    group.create_array("1", shape=(1, 1, 5, 15, 20), chunks=(1, 1, 1, 15, 20), dtype="uint16")
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}, {"name": "z", "type": "space"},
            {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 2.0, 0.5, 0.5]}]},
        {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 2.0, 1.0, 1.0]}]}]}]}
    source = open_source(str(tmp_path / "image.ome.zarr"), 2)
    assert (source.kind, source.inner, source.shape, source.dropped) == ("ome-zarr", "0", (5, 30, 40), 2)
    group["0"][0, 0, 3] = 7
    assert source.read((slice(3, 4),)).tolist() == np.full((1, 30, 40), 7).tolist()


def test_exact_percentiles_with_negative_and_positive_zero():
    """A masked float volume (``ct * mask``) holds -0.0 and +0.0; ranks fall among both."""
    volume = np.zeros((4, 50, 50), np.float32)
    volume[:2] = -0.0
    volume[0, 0, :10] = np.linspace(-5, 5, 10, dtype=np.float32)
    blocks = [lambda part=part: part for part in np.array_split(volume, 3)]
    assert exact_percentiles(blocks).tolist() == np.percentile(volume, [1.0, 99.0]).tolist()


def test_a_runs_end_closes_its_input_and_that_files_handles_of_a_killed_run(tmp_path):
    """HDF5 locks an open file against writing: after ``release_handles`` the file can be
    rewritten, handles a killed run left on the same file are closed too, and a late task of
    the released run reads without keeping the file open."""
    import h5py

    from client import dataset_sources

    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as file:
        file["data"] = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    killed = dataclasses.replace(open_source(f"{path}:/data", 2), run="killed")
    resumed = dataclasses.replace(killed, run="resumed")
    assert killed.read((slice(0, 1),)).sum() == resumed.read((slice(1, 2),)).sum() - 144
    with pytest.raises(OSError, match="already open|lock"):
        h5py.File(path, "w")
    assert dataset_sources.release_handles(resumed) == 2
    assert resumed.read((slice(None),)).shape == (2, 3, 4)  # a task still starting
    assert not any(key[3] == "resumed" for key in dataset_sources._HANDLES)
    with h5py.File(path, "w") as file:
        file["data"] = np.ones((2, 3, 4), np.uint16)
    assert dataclasses.replace(killed, run="next").read((slice(None),)).sum() == 24


@pytest.mark.parametrize("order", ["C", "F"])
def test_an_npy_input_read_through_by_a_worker_leaves_its_resident_memory_as_it_was(tmp_path, order):
    """A worker kept one memory map of an NPY input for the run: every page it had read stayed
    resident (all 256 MiB here), and Dask's memory limit counts resident memory."""
    import dataclasses as dc

    volume = np.lib.format.open_memmap(tmp_path / "volume.npy", mode="w+", dtype=np.float32, shape=(64, 1024, 1024),
                                       fortran_order=order == "F")
    for z in range(64):
        volume[z] = z
    del volume
    source = dc.replace(open_source(str(tmp_path / "volume.npy"), rank=3), run="test-run")
    before = resident_file_mb()
    blocks = [(slice(z, z + 16), slice(y, y + 512), slice(0, 1024)) for z in range(0, 64, 16) for y in (0, 512)]
    assert all((source.read(block) == np.arange(block[0].start, block[0].stop)[:, None, None]).all() for block in blocks)
    assert source.read((slice(3, 5), slice(10, 12), slice(1000, 1003))).shape == (2, 2, 3)
    grown = resident_file_mb() - before
    release_handles(source)
    assert grown < 64
