"""Input files as instruments, Fiji, tifffile and h5py write them: TIFF pages written one by
one, ImageJ and OME axes, RGB, HDF5 files in oddly named directories or unreadable; each read
as the frames it holds, or refused naming the file and what it holds."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tifffile

from client.dataset_sources import open_source
from client.frames import read_frame
from client.stacks import FAILED_VALUE, FileWriter, StackWriter, open_sources
from client.tiffs import as_grey
from client.volume_files import output_paths, read_volume, tiff_calibration
from segserve.launcher import REPO_ROOT
from tests.helpers import cli, reference_masks

RNG = np.random.default_rng(11)
FRAMES = RNG.integers(0, 60000, size=(5, 40, 56), dtype=np.uint16)
# T 2, Z 3, C 2 frames of 40 x 56
HYPERSTACK = RNG.integers(0, 255, size=(2, 3, 2, 40, 56), dtype=np.uint8)


def write_page_by_page(path, frames, **options) -> None:
    """As acquisition code writes frames as they come: one ``write`` per frame (one series each)."""
    with tifffile.TiffWriter(path) as writer:
        for frame in frames:
            writer.write(frame, **options)


def frames_of(argument, in_channels: int = 1) -> list[np.ndarray]:
    [source] = open_sources([str(argument)], in_channels)
    return [source.load(index) for index in range(source.count)]


def test_a_tiff_written_page_by_page_is_one_stack_of_all_its_pages(tmp_path):
    """It was read as its first series: one frame of five, exit code 0."""
    write_page_by_page(tmp_path / "acquired.tif", FRAMES)
    [source] = open_sources([str(tmp_path / "acquired.tif")], 1)
    assert (source.kind, source.count, source.frame_shape) == ("tiff", 5, (40, 56))
    assert np.array_equal(np.stack([source.load(i) for i in range(5)]), FRAMES)


def test_rgb_frames_written_page_by_page_are_grey_frames_for_a_one_channel_network(tmp_path):
    rgb = RNG.integers(0, 255, size=(3, 40, 56, 3), dtype=np.uint8)
    write_page_by_page(tmp_path / "colour.tif", rgb, photometric="rgb")
    expected = [as_grey(np.moveaxis(frame, -1, 0))[0] for frame in rgb]
    assert all(np.array_equal(a, b) for a, b in zip(frames_of(tmp_path / "colour.tif"), expected, strict=True))
    assert all(np.array_equal(a, np.moveaxis(b, -1, 0)) for a, b in zip(frames_of(tmp_path / "colour.tif", 3), rgb, strict=True))


def test_grey_of_an_rgb_tiff_is_the_grey_of_the_same_png_within_one_level(tmp_path):
    from PIL import Image
    from skimage import data

    picture = data.astronaut()
    tifffile.imwrite(tmp_path / "a.tif", picture, photometric="rgb")
    Image.fromarray(picture).save(tmp_path / "a.png")
    difference = read_frame(tmp_path / "a.tif", in_channels=1).astype(int) - read_frame(tmp_path / "a.png").astype(int)
    assert np.abs(difference).max() <= 1


def test_a_colour_png_is_rgb_for_a_three_channel_network_and_grey_otherwise(tmp_path):
    from PIL import Image

    picture = RNG.integers(0, 255, size=(40, 56, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "p.png")
    assert np.array_equal(frames_of(tmp_path / "p.png", in_channels=3)[0], np.moveaxis(picture, -1, 0))
    assert np.array_equal(frames_of(tmp_path / "p.png")[0], np.asarray(Image.fromarray(picture).convert("L")))


def write_16_bit_png(path, samples: np.ndarray, colour_type: int) -> None:
    """``[H, W, S]`` uint16 as a 16-bit PNG of PNG colour type 2 (RGB) or 4 (grey + alpha),
    which Pillow cannot write."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = samples.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)  # filter 0 on every row
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_16_bit_colour_png_is_refused_and_a_16_bit_grey_one_read_whole(tmp_path):
    """Pillow reads a 16-bit RGB or grey+alpha PNG as 8 bits a sample: its low bytes were lost."""
    from PIL import Image

    samples = RNG.integers(0, 65536, size=(20, 30, 3), dtype=np.uint16)
    write_16_bit_png(tmp_path / "rgb.png", samples, 2)
    write_16_bit_png(tmp_path / "grey_alpha.png", samples[..., :2], 4)
    for name, kind in (("rgb.png", "RGB"), ("grey_alpha.png", "LA")):
        for in_channels in (1, 3):
            with pytest.raises(ValueError, match=f"a 16-bit {kind} PNG, of which .* only the high 8 bits"):
                read_frame(tmp_path / name, in_channels)
    Image.fromarray(samples[..., 0]).save(tmp_path / "grey.png")
    read = read_frame(tmp_path / "grey.png", 1)
    assert read.dtype == np.uint16 and np.array_equal(read, samples[..., 0])


@pytest.mark.parametrize("case", ["imagej CYX", "imagej ZCYX", "ome CZYX", "no metadata NCHW"])
def test_channels_named_by_imagej_or_ome_are_channels_not_frames(tmp_path, case):
    """A two-channel ImageJ image was two frames; a ZCYX stack put Z where channels go."""
    path = tmp_path / "cells.ome.tif"
    zc = HYPERSTACK[0]  # [Z, C, H, W]
    if case == "imagej CYX":
        tifffile.imwrite(path, zc[0], imagej=True, metadata={"axes": "CYX"})
        expected = [zc[0]]
    elif case == "imagej ZCYX":
        tifffile.imwrite(path, zc, imagej=True, metadata={"axes": "ZCYX"})
        expected = list(zc)
    elif case == "ome CZYX":
        tifffile.imwrite(path, zc.transpose(1, 0, 2, 3), ome=True, metadata={"axes": "CZYX"})
        expected = list(zc)
    else:  # [N, C, H, W] written as an array: the shape says it (as before)
        tifffile.imwrite(path, zc, photometric="minisblack")
        expected = list(zc)
    frames = frames_of(path, in_channels=2)
    assert len(frames) == len(expected) and all(np.array_equal(a, b) for a, b in zip(frames, expected))


@pytest.mark.parametrize("axes, array, in_channels, message", [
    ("ZCYX", HYPERSTACK[0], 1, "frames of 2 channels (axes ZCYX, shape [3, 2, 40, 56]); the network takes 1: "
                               "save one channel per file, or convert them to grey"),
    ("TZCYX", HYPERSTACK, 2, "axes TZCYX of shape [2, 3, 2, 40, 56] hold frames along 2 axes (2 T x 3 Z); "
                             "a stack has one: save one time point or z-stack per file"),
], ids=["channels-for-one-channel-network", "hyperstack"])
def test_what_a_stack_cannot_be_is_refused_naming_the_axes(tmp_path, axes, array, in_channels, message):
    tifffile.imwrite(tmp_path / "h.tif", array, imagej=True, metadata={"axes": axes})
    [source] = open_sources([str(tmp_path / "h.tif")], in_channels)
    assert source.kind == "files"  # failed as one input, named, beside the others (exit code 1)
    with pytest.raises(ValueError) as refused:
        source.load(0)
    assert str(refused.value) == f"{tmp_path / 'h.tif'}: {message}"


@pytest.mark.parametrize("case", ["two channels, plain imwrite", "three frames, plain imwrite (planar RGB)",
                                  "four frames, plain imwrite (planar RGBA)", "OME stack without axes (CYX)",
                                  "ImageJ channels, one-channel network"])
def test_arrays_written_without_meaning_keep_the_reading_their_shape_gives(tmp_path, case):
    """tifffile stores a plain [3 or 4, H, W] array as planar RGB, and an OME stack written
    without axes as channels (CYX): frames for a one-channel network, as their shape says (not
    blended into one grey frame, or refused); [2, H, W] is one frame for a two-channel network."""
    path = tmp_path / ("x.ome.tif" if "OME" in case else "x.tif")
    count = {"two": 2, "three": 3, "four": 4, "OME": 5, "ImageJ": 2}[next(w for w in ("two", "three", "four", "OME", "ImageJ") if w in case)]
    array = RNG.integers(0, 255, size=(count, 40, 56), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # tifffile's, on planar RGB written implicitly
        if "ImageJ" in case:
            tifffile.imwrite(path, array, imagej=True, metadata={"axes": "CYX"})
        else:
            tifffile.imwrite(path, array, ome="OME" in case)
    in_channels = 2 if case.startswith("two") else 1
    frames = frames_of(path, in_channels)
    expected = [array] if in_channels == 2 else list(array)
    assert len(frames) == len(expected) and all(np.array_equal(a, b) for a, b in zip(frames, expected))
    if "OME" in case:
        assert np.array_equal(read_volume(str(path)).image, array[None])


def test_a_jpeg_compressed_rgb_tiff_is_made_grey_for_a_one_channel_network(tmp_path):
    """JPEG stores RGB as YCbCr; tifffile gives it back as RGB."""
    picture = RNG.integers(0, 255, size=(40, 56, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "j.tif", picture, photometric="rgb", compression="jpeg")
    decoded = tifffile.imread(tmp_path / "j.tif")
    assert np.array_equal(read_frame(tmp_path / "j.tif", in_channels=1), as_grey(np.moveaxis(decoded, -1, 0))[0])


def test_stack_files_are_closed_when_their_source_is(tmp_path):
    """Each stack's reader keeps its file open between frames; the CLI closes it after the stack."""
    tifffile.imwrite(tmp_path / "s.tif", FRAMES, photometric="minisblack")
    before = len(os.listdir("/proc/self/fd"))
    sources = [source for _ in range(40) for source in open_sources([str(tmp_path / "s.tif")], 1)]
    for source in sources:
        assert np.array_equal(source.load(3), FRAMES[3])
    assert len(os.listdir("/proc/self/fd")) >= before + 30  # open (other files of the process may close meanwhile)
    for source in sources:
        source.close()
    assert len(os.listdir("/proc/self/fd")) <= before


def test_images_of_different_shapes_in_one_tiff_are_refused(tmp_path):
    write_page_by_page(tmp_path / "mixed.tif", [FRAMES[0], FRAMES[1, :30], FRAMES[2]])
    [source] = open_sources([str(tmp_path / "mixed.tif")], 1)
    with pytest.raises(ValueError, match=r"mixed.tif: 3 images of 2 different shapes or pixel types "
                                         r"\(\[30, 56\] uint16, \[40, 56\] uint16\); a stack's frames share one"):
        source.load(0)


def test_a_stack_inside_a_directory_is_refused_not_taken_as_channels(tmp_path):
    (tmp_path / "frames").mkdir()
    tifffile.imwrite(tmp_path / "frames" / "a.tif", FRAMES[0])
    tifffile.imwrite(tmp_path / "frames" / "b.tif", FRAMES[:3], photometric="minisblack")
    [source] = open_sources([str(tmp_path / "frames")], 1)
    assert np.array_equal(source.load(0), FRAMES[0])
    with pytest.raises(ValueError, match="b.tif: a stack of 3 frames .* give it as an input of its own"):
        source.load(1)


def test_a_channels_last_npy_picture_is_refused_not_taken_as_a_stack(tmp_path):
    """An RGB picture as imageio gives it, [H, W, 3], was H frames of W x 3 pixels. For a
    one-channel network the advice is grey: [C, H, W], as it said, is a stack of C frames
    (each colour plane segmented alone, exit 0)."""
    np.save(tmp_path / "picture.npy", RNG.integers(0, 255, size=(70, 90, 3), dtype=np.uint8))
    [source] = open_sources([str(tmp_path / "picture.npy")], 1)
    assert source.kind == "files"
    with pytest.raises(ValueError, match=r"shape \[70, 90, 3\] looks like a channels-last \[H, W, C\] picture; "
                                         r"save it in grey as \[H, W\]") as refused:
        source.load(0)
    assert "moveaxis" not in str(refused.value)
    [colour] = open_sources([str(tmp_path / "picture.npy")], 3)
    with pytest.raises(ValueError, match=r"save it as \[C, H, W\] \(numpy.moveaxis\(a, -1, 0\)\)"):
        colour.load(0)


@pytest.mark.parametrize("case", ["page by page", "imagej ZCYX", "no metadata CDHW"])
def test_tiff_volumes_are_read_with_their_channels_first(tmp_path, case):
    path = tmp_path / "ct.tif"
    zc = HYPERSTACK[0]
    if case == "page by page":
        write_page_by_page(path, FRAMES)
        expected = FRAMES[None]
    elif case == "imagej ZCYX":
        tifffile.imwrite(path, zc, imagej=True, metadata={"axes": "ZCYX"})
        expected = zc.transpose(1, 0, 2, 3)
    else:
        tifffile.imwrite(path, zc.transpose(1, 0, 2, 3), photometric="minisblack")
        expected = zc.transpose(1, 0, 2, 3)
    assert np.array_equal(read_volume(str(path)).image, expected)


def test_a_dataset_tiff_written_page_by_page_is_all_its_pages(tmp_path):
    write_page_by_page(tmp_path / "acquired.tif", FRAMES)
    source = open_source(str(tmp_path / "acquired.tif"), rank=2)
    assert source.shape == (5, 40, 56)


def test_segment_segments_every_frame_of_a_tiff_written_page_by_page(server, tmp_path):
    frames = (FRAMES // 256).astype(np.uint8)
    write_page_by_page(tmp_path / "acquired.tif", frames)
    done = subprocess.run(cli(server, str(tmp_path / "acquired.tif"), "--out", str(tmp_path / "out")),
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "5 written, 0 failed" in done.stderr
    assert np.array_equal(tifffile.imread(tmp_path / "out" / "acquired_mask.tif"), reference_masks(server, frames))


# ------------------------------------------------------------------ HDF5 inputs beside them


def write_hdf5(path, dataset="/entry/data/data", array=FRAMES) -> None:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.create_dataset(dataset, data=array, chunks=(1, *array.shape[1:]), compression="gzip")


def test_an_hdf5_file_in_a_directory_with_a_colon_in_its_name_is_found(tmp_path):
    """Timestamped run directories (``2024-05-01T10:30``) cut the argument at their colon."""
    write_hdf5(tmp_path / "2024-05-01T10:30" / "run.h5")
    [source] = open_sources([f"{tmp_path}/2024-05-01T10:30/run.h5:/entry/data/data"], 1)
    assert source.kind == "hdf5" and source.count == 5 and np.array_equal(source.load(4), FRAMES[4])
    volume = read_volume(f"{tmp_path}/2024-05-01T10:30/run.h5:/entry/data/data")
    assert np.array_equal(volume.image[0], FRAMES)


@pytest.mark.parametrize("case, message", [
    ("not hdf5", "run.h5: not a readable HDF5 file ("),
    ("truncated", "run.h5: not a readable HDF5 file ("),
    ("a group", "run.h5: '/entry/data' is a group, not a dataset; its datasets: data"),
])
def test_an_hdf5_input_that_cannot_be_read_is_named(tmp_path, case, message):
    path = tmp_path / "run.h5"
    if case == "not hdf5":
        path.write_text("garbage")
    else:
        write_hdf5(path)
        if case == "truncated":
            path.write_bytes(path.read_bytes()[:len(path.read_bytes()) * 6 // 10])
    argument = f"{path}:/entry/data" if case == "a group" else f"{path}:/entry/data/data"
    for read in (lambda: open_sources([argument], 1), lambda: read_volume(argument), lambda: open_source(argument, rank=2)):
        with pytest.raises(ValueError) as refused:
            read()
        assert str(refused.value).startswith(f"{tmp_path}/{message}"), refused.value


def test_an_eiger_hdf5_stack_compressed_with_bitshuffle_lz4_is_read_and_an_unknown_filter_named(tmp_path):
    """Dectris Eiger writes bitshuffle/LZ4 chunks: every frame failed with HDF5's "can't open
    directory (/usr/local/lib/plugin)", and the run ended saying --resume would help."""
    import h5py
    import hdf5plugin

    path = tmp_path / "eiger_master.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("entry/data/data", data=FRAMES, chunks=(1, *FRAMES.shape[1:]),
                          **hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
        unknown = h5.create_dataset("entry/data/odd", shape=FRAMES.shape, dtype=FRAMES.dtype,
                                    chunks=(1, *FRAMES.shape[1:]), compression=31999, allow_unknown_filter=True)
        for index, frame in enumerate(FRAMES):  # chunks as some writer's filter 31999 left them
            unknown.id.write_direct_chunk((index, 0, 0), frame.tobytes())
    argument = f"{path}:/entry/data/data"
    # In a process of its own: this one registered the filters when it imported hdf5plugin.
    # Each in a process of its own: this one registered the filters when it imported hdf5plugin.
    reads = {"segment": "from client.stacks import open_sources; [source] = open_sources([argument], 1); "
                        "frame = source.load(3)",
             "segment-volume": "from client.volume_files import read_volume; frame = read_volume(argument).image[0][3]",
             "segment-dataset": "from client.dataset_sources import open_source; "
                                "frame = open_source(argument, rank=2).read((slice(3, 4),))[0]"}
    for command, read in reads.items():
        code = f"import sys, numpy; argument = sys.argv[1]; {read}; numpy.save(sys.argv[2], frame)"
        done = subprocess.run([sys.executable, "-c", code, argument, str(tmp_path / "read.npy")], capture_output=True,
                              text=True, cwd=REPO_ROOT)
        assert done.returncode == 0 and np.array_equal(np.load(tmp_path / "read.npy"), FRAMES[3]), (command, done.stderr)
    odd = f"{path}:/entry/data/odd"
    for read in (lambda: open_sources([odd], 1), lambda: read_volume(odd), lambda: open_source(odd, rank=2)):
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:/entry/data/odd: compressed with HDF5 filter "
                           "31999 .*, which this HDF5 library cannot read; decompress it with h5repack"):
            read()


def test_segment_volume_names_each_failed_volume_once(server, tmp_path):
    (tmp_path / "scans").mkdir()
    tifffile.imwrite(tmp_path / "scans" / "flat.tif", FRAMES[0])  # one frame: no volume
    (tmp_path / "scans" / "cut.h5").write_text("garbage")
    done = subprocess.run([sys.executable, "-m", "client", "segment-volume", str(tmp_path / "scans" / "flat.tif"),
                           f"{tmp_path}/scans/cut.h5:/data", "--out", str(tmp_path / "out"), "--url", server.grpc_url],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("client: error: ")]
    assert errors[0] == (f"client: error: {tmp_path}/scans/flat.tif: expected a 3D volume, got shape [40, 56]; one image: "
                         "segment frames with `segment`, or give the directory of a volume's TIFF slices")
    assert errors[1].startswith(f"client: error: {tmp_path}/scans/cut.h5: not a readable HDF5 file (")
    assert len(errors) == 2 and all(error.count("flat.tif") + error.count("cut.h5") == 1 for error in errors)


def test_outputs_of_ome_tiffs_are_named_without_the_ome(tmp_path):
    """``x.ome.tif`` gave ``x.ome_mask.tif``: a plain TIFF named as OME, which Fiji's and
    Bio-Formats' readers then take for one."""
    tifffile.imwrite(tmp_path / "frame.ome.tif", HYPERSTACK[0, 0, 0], ome=True)
    tifffile.imwrite(tmp_path / "stack.OME.TIFF", HYPERSTACK[0, :, 0], ome=True, metadata={"axes": "ZYX"})
    frame, stack = open_sources([str(tmp_path / "frame.ome.tif"), str(tmp_path / "stack.OME.TIFF")], in_channels=1)
    out = tmp_path / "out"
    assert FileWriter(frame, out, ["mask"], "tif", 512).paths(0) == {"mask": out / "frame_mask.tif",
                                                                     "overlay": out / "frame_overlay.png"}
    assert [t.path for t in StackWriter.targets(stack, out, ["mask"])] == [out / "stack_mask.tif", out / "stack.segment.json"]
    assert output_paths(tmp_path / "scan.ome.tif", "tiff", ["mask"], out) == {"mask": out / "scan_mask.tif"}


# ------------------------------------------------------------------ files cut short

CUT_STACK = RNG.integers(0, 4000, size=(10, 40, 56), dtype=np.uint16)
CUT_WRITERS = {
    "in one piece": lambda path: tifffile.imwrite(path, CUT_STACK),
    "bigtiff": lambda path: tifffile.imwrite(path, CUT_STACK, bigtiff=True),
    "big-endian": lambda path: tifffile.imwrite(path, CUT_STACK, byteorder=">"),
    "page by page": lambda path: write_page_by_page(path, CUT_STACK),
    "compressed": lambda path: tifffile.imwrite(path, CUT_STACK, compression="zlib"),
    "ome": lambda path: tifffile.imwrite(path, CUT_STACK, ome=True),
    "imagej": lambda path: tifffile.imwrite(path, CUT_STACK, imagej=True),
}


def write_cut_short(path, layout: str) -> None:
    """The file as a crashed acquisition or a stopped copy leaves it: its first 55 %."""
    CUT_WRITERS[layout](path)
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) * 55 // 100])


@pytest.mark.parametrize("layout, readable", [("in one piece", 5), ("bigtiff", 5), ("big-endian", 5), ("page by page", 5),
                                              ("compressed", 5), ("imagej", 5)])
def test_a_stack_cut_short_gives_the_frames_that_are_in_it(tmp_path, layout, readable):
    """A stack in one piece failed every frame; OME, ImageJ and compressed stacks were read as
    their first frame alone, written and reported as done. An ImageJ stack cut before its
    second directory was refused, though its description and its first page say where all of
    its frames are (as ImageJ reads it)."""
    write_cut_short(tmp_path / "cut.tif", layout)
    [source] = open_sources([str(tmp_path / "cut.tif")], in_channels=1)
    assert source.kind == "tiff" and "cut.tif: cut short (it ends at byte" in source.note
    for index in range(readable):
        assert np.array_equal(source.load(index), CUT_STACK[index])
    for index in range(readable, source.count):  # declared (in one piece) or a page cut through
        with pytest.raises(ValueError, match=r"cut.tif: cut short \(.*\)(: only its first 5 of 10 frames are in it| within this frame)$"):
            source.load(index)
    assert source.count == (10 if layout in ("in one piece", "bigtiff", "big-endian", "imagej") else 6)


def test_imagej_hyperstacks_and_colour_stacks_cut_short_give_their_whole_frames(tmp_path):
    """Frames along T of a TCYX hyperstack for a two-channel network, and RGB frames made grey."""
    hyperstack = RNG.integers(0, 4000, size=(8, 2, 30, 44), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "tc.tif", hyperstack, imagej=True, metadata={"axes": "TCYX"})
    colour = RNG.integers(0, 255, size=(8, 30, 44, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", colour, imagej=True, photometric="rgb", metadata={"axes": "TYXS"})
    for name in ("tc.tif", "rgb.tif"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[:len(data) * 55 // 100])
    [frames] = open_sources([str(tmp_path / "tc.tif")], in_channels=2)
    [grey] = open_sources([str(tmp_path / "rgb.tif")], in_channels=1)
    assert frames.count == grey.count == 8
    for index in range(4):  # 55 % of the file: 4 whole frames
        assert np.array_equal(frames.load(index), hyperstack[index])
        assert np.array_equal(grey.load(index), as_grey(np.moveaxis(colour[index], -1, 0))[0])
    for source in (frames, grey):
        with pytest.raises(ValueError, match=r"\.tif: cut short \(.*\): only its first 4 of 8 frames are in it"):
            source.load(5)


@pytest.mark.parametrize("layout", ["ome"])
def test_a_stack_cut_short_with_only_its_first_directory_is_refused(tmp_path, layout):
    write_cut_short(tmp_path / "cut.tif", layout)
    [source] = open_sources([str(tmp_path / "cut.tif")], in_channels=1)
    assert source.kind == "files"  # failed as one input, named (exit code 1)
    with pytest.raises(ValueError, match=r"cut.tif: cut short \(it ends at byte \d+, before its image directory 2\)"):
        source.load(0)


@pytest.mark.parametrize("layout", list(CUT_WRITERS))
def test_a_volume_or_dataset_cut_short_is_refused(tmp_path, layout):
    write_cut_short(tmp_path / "cut.tif", layout)
    with pytest.raises(ValueError, match="cut.tif: cut short .* a volume needs all of it"):
        read_volume(str(tmp_path / "cut.tif"))
    with pytest.raises(ValueError, match="cut.tif: cut short .* a dataset needs all of it"):
        open_source(str(tmp_path / "cut.tif"), rank=2)


@pytest.mark.parametrize("layout", list(CUT_WRITERS))
def test_whole_files_are_not_cut_short(tmp_path, layout):
    CUT_WRITERS[layout](tmp_path / "whole.tif")
    [source] = open_sources([str(tmp_path / "whole.tif")], in_channels=1)
    assert source.note is None and source.count == 10
    assert np.array_equal(np.stack([source.load(i) for i in range(10)]), CUT_STACK)


def test_segment_writes_the_frames_of_a_stack_cut_short_and_fails_the_rest(server, tmp_path):
    write_cut_short(tmp_path / "acquired.tif", "page by page")
    done = subprocess.run(cli(server, str(tmp_path / "acquired.tif"), "--out", str(tmp_path / "out")),
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "client: warning: " in done.stderr and "acquired.tif: cut short" in done.stderr
    assert "5 written, 1 failed" in done.stderr and "acquired.tif[5]: cannot read frame: " in done.stderr
    assert "acquired.tif: cut short (" in done.stderr and ") within this frame" in done.stderr
    masks = tifffile.imread(tmp_path / "out" / "acquired_mask.tif")
    assert np.array_equal(masks[:5], reference_masks(server, CUT_STACK[:5])) and (masks[5] == FAILED_VALUE).all()


def test_frames_failed_alike_one_after_another_are_one_line(server, tmp_path):
    """Every frame past a cut was told twice, a line each, as it failed and again in the
    summary: a 1000-frame stack cut half-way printed 1000 lines saying one thing."""
    write_cut_short(tmp_path / "acquired.tif", "in one piece")
    write_cut_short(tmp_path / "second.tif", "in one piece")
    done = subprocess.run(cli(server, str(tmp_path / "acquired.tif"), str(tmp_path / "second.tif"), "--out",
                              str(tmp_path / "out")), capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "10 written, 10 failed" in done.stderr
    cut = "cut short (it ends at byte "
    assert [line.split(cut)[0] for line in done.stderr.splitlines() if line.startswith("client: error: ")] == [
        f"client: error: acquired.tif[5]: cannot read frame: {tmp_path / 'acquired.tif'}: ",
        f"client: error: second.tif[5]: cannot read frame: {tmp_path / 'second.tif'}: "]
    listed = done.stderr.split("client: failed frames:\n", 1)[1].splitlines()
    assert [line.split(cut)[0] for line in listed] == [
        f"  acquired.tif[5..9] (5 frames): cannot read frame: {tmp_path / 'acquired.tif'}: ",
        f"  second.tif[5..9] (5 frames): cannot read frame: {tmp_path / 'second.tif'}: "]
    assert all(line.endswith(": only its first 5 of 10 frames are in it") for line in listed)
    assert json.loads((tmp_path / "out" / "acquired.segment.json").read_text())["failed"].keys() == {"5", "6", "7", "8", "9"}


def test_a_tiff_holding_no_image_is_refused_in_one_line_by_every_command(tmp_path, caplog):
    """A TIFF header with no image directory (a write that failed at once) crashed
    segment-volume with an IndexError, ending the batch; segment-dataset with a ZeroDivisionError."""
    import logging

    (tmp_path / "empty.tif").write_bytes(b"II*\x00" + bytes(4))
    refusal = f"{tmp_path / 'empty.tif'}: a TIFF holding no image (its header points to none)"
    with caplog.at_level(logging.WARNING, logger="tifffile"):
        with pytest.raises(ValueError, match=re.escape(refusal)):
            read_volume(str(tmp_path / "empty.tif"))
        with pytest.raises(ValueError, match=re.escape(refusal)):
            open_source(str(tmp_path / "empty.tif"), rank=2)
        [source] = open_sources([str(tmp_path / "empty.tif")], in_channels=1)
        with pytest.raises(ValueError, match=re.escape(refusal)):
            source.load(0)
    assert [record.getMessage() for record in caplog.records if record.name == "tifffile"] == []


def test_an_ome_tiffs_voxel_sizes_in_different_units_are_given_in_one(tmp_path):
    """ImageJ keeps one unit for X, Y and Z: a Z of 2.5 µm beside X and Y in nm was written
    as 2.5 nm, 1000 times too thin in Fiji and napari."""
    volume = np.zeros((4, 8, 8), np.uint16)
    tifffile.imwrite(tmp_path / "nm.ome.tif", volume, metadata={
        "axes": "ZYX", "PhysicalSizeX": 700, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 0.7, "PhysicalSizeYUnit": "\u00b5m",
        "PhysicalSizeZ": 2.5, "PhysicalSizeZUnit": "\u00b5m"})
    tifffile.imwrite(tmp_path / "default.ome.tif", volume, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65, "PhysicalSizeZ": 2.0})
    tifffile.imwrite(tmp_path / "odd.ome.tif", volume, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65, "PhysicalSizeZ": 3, "PhysicalSizeZUnit": "pixel"})
    assert tiff_calibration(tmp_path / "nm.ome.tif") == {"resolution": (1 / 700, 1 / 700), "imagej": {"spacing": 2500.0, "unit": "nm"}}
    assert tiff_calibration(tmp_path / "default.ome.tif") == {"resolution": (1 / 0.65, 1 / 0.65),
                                                              "imagej": {"spacing": 2.0, "unit": "um"}}
    # A Z in no length unit: X and Y kept, no spacing made up.
    assert tiff_calibration(tmp_path / "odd.ome.tif") == {"resolution": (1 / 0.65, 1 / 0.65), "imagej": {"unit": "um"}}


@pytest.mark.parametrize("layout", ["imagej", "ome", "page by page"])
def test_tifffiles_own_warnings_of_a_cut_are_left_to_our_note(tmp_path, caplog, layout):
    """tifffile logged "invalid page offset" (three times per input) beside our note saying the
    same in words that say what is read."""
    import logging

    write_cut_short(tmp_path / "cut.tif", layout)
    with caplog.at_level(logging.WARNING, logger="tifffile"):
        [source] = open_sources([str(tmp_path / "cut.tif")], in_channels=1)
        with contextlib.suppress(ValueError):
            source.load(0)
    assert [record.getMessage() for record in caplog.records if record.name == "tifffile"] == []


def test_a_stack_output_beyond_4_gib_keeps_its_x_and_y_size_without_imagej(tmp_path):
    """An ImageJ TIFF is never a BigTIFF: a calibrated output beyond 4 GiB was written as one
    page that other readers took for the whole file."""
    import types

    tifffile.imwrite(tmp_path / "stack.tif", FRAMES, imagej=True, resolution=(2, 2),
                     metadata={"spacing": 2.5, "unit": "um", "axes": "ZYX"})
    writer = types.SimpleNamespace(source=types.SimpleNamespace(path=tmp_path / "stack.tif"))
    small = StackWriter._tiff_keywords(writer, (5, 40, 56), np.uint8)
    assert small["imagej"] and small["metadata"] == {"spacing": 2.5, "unit": "um", "axes": "ZYX"}
    large = StackWriter._tiff_keywords(writer, (1100, 2048, 2048), np.uint8)
    assert "imagej" not in large and large["resolution"] == ((2, 1), (2, 1))
