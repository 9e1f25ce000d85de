"""Reading frames and writing masks, probabilities and overlays."""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image

from client.tiffs import TiffFrames, write_tiff
from segproto import looks_channels_last

FRAME_SUFFIXES = (".tif", ".tiff", ".png", ".npy")
OME_TIFF_SUFFIXES = (".ome.tif", ".ome.tiff")  # outputs are plain TIFF: named without the .ome
# Class colours of the overlay (class 0 is left uncoloured).
CLASS_COLOURS = np.array(
    [[0, 0, 0], [230, 60, 60], [60, 200, 90], [70, 120, 240], [240, 200, 40], [200, 80, 220], [40, 210, 220]],
    dtype=np.float32,
)


def image_stem(path: pathlib.Path) -> str:
    """The name outputs are named after: ``scan.tif`` and ``scan.ome.tif`` -> ``scan``."""
    for suffix in OME_TIFF_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def read_frame(path: pathlib.Path, in_channels: int | None = None) -> np.ndarray:
    """A frame as ``[H, W]`` or ``[C, H, W]`` in its stored pixel type.

    PNG colour images are converted to one grey channel, or to RGB for a three-channel network;
    NPY arrays are returned as stored; TIFF ones as :class:`client.tiffs.TiffFrames` reads
    them for a network of ``in_channels`` (RGB(A) samples first, or grey for one channel).

    Raises:
        ValueError: not one frame (a TIFF stack), unsupported type or rank.
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        frame = read_tiff(path, in_channels)
    elif suffix == ".npy":
        frame = load_npy(path)
        check_not_channels_last(frame.shape, path, in_channels)
    elif suffix == ".png":
        frame = read_png(path, in_channels)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FRAME_SUFFIXES)}")
    if frame.ndim not in (2, 3):
        raise ValueError(f"{path}: expected a 2D frame [H, W] or [C, H, W], got shape {list(frame.shape)}")
    return frame


def read_png(path: pathlib.Path, in_channels: int | None = None) -> np.ndarray:
    """``[H, W]``, or ``[3, H, W]`` RGB for a three-channel network: colour, palette and grey
    with alpha made grey (or RGB), as PIL converts them.

    Raises:
        ValueError: a 16-bit colour or grey-with-alpha PNG, of which PIL reads only the high
            8 bits of each sample.
    """
    with Image.open(path) as image:
        stored_as = image.tile[0][3] if image.tile else ""
        if stored_as in ("RGB;16B", "RGBA;16B", "LA;16B"):  # PNG's colour and grey+alpha types at 16 bits
            raise ValueError(f"{path}: a 16-bit {stored_as[:-4]} PNG, of which the PNG reader (Pillow) keeps only "
                             "the high 8 bits of each sample; save it as a 16-bit TIFF, or as a 16-bit grey PNG")
        if in_channels == 3 and image.mode in ("RGB", "RGBA", "P", "LA", "L"):
            return np.moveaxis(np.asarray(image.convert("RGB")), -1, 0)
        if image.mode in ("RGB", "RGBA", "P", "LA"):
            image = image.convert("L")
        return np.asarray(image)


def read_tiff(path: pathlib.Path, in_channels: int | None = None) -> np.ndarray:
    """A one-frame TIFF as ``[H, W]`` (one channel) or ``[C, H, W]``."""
    with TiffFrames(path, in_channels) as frames:
        if frames.count > 1:
            raise ValueError(f"{path}: a stack of {frames.count} frames (axes {frames.axes}), not one frame; "
                             "give it as an input of its own, not in a directory")
        frame = frames.read(0)
    return frame[0] if frame.shape[0] == 1 else frame


def check_not_channels_last(shape: tuple[int, ...], path: pathlib.Path, in_channels: int | None = None) -> None:
    """Refuse a picture as numpy holds it (imageio, ``np.asarray(PIL image)``): ``[H, W, C]``,
    which as a stack would be H frames of W x C pixels (``segproto.looks_channels_last``). The
    advice is the network's: ``[C, H, W]`` for one of C channels; for a one-channel network that
    would be a stack of C frames, so grey ``[H, W]``."""
    if len(shape) == 3 and looks_channels_last(shape):
        channels_first = "save it as [C, H, W] (numpy.moveaxis(a, -1, 0)), or in grey as [H, W]"
        grey = ("save it in grey as [H, W] (e.g. a.mean(axis=-1)): the network takes one channel, and [C, H, W] "
                "would be a stack of C frames")
        raise ValueError(f"{path}: shape {list(shape)} looks like a channels-last [H, W, C] picture; "
                         f"{grey if in_channels == 1 else channels_first}")


def load_npy(path, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` without pickles; an empty or truncated file raises ValueError naming it
    (NumPy raises a bare EOFError)."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except EOFError as error:
        raise ValueError(f"{path}: empty or truncated .npy file ({error})") from error


def write_array(path: pathlib.Path, array: np.ndarray, calibration: dict | None = None) -> pathlib.Path:
    """Write a frame's output ``array`` (``[H, W]`` or ``[K, H, W]``) as TIFF (zlib-compressed,
    sized as its input by ``calibration``: :func:`client.tiffs.tiff_calibration`) or NPY, by
    ``path``'s suffix."""
    path = pathlib.Path(path)
    if path.suffix == ".npy":
        np.save(path, array)
    else:
        write_tiff(path, array, calibration, "YX" if array.ndim == 2 else "CYX")
    return path


def display_range(frame: np.ndarray) -> np.ndarray:
    """First channel of a frame scaled to uint8 between its 1st and 99th percentiles."""
    grey = np.asarray(frame, dtype=np.float32)
    grey = grey[0] if grey.ndim == 3 else grey
    low, high = np.percentile(grey, [1, 99])
    scaled = (grey - low) / max(high - low, 1e-12)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def overlay(frame: np.ndarray, mask: np.ndarray, alpha: float = 0.45, max_size: int = 2048) -> Image.Image:
    """RGB quick-look of ``mask`` [H, W] over ``frame``, shrunk so its longer side <= max_size."""
    grey = display_range(frame).astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    colours = CLASS_COLOURS[np.minimum(mask, len(CLASS_COLOURS) - 1)]
    coloured = mask > 0
    rgb[coloured] = (1 - alpha) * rgb[coloured] + alpha * colours[coloured]
    image = Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    if max(image.size) > max_size:
        scale = max_size / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)
    return image
