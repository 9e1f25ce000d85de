"""A TIFF's pages as frames ``[C, H, W]``, from tifffile's series and their named axes.

tifffile groups a file's pages into series with axes such as ``YX`` (one frame), ``YXS`` (RGB
samples), ``QYX``/``IYX``/``ZYX``/``TYX`` (pages of a stack), ``CYX``/``ZCYX`` (ImageJ and OME
channels), ``TZCYX`` (a hyperstack). A file written page by page (``TiffWriter.write`` in a
loop, as acquisition code does) holds one series per page: read alone, the first series is
the first frame, so such files are read as one stack of all their pages.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
import threading

import numpy as np
import tifffile

CHANNEL_AXES = "CS"  # channels (ImageJ, OME) and samples of a pixel (RGB)
GENERIC_AXES = "QI"  # tifffile's names for page axes of files without axis metadata
# ITU-R 601-2 luma, as PIL's convert("L") (how PNG colour frames become grey).
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def series_flags(tiff: tifffile.TiffFile, path: pathlib.Path) -> dict:
    """tifffile flags to open ``path`` with so that it is one series: ``{}`` when it is, or
    ``is_shaped=False`` for a file of several series of one shape (its pages then form one
    series, axes ``I...``). Several series of different shapes are refused (ValueError)."""
    series = tiff.series
    if len(series) <= 1:
        return {}
    shapes = sorted({(tuple(s.shape), str(s.dtype)) for s in series})
    if len(shapes) > 1:
        listed = ", ".join(f"{list(shape)} {dtype}" for shape, dtype in shapes[:3])
        raise ValueError(f"{path}: {len(series)} images of {len(shapes)} different shapes or pixel types ({listed}"
                         f"{', ...' if len(shapes) > 3 else ''}); a stack's frames share one: save them as separate files")
    return {"is_shaped": False, "is_ome": False, "is_imagej": False}


def open_tiff(path: pathlib.Path) -> tifffile.TiffFile:
    """The file opened as one series (``series_flags``)."""
    tiff = tifffile.TiffFile(path)
    try:
        flags = series_flags(tiff, path)
    except BaseException:
        tiff.close()
        raise
    if not flags:
        return tiff
    tiff.close()
    return tifffile.TiffFile(path, **flags)


@dataclasses.dataclass(frozen=True)
class TiffFrames:
    """A TIFF as ``count`` frames of ``[channels, H, W]`` (read with :meth:`read`).

    Attributes:
        path: the file.
        axes, shape: its series' axes and shape, e.g. ``"ZCYX"``, ``(64, 2, 512, 512)``.
        count: frames: the size of the one axis of frames (1 without one).
        channels: channels of a frame as read (RGB samples made grey count as 1).
        dtype: stored pixel type.
    """

    path: pathlib.Path
    axes: str
    shape: tuple[int, ...]
    count: int
    channels: int
    dtype: np.dtype
    frame_axis: int | None
    channel_axis: int | None
    grey: bool  # RGB(A) samples read as one grey channel
    # The file, opened at the first read and kept (opening one of a thousand series costs
    # ~0.2 s), behind a lock: a stream's workers read frames from several threads.
    _opened: list = dataclasses.field(default_factory=list, repr=False, compare=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.shape[self.axes.index("Y")], self.shape[self.axes.index("X")])

    def read(self, index: int, tiff: tifffile.TiffFile | None = None) -> np.ndarray:
        """Frame ``index`` as ``[C, H, W]`` in the stored pixel type, from ``tiff`` (this file
        opened with :func:`open_tiff`), else from the file this object keeps open."""
        if not 0 <= index < self.count:
            raise IndexError(index)
        if tiff is None:
            with self._lock:
                if not self._opened:
                    self._opened.append(open_tiff(self.path))
                return self.read(index, self._opened[0])
        series = tiff.series[0]
        page_shape = tuple(series.keyframe.shape)
        leading = self.shape[:len(self.shape) - len(page_shape)]
        if math.prod(leading) == len(series.pages) and self.frame_axis is not None and self.frame_axis < len(leading):
            frame = self.frame_of(self.pages_of_frame(series, index, leading, page_shape), 0)
        else:  # one frame, or pages laid out otherwise: the whole series
            frame = self.frame_of(series.asarray().reshape(self.shape), index)
        if self.grey:
            return as_grey(frame)
        return frame[:self.channels]

    def pages_of_frame(self, series, index: int, leading: tuple[int, ...], page_shape: tuple[int, ...]) -> np.ndarray:
        """Frame ``index``'s pages, shaped as the series with the frame axis cut to 1."""
        ranges = [range(size) if axis == self.channel_axis else range(index, index + 1) if axis == self.frame_axis
                  else range(1) for axis, size in enumerate(leading)]
        pages = [int(np.ravel_multi_index(where, leading)) for where in itertools.product(*ranges)]
        return series.asarray(key=pages).reshape(*(len(r) for r in ranges), *page_shape)

    def frame_of(self, array: np.ndarray, index: int) -> np.ndarray:
        """``[C, H, W]`` of frame ``index`` of an array with the series' axes."""
        axes = list(range(array.ndim))
        if self.frame_axis is not None:
            array = np.take(array, index, axis=self.frame_axis)
            axes.remove(self.frame_axis)
        height, width = self.axes.index("Y"), self.axes.index("X")
        first = [self.channel_axis] if self.channel_axis is not None else []
        order = first + [axis for axis in axes if axis not in (*first, height, width)] + [height, width]
        array = np.transpose(array, [axes.index(axis) for axis in order])
        return array.reshape(-1, *array.shape[-2:])


def as_grey(rgb: np.ndarray) -> np.ndarray:
    """``[3 or 4, H, W]`` RGB(A) -> ``[1, H, W]`` luma in the same pixel type (alpha dropped)."""
    grey = np.tensordot(GREY_WEIGHTS, rgb[:3].astype(np.float32), axes=1)[None]
    return np.rint(grey).astype(rgb.dtype) if rgb.dtype.kind in "ui" else grey.astype(rgb.dtype)


def tiff_frames(path: pathlib.Path, in_channels: int | None = None) -> TiffFrames:
    """How ``path`` holds frames, checked against a network of ``in_channels`` (None: any).

    The channel axis is ``C`` or ``S`` (RGB(A) samples are read as one grey channel for a
    one-channel network), or, for a multi-channel network, a generic page axis of that size
    right before the image axes (a ``[N, C, H, W]`` array written without axis metadata). The
    one other axis longer than 1 holds the frames.

    Raises:
        ValueError: more than one axis of frames (a hyperstack ``TZCYX``), channels the network
            does not take, or several images of different shapes.
        tifffile.TiffFileError, OSError: not a readable TIFF.
    """
    with open_tiff(path) as tiff:
        series = tiff.series[0]
        axes, shape, dtype = series.axes, tuple(series.shape), series.dtype
        rgb = series.keyframe.photometric == tifffile.PHOTOMETRIC.RGB
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"{path}: no image axes Y and X (axes {axes}, shape {list(shape)})")
    channel_axis = find_channel_axis(axes, shape, in_channels, path)
    others = [i for i, axis in enumerate(axes) if axis not in "YX" and i != channel_axis and shape[i] > 1]
    if len(others) > 1:
        named = " x ".join(f"{shape[i]} {axes[i]}" for i in others)
        raise ValueError(f"{path}: axes {axes} of shape {list(shape)} hold frames along {len(others)} axes ({named}); "
                         "a stack has one: save one time point or z-stack per file")
    stored_channels = shape[channel_axis] if channel_axis is not None else 1
    grey = rgb and axes[channel_axis or 0] == "S" and in_channels == 1 and stored_channels in (3, 4)
    channels = 1 if grey else 3 if rgb and stored_channels == 4 and in_channels == 3 else stored_channels
    if in_channels is not None and channels != in_channels:
        advice = ": save one channel per file, or convert them to grey" if in_channels == 1 else ""
        raise ValueError(f"{path}: frames of {channels} channels (axes {axes}, shape {list(shape)}); "
                         f"the network takes {in_channels}{advice}")
    frame_axis = others[0] if others else None
    return TiffFrames(path, axes, shape, shape[frame_axis] if others else 1, channels, np.dtype(dtype),
                      frame_axis, channel_axis, grey)


def find_channel_axis(axes: str, shape: tuple[int, ...], in_channels: int | None, path: pathlib.Path) -> int | None:
    named = [i for i, axis in enumerate(axes) if axis in CHANNEL_AXES and shape[i] > 1]
    if len(named) > 1:
        raise ValueError(f"{path}: axes {axes} of shape {list(shape)} hold both channels and samples; save one of them")
    if named:
        return named[0]
    before_image = axes.index("Y") - 1
    if in_channels and in_channels > 1 and before_image > 0 and axes[before_image] in GENERIC_AXES \
            and shape[before_image] == in_channels:
        return before_image
    return None


def read_all(frames: TiffFrames) -> np.ndarray:
    """Every frame: ``[N, C, H, W]``."""
    with open_tiff(frames.path) as tiff:
        return np.stack([frames.read(index, tiff) for index in range(frames.count)])
