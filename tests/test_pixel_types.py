"""Pixel types the client converts before sending, and compressed TIFFs it reads.

Counting detectors (Pilatus, Eiger) store uint32 frames; numpy frames and volumes of int32,
uint32, int64 and uint64 are cast to float32 on the client (as float64, float16, int8 and bool
were), so they get exactly the mask of their float32 copy. LZW- and JPEG-compressed TIFFs
(microscope software) need imagecodecs, which tifffile uses for every codec but zlib and LZMA.
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import tifffile
import torch

from client import SegmentationClient
from client.__main__ import main as client_main
from client.frames import read_frame
from client.stacks import open_sources
from client.transports import NUMPY_CAST_TO_FLOAT32, as_channel_first
from tests.test_transports import client_for

INTEGER_TYPES = (np.int32, np.uint32, np.int64, np.uint64)


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return skimage.data.camera()  # 512 x 512 uint8


@pytest.fixture(scope="module")
def camera_mask(server, camera) -> np.ndarray:
    with SegmentationClient(server.grpc_url) as client:
        mask = client.segment(camera.astype(np.float32)).mask
    assert len(np.unique(mask)) > 1  # not one class everywhere: equal masks say something
    return mask


@pytest.mark.parametrize("dtype", INTEGER_TYPES, ids=lambda d: np.dtype(d).name)
def test_wide_integer_frames_are_cast_to_float32(dtype):
    frame = (np.arange(12).reshape(3, 4) * 1_000_003).astype(dtype)  # up to 11e6: exact in float32
    image = as_channel_first(frame)
    assert np.dtype(dtype) in NUMPY_CAST_TO_FLOAT32
    assert image.dtype == np.float32 and image.shape == (1, 3, 4) and np.array_equal(image[0], frame)
    tensor = as_channel_first(torch.from_numpy(frame))  # a CPU tensor becomes a numpy array, cast alike
    assert isinstance(tensor, np.ndarray) and tensor.dtype == np.float32 and np.array_equal(tensor, image)


def test_a_gpu_int32_tensor_is_refused_in_one_line(monkeypatch):
    """GPU tensors are not cast (that would copy them to the host): refused as before."""
    if torch.cuda.is_available():
        tensor = torch.zeros(8, 8, dtype=torch.int32, device="cuda")
    else:  # what as_channel_first sees of one: a tensor on_gpu says is in GPU memory
        tensor = torch.zeros(8, 8, dtype=torch.int32)
        monkeypatch.setattr("client.transports.on_gpu", lambda frame: True)
    with pytest.raises(ValueError) as error:
        as_channel_first(tensor)
    assert str(error.value) == "pixel type int32 is not supported; use one of float32, uint8, uint16, int16"


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_uint32_and_int32_frames_get_the_mask_of_their_float32_copy(server, camera, camera_mask, transport):
    with client_for(server, transport) as client:
        for frame in (camera.astype(np.uint32), camera.astype(np.int32), torch.from_numpy(camera.astype(np.int32))):
            assert np.array_equal(client.segment(frame).mask, camera_mask), (transport, frame.dtype)
        negative = camera.astype(np.int32) - 128
        counts = camera.astype(np.uint32) * 100_003  # up to 2.6e7 counts: beyond 2**24, rounded
        for frame in (negative, counts, counts.astype(np.uint64)):
            assert np.array_equal(client.segment(frame).mask, client.segment(frame.astype(np.float32)).mask)


def test_an_int32_volume_gets_the_mask_of_its_float32_copy(server, rng):
    volume = rng.integers(-1000, 400, (40, 50, 60)).astype(np.int32)
    with SegmentationClient(server.grpc_url, model="segment_3d") as client:
        expected = client.segment_volume(volume.astype(np.float32))
        got = client.segment_volume(volume)
    assert got.mask.shape == (40, 50, 60) and np.array_equal(got.mask, expected.mask)


def test_cli_segments_uint32_and_int32_frames_stacks_and_volumes(server, camera, camera_mask, tmp_path, rng):
    np.save(tmp_path / "cam_u32.npy", camera.astype(np.uint32))
    tifffile.imwrite(tmp_path / "cam_i32.tif", camera.astype(np.int32))
    tifffile.imwrite(tmp_path / "stack_u32.tif", np.stack([camera[:200, :300], camera[200:400, 100:400]]).astype(np.uint32))
    out = tmp_path / "out"
    common = ["--out", str(out), "--url", server.grpc_url, "--no-progress"]
    assert client_main(["segment", str(tmp_path / "cam_u32.npy"), str(tmp_path / "cam_i32.tif"),
                        str(tmp_path / "stack_u32.tif"), "--no-overlay", *common]) == 0
    assert np.array_equal(tifffile.imread(out / "cam_u32_mask.tif"), camera_mask)
    assert np.array_equal(tifffile.imread(out / "cam_i32_mask.tif"), camera_mask)
    with SegmentationClient(server.grpc_url) as client:
        expected = [client.segment(camera[:200, :300].astype(np.float32)).mask,
                    client.segment(camera[200:400, 100:400].astype(np.float32)).mask]
    assert np.array_equal(tifffile.imread(out / "stack_u32_mask.tif"), np.stack(expected))

    volume = rng.integers(-1000, 400, (40, 50, 60)).astype(np.int32)
    np.save(tmp_path / "ct_i32.npy", volume)
    tifffile.imwrite(tmp_path / "ct_u32.tif", (volume + 1000).astype(np.uint32))
    assert client_main(["segment-volume", str(tmp_path / "ct_i32.npy"), str(tmp_path / "ct_u32.tif"),
                        "--model", "segment_3d", *common]) == 0
    with SegmentationClient(server.grpc_url, model="segment_3d") as client:
        assert np.array_equal(np.load(out / "ct_i32_mask.npy"), client.segment_volume(volume.astype(np.float32)).mask)
        assert np.array_equal(tifffile.imread(out / "ct_u32_mask.tif"),
                              client.segment_volume((volume + 1000).astype(np.float32)).mask)


def test_an_lzw_compressed_tiff_frame_is_read(tmp_path, camera):
    frame = camera.astype(np.uint16) * 200
    tifffile.imwrite(tmp_path / "lzw.tif", frame, compression="lzw")
    read = read_frame(tmp_path / "lzw.tif")
    assert read.dtype == np.uint16 and np.array_equal(read, frame)


def test_a_jpeg_compressed_tiff_frame_is_read(tmp_path, camera):
    tifffile.imwrite(tmp_path / "jpeg.tif", camera, compression="jpeg", photometric="minisblack")
    read = read_frame(tmp_path / "jpeg.tif")
    assert read.shape == camera.shape and read.dtype == np.uint8
    assert np.abs(read.astype(np.float32) - camera).mean() < 3  # lossy


def test_an_lzw_compressed_tiff_stack_is_read_frame_by_frame(tmp_path, camera):
    stack = np.stack([camera, camera[::-1], camera.T]).astype(np.uint16)
    path = tmp_path / "stack_lzw.tif"
    tifffile.imwrite(path, stack, compression="lzw", photometric="minisblack")
    [source] = open_sources([str(path)], 1)
    assert source.kind == "tiff" and source.count == 3
    for i in range(3):
        assert np.array_equal(source.load(i), stack[i])
