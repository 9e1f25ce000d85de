"""A TIFF's pages as frames ``[C, H, W]``, from tifffile's series and their named axes.

tifffile groups a file's pages into series with axes such as ``YX`` (one frame), ``YXS`` (RGB
samples), ``QYX``/``IYX``/``ZYX``/``TYX`` (pages of a stack; ``SYX`` too when a plain
``imwrite`` of 3 or 4 frames stored them as planar samples), ``CYX``/``ZCYX`` (ImageJ and OME
channels; tifffile also writes an OME stack without axes as ``CYX``), ``TZCYX`` (a hyperstack).
A file written page by page (``TiffWriter.write`` in a loop, as acquisition code does) holds one
series per page: read alone, the first series is the first frame, so such files are read as one
stack of all their pages.

A file cut short (an acquisition that crashed mid-write, a copy that stopped) is read as far as
it goes: the pages in it, or for a stack written in one piece its complete frames. The rest of
its frames fail, each naming the cut; a volume or dataset needs all of it and is refused.
"""

from __future__ import annotations

import itertools
import logging
import math
import pathlib
import struct
import threading
import types

import numpy as np
import tifffile

GENERIC_AXES = "QI"  # tifffile's names for page axes of files without axis metadata
COLOUR = (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)  # JPEG stores RGB as YCbCr; read back as RGB
# ITU-R 601-2 luma, as PIL's convert("L") (how PNG colour frames become grey).
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
PAGES_AS_SERIES = {"is_shaped": False, "is_ome": False, "is_imagej": False}  # every page in the file, axes I...


def _not_about_a_cut(record: logging.LogRecord) -> bool:
    """tifffile's warnings of a file cut short (a directory or a tag's value beyond its end,
    series metadata that no longer adds up, no directory at all): ``cut_short`` and
    ``series_flags`` say so once, in words that say what is read."""
    message = record.getMessage()
    return not any(sign in message for sign in ("invalid page offset", "invalid value offset",
                                                "series metadata invalid or corrupted", "contains no pages"))


logging.getLogger("tifffile").addFilter(_not_about_a_cut)


def cut_short(tiff: tifffile.TiffFile) -> str | None:
    """Where the file ends before its own directories say it does, or None for a whole file.

    tifffile stops at an image directory beyond the end without raising, and then reads a
    file cut short as a shorter one (an OME or ImageJ stack as its first frame alone)."""
    if len(tiff.pages) == 0:  # a header alone: nothing to cut (series_flags refuses it)
        return None
    size = tiff.filehandle.size
    last = tiff.pages[len(tiff.pages) - 1]
    layout, handle = tiff.tiff, tiff.filehandle
    handle.seek(last.offset)
    tags = struct.unpack(layout.tagnoformat, handle.read(layout.tagnosize))[0]
    handle.seek(last.offset + layout.tagnosize + tags * layout.tagsize)
    pointer = handle.read(layout.offsetsize)
    next_page = struct.unpack(layout.offsetformat, pointer)[0] if len(pointer) == layout.offsetsize else -1
    if next_page != 0:
        return f"it ends at byte {size}, before its image directory {len(tiff.pages) + 1}"
    data_end = max((o + n for o, n in zip(last.dataoffsets, last.databytecounts)), default=0)
    series = tiff.series[0]
    if series.dataoffset is not None:
        data_end = max(data_end, series.dataoffset + series.nbytes)
    return f"it ends at byte {size}, its image data at byte {data_end}" if data_end > size else None


def refuse_cut_short(tiff: tifffile.TiffFile, path: pathlib.Path, what: str) -> None:
    """Raise ValueError when the file is cut short: ``what`` (a volume) needs all of it."""
    cut = cut_short(tiff)
    if cut:
        raise ValueError(f"{path}: cut short ({cut}): an unfinished write or copy? {what} needs all of it")


def series_flags(tiff: tifffile.TiffFile, path: pathlib.Path) -> dict:
    """tifffile flags to open ``path`` with so that it is one series: ``{}`` when it is, or
    ``is_shaped=False`` for a file of several one-page series of one shape (its pages then form
    one series, axes ``I...``).

    Raises:
        ValueError: no image in it, several series of different shapes, or of several pages each.
    """
    if len(tiff.pages) == 0:  # a header alone: tifffile's readers fail on it with an IndexError
        raise ValueError(f"{path}: a TIFF holding no image (its header points to none): an unfinished write? "
                         "Write it again")
    series = tiff.series
    if len(series) <= 1:
        return {}
    shapes = sorted({(tuple(s.shape), str(s.dtype)) for s in series})
    if len(shapes) > 1:
        listed = ", ".join(f"{list(shape)} {dtype}" for shape, dtype in shapes[:3])
        raise ValueError(f"{path}: {len(series)} images of {len(shapes)} different shapes or pixel types ({listed}"
                         f"{', ...' if len(shapes) > 3 else ''}); a stack's frames share one: save them as separate files")
    if any(len(s.pages) > 1 for s in series):
        raise ValueError(f"{path}: {len(series)} images of shape {list(shapes[0][0])} each; a stack is one image: "
                         "write the whole array with one tifffile.imwrite")
    return {"is_shaped": False, "is_ome": False, "is_imagej": False}


def open_tiff(path: pathlib.Path, flags: dict | None = None) -> tifffile.TiffFile:
    """The file opened as one series, with ``flags`` (``series_flags`` of it; None: found out)."""
    if flags is not None:
        return tifffile.TiffFile(path, **flags)
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


def series_flags_of(path: pathlib.Path) -> dict:
    """``series_flags`` of the file at ``path``."""
    with tifffile.TiffFile(path) as tiff:
        return series_flags(tiff, path)


def zarr_store(path: pathlib.Path):
    """tifffile's zarr store of the file as one series (``series_flags``).

    Raises:
        ValueError: the file is cut short, or not one series.
    """
    with tifffile.TiffFile(path) as tiff:
        refuse_cut_short(tiff, path, "a dataset")
        flags = series_flags(tiff, path)
    return tifffile.imread(path, aszarr=True, **flags)


def imagej_stack_cut_short(tiff: tifffile.TiffFile):
    """Of an ImageJ file cut short before its second image directory (tifffile then reads it
    as its first frame alone): the stack its description declares, uncompressed in one piece
    from the first page's data, which is how ImageJ itself reads its files. None otherwise.

    Returns a series-like namespace: ``axes`` (``TZC`` of those longer than 1, or ``I``, then
    the page's), ``shape``, ``dtype``, ``dataoffset``, ``nbytes``, ``keyframe``."""
    page, metadata = tiff.pages.first, tiff.imagej_metadata or {}
    images = int(metadata.get("images", 1))
    if len(tiff.pages) != 1 or images <= 1 or page.compression != 1 or not page.is_contiguous:
        return None
    sizes = {axis: int(metadata.get(key, 1)) for axis, key in zip("TZC", ("frames", "slices", "channels"))}
    stack = {axis: size for axis, size in sizes.items() if size > 1} or {"I": images}
    if math.prod(stack.values()) != images:
        return None
    shape = (*stack.values(), *page.shape)
    return types.SimpleNamespace(axes="".join(stack) + page.axes, shape=shape, dtype=page.dtype,
                                 dataoffset=page.dataoffsets[0], nbytes=math.prod(shape) * page.dtype.itemsize,
                                 keyframe=page)


class TiffFrames:
    """A TIFF as ``count`` frames of ``[channels, H, W]`` for a network of ``in_channels``
    (None: any), read with :meth:`read` from any thread; :meth:`close` (or ``with``) at the end.

    The channel axis is ``C``, or interleaved samples ``S`` (RGB(A) made grey for a one-channel
    network, as PNG colour frames are), or for a multi-channel network the page axis of that
    size before the image axes (a ``[N, C, H, W]`` array written without axis metadata). The one
    other axis longer than 1 holds the frames; ``C`` alone (an OME stack written without axes)
    holds them too when the network takes another number of channels.

    Raises:
        ValueError: more than one axis of frames (a hyperstack ``TZCYX``), channels the network
            does not take, or several images of different shapes.
        tifffile.TiffFileError, OSError: not a readable TIFF.
    """

    def __init__(self, path: pathlib.Path, in_channels: int | None = None):
        self.path = pathlib.Path(path)
        self.flags = series_flags_of(self.path)
        with open_tiff(self.path, self.flags) as tiff:
            self.cut_short = cut_short(tiff)
            series = (imagej_stack_cut_short(tiff) if self.cut_short else None) or tiff.series[0]
            self.complete = self.complete_frames(tiff, series) if self.cut_short else None
            if self.cut_short and self.complete is None:
                if len(tiff.pages) == 1:  # the directories of a stack's other frames, or one frame's data, are lost
                    raise ValueError(f"{path}: cut short ({self.cut_short}): an unfinished write or copy? "
                                     "Write or copy it again")
                self.flags = PAGES_AS_SERIES  # its directories are what is left of its layout
            else:
                colour = self.take_layout(series)
        if self.flags is PAGES_AS_SERIES:
            with open_tiff(self.path, self.flags) as tiff:
                colour = self.take_layout(tiff.series[0])
        if "Y" not in self.axes or "X" not in self.axes:
            raise ValueError(f"{path}: no image axes Y and X (axes {self.axes}, shape {list(self.shape)})")
        try:
            self.channel_axis = channel_axis(self.axes, self.shape, in_channels)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        if self.channel_axis is not None and self.axes[self.channel_axis] == "C" and self.shape[self.channel_axis] != in_channels \
                and not self.frame_axes(self.channel_axis):
            self.channel_axis = None  # C alone, not the network's channels: frames (OME's default axes)
        frame_axes = self.frame_axes(self.channel_axis)
        stored = self.shape[self.channel_axis] if self.channel_axis is not None else 1
        samples = self.channel_axis == len(self.axes) - 1  # interleaved YXS
        self.grey = samples and colour and in_channels == 1 and stored in (3, 4)
        self.channels = 1 if self.grey else 3 if samples and colour and stored == 4 and in_channels == 3 else stored
        if in_channels is not None and self.channels != in_channels:
            raise ValueError(f"{path}: frames of {plural(self.channels, 'channel')} (axes {self.axes}, shape "
                             f"{list(self.shape)}); the network takes {in_channels}"
                             + (": save one channel per file, or convert them to grey" if in_channels == 1 else ""))
        if len(frame_axes) > 1:
            raise ValueError(self.too_many_axes(frame_axes, in_channels))
        self.frame_axis = frame_axes[0] if frame_axes else None
        self.count = self.shape[self.frame_axis] if frame_axes else 1
        if self.complete is not None and self.frame_axis != 0:
            raise ValueError(f"{path}: cut short ({self.cut_short}): an unfinished write or copy? Its frames are not "
                             f"its first axis (axes {self.axes}), so none of them is whole in the file")
        self._local, self._opened, self._lock = threading.local(), [], threading.Lock()
        self._whole: np.ndarray | None = None

    def take_layout(self, series) -> bool:
        """Take the axes, shape and pixel type of ``series``; True for colour pages."""
        self.axes, self.shape, self.dtype = series.axes, tuple(series.shape), np.dtype(series.dtype)
        return series.keyframe.photometric in COLOUR

    def complete_frames(self, tiff: tifffile.TiffFile, series) -> int | None:
        """Of a file cut short whose stack ``series`` is in one piece (tifffile places every
        frame after the first directory; ImageJ always does): how many leading rows are whole
        in it, mapped from ``data_offset`` in ``stored_dtype``. None for any other layout: it
        is read by the directories that are left."""
        if series.dataoffset is None or len(series.shape) <= 2:
            return None
        self.data_offset, self.stored_dtype = series.dataoffset, np.dtype(tiff.byteorder + series.dtype.char)
        return (tiff.filehandle.size - series.dataoffset) // (series.nbytes // series.shape[0])

    def frame_axes(self, channel: int | None) -> list[int]:
        return [i for i, axis in enumerate(self.axes) if axis not in "YX" and i != channel and self.shape[i] > 1]

    def too_many_axes(self, frame_axes: list[int], in_channels: int | None) -> str:
        named = " x ".join(f"{self.shape[i]} {self.axes[i]}" for i in frame_axes)
        if all(self.axes[i] in GENERIC_AXES for i in frame_axes):  # no axis metadata: say what shapes work
            stack = "[N, H, W]" if in_channels in (None, 1) else f"[N, {in_channels}, H, W]"
            return (f"{self.path}: shape {list(self.shape)} holds frames along {len(frame_axes)} axes ({named}); "
                    f"a stack for this network is {stack}")
        return (f"{self.path}: axes {self.axes} of shape {list(self.shape)} hold frames along {len(frame_axes)} axes "
                f"({named}); a stack has one: save one time point or z-stack per file")

    @property
    def cut_short_note(self) -> str | None:
        """What of a file cut short is read, or None for a whole file."""
        if not self.cut_short:
            return None
        read = f"{self.complete} of its {self.count} frames" if self.complete is not None else \
            f"the {plural(self.count, 'frame')} whose pages are in it"
        return f"{self.path}: cut short ({self.cut_short}): an unfinished write or copy? Reading {read}"

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.shape[self.axes.index("Y")], self.shape[self.axes.index("X")])

    def read(self, index: int) -> np.ndarray:
        """Frame ``index`` as ``[C, H, W]`` in the stored pixel type."""
        if not 0 <= index < self.count:
            raise IndexError(index)
        if self.complete is not None and index >= self.complete:
            # No frame index in the words: the caller names the frame, and frames failed alike are one line.
            raise ValueError(f"{self.path}: cut short ({self.cut_short}): only its first {self.complete} of "
                             f"{self.count} frames are in it")
        try:
            frame = self.read_stored(index)
        except Exception as error:  # a page cut through: tifffile's or a codec's error
            if not self.cut_short:
                raise
            raise ValueError(f"{self.path}: cut short ({self.cut_short}) within this frame") from error
        return as_grey(frame) if self.grey else frame[:self.channels]

    def read_stored(self, index: int) -> np.ndarray:
        """Frame ``index`` with every stored channel: ``[C, H, W]``."""
        series = self._file().series[0]
        page_shape = tuple(series.keyframe.shape)
        leading = self.shape[:len(self.shape) - len(page_shape)]
        if math.prod(leading) == len(series.pages) and self.frame_axis is not None and self.frame_axis < len(leading):
            return self.frame_of(self.pages_of_frame(series, index, leading, page_shape), 0)
        return self.frame_of(self.whole(series), index)  # one frame, or pages laid out otherwise (ImageJ over 4 GB)

    def _file(self) -> tifffile.TiffFile:
        """This thread's handle of the file: opened once per thread (reopening one of a thousand
        series costs ~0.2 s), and decoding in parallel."""
        tiff = getattr(self._local, "tiff", None)
        if tiff is None:
            tiff = self._local.tiff = open_tiff(self.path, self.flags)
            with self._lock:
                self._opened.append(tiff)
        return tiff

    def whole(self, series) -> np.ndarray:
        """The whole series, mapped when it is stored uncompressed in one piece, else decoded
        once (and kept when it has more than one frame)."""
        with self._lock:
            if self._whole is not None:
                return self._whole
            try:
                if self.complete is not None:  # cut short: the complete rows, where tifffile placed them all
                    whole = np.memmap(self.path, self.stored_dtype, mode="r", offset=self.data_offset,
                                      shape=(self.complete, *self.shape[1:]))
                else:
                    whole = tifffile.memmap(self.path, mode="r", **self.flags).reshape(self.shape)
            except ValueError:  # compressed or in pieces: not mappable
                whole = series.asarray().reshape(self.shape)
            if self.count > 1:
                self._whole = whole
            return whole

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

    def read_all(self) -> np.ndarray:
        """Every frame: ``[N, C, H, W]``."""
        return np.stack([self.read(index) for index in range(self.count)])

    def close(self) -> None:
        """Close every thread's handle (a later read opens the file again)."""
        with self._lock:
            opened, self._opened, self._whole = self._opened, [], None
            self._local = threading.local()
        for tiff in opened:
            tiff.close()

    def __enter__(self) -> TiffFrames:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def channel_axis(axes: str, shape: tuple[int, ...], in_channels: int | None) -> int | None:
    """Index of the channel axis in ``axes`` (see :class:`TiffFrames`), or None.

    Raises:
        ValueError: both channels and interleaved samples.
    """
    named = [i for i, axis in enumerate(axes) if shape[i] > 1 and (axis == "C" or (axis == "S" and i == len(axes) - 1))]
    if len(named) > 1:
        raise ValueError(f"axes {axes} of shape {list(shape)} hold both channels and colour samples; save one of them")
    if named:
        return named[0]
    before_image = axes.index("Y") - 1  # planar samples (SYX) count as a page axis here
    if in_channels and in_channels > 1 and before_image >= 0 and axes[before_image] in f"{GENERIC_AXES}S" \
            and shape[before_image] == in_channels:
        return before_image
    return None


def as_grey(rgb: np.ndarray) -> np.ndarray:
    """``[3 or 4, H, W]`` RGB(A) -> ``[1, H, W]`` luma in the same pixel type (alpha dropped)."""
    grey = np.tensordot(GREY_WEIGHTS, rgb[:3].astype(np.float32), axes=1)[None]
    return np.rint(grey).astype(rgb.dtype) if rgb.dtype.kind in "ui" else grey.astype(rgb.dtype)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def tiff_calibration(path: pathlib.Path) -> dict:
    """What sizes a TIFF's pixels (voxels), as ``tifffile.imwrite`` takes it, so that its masks
    overlay it at its scale in Fiji or napari: ``resolution`` (pixels per unit in X and Y) and
    ``resolutionunit`` from its first page, and ``spacing`` (Z) and ``unit`` from its ImageJ
    description or, for an OME-TIFF, its physical sizes. {} when it has none."""
    with open_tiff(path) as tiff:
        page, calibration = tiff.pages.first, {}
        x, y, unit = (page.tags.get(name) for name in ("XResolution", "YResolution", "ResolutionUnit"))
        if x is not None and y is not None and all(part > 0 for value in (x.value, y.value) for part in value):
            calibration["resolution"] = (x.value, y.value)  # a 0/0 rational is no size (and tifffile cannot write it)
        if unit is not None:
            calibration["resolutionunit"] = unit.value
        imagej = {key: value for key, value in (tiff.imagej_metadata or {}).items() if key in ("spacing", "unit")}
        if not imagej and tiff.is_ome:
            try:
                imagej = ome_calibration(tiff, calibration)
            except (ValueError, TypeError, SyntaxError):  # malformed XML (ParseError), a size not a number
                imagej = {}
    return {**calibration, "imagej": imagej} if imagej else calibration


# OME's length units (the common ones) in metres: ImageJ has one unit for X, Y and Z.
OME_LENGTH_UNITS = {"m": 1.0, "dm": 1e-1, "cm": 1e-2, "mm": 1e-3, "\u00b5m": 1e-6, "\u03bcm": 1e-6, "um": 1e-6,
                    "nm": 1e-9, "pm": 1e-12, "\u00c5": 1e-10}


def ome_calibration(tiff: tifffile.TiffFile, calibration: dict) -> dict:
    """An OME-TIFF's physical voxel sizes as ImageJ's ``spacing`` and ``unit`` (X and Y into
    ``calibration["resolution"]``), all in X's unit (Z in µm beside X in nm was written as nm,
    1000 times too thin); {} when its metadata gives none. A size in a unit not convertible to
    X's is left out."""
    try:
        image = tifffile.xml2dict(tiff.ome_metadata)["OME"]["Image"]
        pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
    except (KeyError, IndexError, TypeError, ValueError):
        return {}
    units = {axis: str(pixels.get(f"PhysicalSize{axis}Unit", "\u00b5m")) for axis in "XYZ"}  # OME's default: µm
    unit = units["X"] if pixels.get("PhysicalSizeX") else units["Z"]

    def size_in_unit(axis: str) -> float | None:
        size = pixels.get(f"PhysicalSize{axis}")
        if not size:
            return None
        if units[axis] == unit:
            return float(size)
        ratio = [OME_LENGTH_UNITS.get(name) for name in (units[axis], unit)]
        return float(f"{float(size) * ratio[0] / ratio[1]:.12g}") if all(ratio) else None  # 2.5 µm: 2500 nm, not 2499.9999999999995

    x, y, z = (size_in_unit(axis) for axis in "XYZ")
    if x and y:
        calibration["resolution"] = (1 / x, 1 / y)
        calibration.pop("resolutionunit", None)  # ImageJ's unit says what they are in
    imagej = {"spacing": z} if z else {}
    if x or z:
        # ImageJ's description is ASCII, and it reads "um" as micron.
        imagej["unit"] = unit.replace("\u00b5", "u").replace("\u03bc", "u")
    return imagej


def tiff_keywords(calibration: dict | None, axes: str) -> dict:
    """``tifffile.imwrite``'s keywords that give an output of ``axes`` the input's pixel sizes
    (``calibration``, as :func:`tiff_calibration` reads it), so that it overlays the input at
    its scale in Fiji or napari, and Fiji measures in its unit: with an ImageJ unit or Z
    spacing, an ImageJ image where ImageJ has the axes' order (``YX``, ``CYX``, ``ZYX``,
    ``TYX``, ``TCYX``, ``ZCYX``; what Fiji reads its scale from), else the X and Y resolution
    only (in no unit, when the unit was ImageJ's)."""
    calibration = dict(calibration or {})
    imagej = calibration.pop("imagej", None)
    if imagej and axes in IMAGEJ_AXES:
        calibration.pop("resolutionunit", None)  # ImageJ's own unit
        metadata = {key: value for key, value in imagej.items() if key != "spacing" or "Z" in axes}
        return {"imagej": True, "metadata": {**metadata, "axes": axes}, **calibration}
    if imagej and "resolution" in calibration:  # pixels per ImageJ unit (an OME-TIFF's µm): none TIFF names
        calibration["resolutionunit"] = tifffile.RESUNIT.NONE
    return {"photometric": "minisblack", **calibration}


IMAGEJ_AXES = ("YX", "CYX", "ZYX", "TYX", "TCYX", "ZCYX")


def write_tiff(path: pathlib.Path, array: np.ndarray, calibration: dict | None, axes: str) -> None:
    """``array`` of ``axes`` as a zlib-compressed TIFF with the input's pixel sizes
    (:func:`tiff_keywords`)."""
    tifffile.imwrite(path, array, compression="zlib", **tiff_keywords(calibration, axes))
