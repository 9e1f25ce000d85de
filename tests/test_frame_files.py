"""Stacks in NPY and uncompressed TIFF files are read and written a frame at a time without a
memory map (``client.frame_files``): the same frames as NumPy and tifffile read, and a run
through a stack leaves the client's resident memory the size of a few frames, where a map kept
every page the run had touched."""

from __future__ import annotations

import types

import numpy as np
import pytest
import tifffile

from client.frame_files import FrameFile
from client.stacks import StackWriter, open_sources
from tests.helpers import resident_file_mb

RNG = np.random.default_rng(5)


@pytest.mark.parametrize("dtype", ["<f4", ">u2", "u1", "<i8"])
@pytest.mark.parametrize("shape", [(7, 33, 45), (4, 3, 17, 9)])
def test_npy_stack_frames_are_those_numpy_reads(tmp_path, dtype, shape):
    stack = RNG.integers(0, 200, size=shape).astype(dtype)
    np.save(tmp_path / "stack.npy", stack)
    [source] = open_sources([str(tmp_path / "stack.npy")], in_channels=shape[1] if len(shape) == 4 else 1)
    try:
        frames = [source.load(i) for i in range(source.count)]
    finally:
        source.close()
    assert all(frame.dtype == np.dtype(dtype) and np.array_equal(frame, stack[i]) for i, frame in enumerate(frames))


def test_a_fortran_order_npy_stack_is_read_through_its_map(tmp_path):
    stack = np.asfortranarray(RNG.integers(0, 200, size=(5, 20, 30), dtype=np.uint16))
    np.save(tmp_path / "stack.npy", stack)
    assert FrameFile.of_memmap(np.load(tmp_path / "stack.npy", mmap_mode="r")) is None
    [source] = open_sources([str(tmp_path / "stack.npy")], in_channels=1)
    assert all(np.array_equal(source.load(i), stack[i]) for i in range(5))


def test_a_frame_past_the_end_of_a_short_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "short.raw").write_bytes(bytes(100))
    frames = FrameFile(tmp_path / "short.raw", (3, 8, 8), np.uint8, offset=0)
    assert frames[0].shape == (8, 8)
    with pytest.raises(ValueError, match=r"short.raw: frame 1 is not whole in the file \(it ends after 100 bytes\)"):
        frames[1]
    with pytest.raises(IndexError, match="frame 3 of 3"):
        frames[3]
    frames.close()


def test_reading_a_stack_through_leaves_resident_memory_at_a_few_frames(tmp_path):
    """A memory map kept all 256 MiB of these frames resident once read."""
    stack = np.lib.format.open_memmap(tmp_path / "stack.npy", mode="w+", dtype=np.float32, shape=(64, 1024, 1024))
    for i in range(64):
        stack[i] = i
    del stack
    [source] = open_sources([str(tmp_path / "stack.npy")], in_channels=1)
    before = resident_file_mb()
    try:
        assert all(source.load(i).mean() == i for i in range(64))  # every pixel read, as a request does
    finally:
        source.close()
    assert resident_file_mb() - before < 64


@pytest.mark.parametrize("suffix", [".npy", ".tif"])
def test_writing_stack_outputs_leaves_resident_memory_at_a_few_frames_and_files_as_they_were(tmp_path, suffix):
    """48 frames of mask + 2-class probabilities of 1024²: 432 MiB through a memory map, all of
    it resident by the end of the run."""
    count, height, width = 48, 1024, 1024
    image = tmp_path / f"scan{suffix}"
    if suffix == ".tif":  # the writer names its outputs after the input and gives them its pixel size
        tifffile.imwrite(image, np.zeros((2, 8, 8), np.uint16), resolution=(4.0, 4.0), resolutionunit="CENTIMETER")
    else:
        image.write_bytes(b"")
    source = types.SimpleNamespace(path=image, kind=suffix.strip(".").replace("tif", "tiff"), count=count,
                                   frame_shape=(height, width), one_frame=False, dataset=None)
    writer = StackWriter(source, tmp_path, ["mask", "probabilities"], num_classes=2, resume=False)
    before = resident_file_mb()
    for i in range(count):
        if i == 3:
            writer.write_failed(i)
        else:
            mask = np.full((height, width), i % 2, np.uint8)
            writer.write(i, types.SimpleNamespace(mask=mask, probabilities=np.full((2, height, width), i, np.float32)))
        writer.flush()
    grown = resident_file_mb() - before
    writer.close(publish=True)
    assert grown < 64
    read = tifffile.imread if suffix == ".tif" else np.load
    masks, probabilities = read(tmp_path / f"scan_mask{suffix}"), read(tmp_path / f"scan_probabilities{suffix}")
    assert masks.shape == (count, height, width) and probabilities.shape == (count, 2, height, width)
    assert (masks[3] == 255).all() and np.isnan(probabilities[3]).all()
    if suffix == ".tif":
        with tifffile.TiffFile(tmp_path / "scan_mask.tif") as tiff:
            assert tiff.pages.first.tags["XResolution"].value == (4, 1)
    assert all((masks[i] == i % 2).all() and (probabilities[i] == i).all() for i in range(count) if i != 3)
    resumed = StackWriter(source, tmp_path, ["mask", "probabilities"], num_classes=2, resume=True, finished=True)
    resumed.write(3, types.SimpleNamespace(mask=np.ones((height, width), np.uint8),
                                           probabilities=np.zeros((2, height, width), np.float32)))
    resumed.close(publish=True)
    assert (read(tmp_path / f"scan_mask{suffix}")[3] == 1).all()


def test_a_file_that_cannot_be_opened_is_one_error_and_nothing_more(tmp_path, monkeypatch):
    """``__del__`` of a FrameFile whose open failed raised AttributeError (printed as
    "Exception ignored in ..." on stderr)."""
    import gc
    import sys

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(FileNotFoundError):
        FrameFile(tmp_path / "gone.npy", (2, 4, 4), np.uint16, offset=128)
    gc.collect()
    assert [str(u.exc_value) for u in unraisable] == []
