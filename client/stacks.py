"""Stacks of frames in and out: multi-page TIFF, NPY, HDF5 datasets, directories and lists of
image files, each written back into the matching kind of container, with a run record that
lets an interrupted run resume.

A container input is a stack when its rank is one more than a frame's: ``[N, H, W]`` for a
one-channel network, ``[N, C, H, W]`` otherwise; a rank-2 array (or ``[C, H, W]`` with C > 1)
is one frame (an HDF5 dataset too: its outputs are then frame-shaped). Stack outputs are
preallocated (``[N, H, W]`` masks) under partial names and written in input order;
``<stem>.segment.json`` next to them records how many frames are done and which failed, and is updated only after a frame's data is in the file, so resuming never
skips a frame that is not there. Once every frame is processed (and not every one failed) the
outputs take their own names. A frame that failed is filled with ``FAILED_VALUE`` (mask, contour) or NaN
(probabilities) and listed in the record and the summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import pathlib
import shutil
import sys
from collections.abc import Callable

import numpy as np
import tifffile

from client.frame_files import FrameFile
from client.frames import FRAME_SUFFIXES, check_not_channels_last, image_stem, load_npy, overlay, read_frame, write_array
from client.tiffs import TiffFrames, tiff_calibration, tiff_keywords
from segproto import DEFAULT_BLEND, DEFAULT_OVERLAP

FAILED_VALUE = 255  # mask/contour value of a frame that failed: never a class of our networks
RECORD_VERSION = 1
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs")


@dataclasses.dataclass
class Source:
    """Frames from one input: ``load(i)`` reads frame ``i`` (``[H, W]`` or ``[C, H, W]``).

    ``kind`` is ``files`` (one image file per frame) or the container of a stack
    (``tiff``, ``npy``, ``hdf5``); ``frame_shape`` is set for stacks. ``one_frame``: a container
    holding a single frame without a stack axis (a 2D HDF5 dataset), written back so. ``note``:
    what the user should know of how it is read (a file cut short).
    """

    label: str
    kind: str
    count: int
    load: Callable[[int], np.ndarray]
    frame_label: Callable[[int], str]
    path: pathlib.Path | None = None
    dataset: str | None = None
    frame_shape: tuple[int, ...] | None = None
    files: list[pathlib.Path] | None = None
    close: Callable[[], None] = lambda: None  # frees what ``load`` keeps open
    one_frame: bool = False
    note: str | None = None


def refuse_missing_filters(dataset) -> None:
    """Refuse, before any frame is read, an h5py dataset compressed with a filter HDF5 cannot
    apply here (every read failed with HDF5's "can't open directory (/usr/local/lib/plugin)"),
    closing its file.

    Raises:
        ValueError: naming the dataset and the filter.
    """
    import h5py

    plist = dataset.id.get_create_plist()
    for position in range(plist.get_nfilters()):
        code, _, _, name = plist.get_filter(position)
        if not h5py.h5z.filter_avail(code):
            where = f"{dataset.file.filename}:{dataset.name}"
            dataset.file.close()
            advice = ("decompress it with h5repack where its filter is installed" if "hdf5plugin" in sys.modules
                      else "install hdf5plugin (pip install hdf5plugin), which has the common ones")
            raise ValueError(f"{where}: compressed with HDF5 filter {code} ({name.decode(errors='replace')}), which "
                             f"this HDF5 library cannot read; {advice}")


def split_hdf5_argument(argument: str) -> tuple[pathlib.Path, str] | None:
    """``file.h5:/path/to/data`` -> (file, dataset path); None for anything else. The file
    ends at the first ``:`` after an HDF5 suffix (directories may have ``:`` in their names,
    as timestamped run directories do)."""
    for position, character in enumerate(argument):
        if character == ":" and pathlib.Path(argument[:position]).suffix.lower() in HDF5_SUFFIXES:
            dataset = argument[position + 1:]
            return pathlib.Path(argument[:position]), dataset if dataset.startswith("/") else f"/{dataset}"
    return None


def open_hdf5_dataset(path: pathlib.Path, dataset_path: str):
    """The h5py dataset at ``dataset_path``, its file open for reading (close it with
    ``dataset.file.close()``).

    Datasets compressed as detectors write them (Dectris Eiger's bitshuffle/LZ4, Blosc, zstd,
    LZ4...) are read through ``hdf5plugin``'s filters.

    Raises:
        ValueError: naming the file: not readable as HDF5, no dataset there (a group's
            datasets are listed), or compressed with a filter this HDF5 library lacks.
    """
    import h5py

    with contextlib.suppress(ImportError):  # a dependency; without it, refuse_missing_filters says so
        import hdf5plugin  # noqa: F401 - registers its compression filters with h5py's HDF5

    try:
        handle = h5py.File(path, "r")
    except OSError as error:  # not HDF5, truncated, locked
        raise ValueError(f"{path}: not a readable HDF5 file ({error})") from None
    item = handle.get(dataset_path)
    if isinstance(item, h5py.Dataset):
        refuse_missing_filters(item)
        return item
    if isinstance(item, h5py.Group):
        inside = [name for name, child in item.items() if isinstance(child, h5py.Dataset)]
        handle.close()
        raise ValueError(f"{path}: {dataset_path!r} is a group, not a dataset; "
                         + (f"its datasets: {', '.join(inside[:8])}" if inside else "it holds no datasets"))
    handle.close()
    raise ValueError(f"{path}: no dataset {dataset_path!r}")


def is_stack_shape(shape: tuple[int, ...], in_channels: int) -> bool:
    frame_rank = 2 if in_channels == 1 else 3
    return len(shape) == frame_rank + 1


def open_sources(arguments: list[str], in_channels: int) -> list[Source]:
    """One Source per stack, directory, or run of consecutive single-frame files.

    Raises:
        ValueError, OSError: an input that does not exist or cannot be a frame or stack.
    """
    sources: list[Source] = []
    loose: list[pathlib.Path] = []
    for argument in arguments:
        stack = open_stack(argument, in_channels)
        if stack is None:
            loose.append(pathlib.Path(argument))
            continue
        if loose:
            sources.append(file_source(loose, "files", in_channels))
            loose = []
        sources.append(stack)
    if loose:
        sources.append(file_source(loose, "files", in_channels))
    return sources


def open_stack(argument: str, in_channels: int) -> Source | None:
    """The stack named by ``argument``, or None when it names a single-frame file."""
    hdf5 = split_hdf5_argument(argument)
    if hdf5 is not None:
        return hdf5_source(*hdf5, in_channels)
    path = pathlib.Path(argument)
    if path.is_dir():
        # "._scan.tif" is macOS's AppleDouble metadata beside scan.tif on a network share, not a frame.
        files = sorted(p for p in path.iterdir()
                       if p.suffix.lower() in FRAME_SUFFIXES and p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"{path}: no frames ({', '.join(FRAME_SUFFIXES)}) in this directory")
        # The absolute name ("." and ".." have none of their own, and ".." put the outputs beside
        # --out), symbolic links not followed (a link's outputs go under its own name, as before).
        return file_source(files, pathlib.Path(os.path.abspath(path)).name or "root", in_channels, kind="directory")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        raise ValueError(f"{path}: name the dataset, e.g. {path}:/entry/data")
    try:
        if suffix == ".npy":
            array = load_npy(path, mmap_mode="r")
            check_not_channels_last(array.shape, path, in_channels)  # refused, as a frame, by read_frame
            if not is_stack_shape(array.shape, in_channels):
                return None
            frames = FrameFile.of_memmap(array)
            return array_source(path.name, "npy", frames or array, path, close=frames.close if frames else None)
        if suffix in (".tif", ".tiff"):
            return tiff_source(path, in_channels)
    except (OSError, ValueError, tifffile.TiffFileError):
        return None  # not readable as a stack: a single frame whose read error is reported on its own
    return None


def file_source(files: list[pathlib.Path], label: str, in_channels: int, kind: str = "files") -> Source:
    return Source(label=label, kind=kind, count=len(files), load=lambda i: read_frame(files[i], in_channels),
                  frame_label=lambda i: str(files[i]), files=list(files))


def array_source(label: str, kind: str, array, path: pathlib.Path, dataset: str | None = None,
                 close: Callable[[], None] | None = None) -> Source:
    """A stack over anything indexable by frame (FrameFile, numpy memmap, h5py dataset)."""
    return Source(label=label, kind=kind, count=int(array.shape[0]), load=lambda i: np.asarray(array[i]),
                  frame_label=lambda i: f"{label}[{i}]", path=path, dataset=dataset,
                  frame_shape=tuple(int(d) for d in array.shape[1:]), close=close or (lambda: None))


def tiff_source(path: pathlib.Path, in_channels: int) -> Source | None:
    """The TIFF's frames (:class:`client.tiffs.TiffFrames`); None for a file of one frame."""
    frames = TiffFrames(path, in_channels)
    if frames.count == 1:
        frames.close()
        return None

    def load(i: int) -> np.ndarray:
        frame = frames.read(i)
        return frame[0] if in_channels == 1 else frame

    return Source(label=path.name, kind="tiff", count=frames.count, load=load, frame_label=lambda i: f"{path.name}[{i}]",
                  path=path, frame_shape=frames.frame_shape[1:] if in_channels == 1 else frames.frame_shape,
                  close=frames.close, note=frames.cut_short_note)


def hdf5_source(path: pathlib.Path, dataset_path: str, in_channels: int) -> Source:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    dataset = open_hdf5_dataset(path, dataset_path)
    label = f"{path.name}:{dataset_path}"
    if is_stack_shape((1, *dataset.shape), in_channels):  # one frame, as a detector writes a single image
        return Source(label=label, kind="hdf5", count=1, load=lambda i: np.asarray(dataset[...]),
                      frame_label=lambda i: label, path=path, dataset=dataset_path,
                      frame_shape=tuple(int(d) for d in dataset.shape), one_frame=True)
    if not is_stack_shape(dataset.shape, in_channels):
        dataset.file.close()
        frame = "[H, W]" if in_channels == 1 else f"[{in_channels}, H, W]"
        raise ValueError(f"{path}:{dataset_path}: shape {list(dataset.shape)} is neither a frame {frame} "
                         f"nor a stack [N, {frame[1:]}")
    return array_source(label, "hdf5", dataset, path, dataset_path)


# ---------------------------------------------------------------- outputs

OUTPUT_DTYPES = {"mask": np.uint8, "probabilities": np.float32, "contour": np.uint8}


def stack_outputs(probabilities: bool, contour: bool) -> list[str]:
    return ["mask"] + (["probabilities"] if probabilities else []) + (["contour"] if contour else [])


def comparable_settings(settings: dict) -> dict:
    """A run's settings (a record's, or this run's) as ``--resume`` compares them: an option
    left to the server is the server's fixed default (``--overlap 0.25`` is the run that named
    no overlap, and a record of either continues the other), keep_largest off is False, and
    the tiles per network call are left out: they change the speed, not the outputs."""
    comparable = {key: value for key, value in settings.items() if key != "sw_batch_size"}
    comparable["overlap"] = DEFAULT_OVERLAP if settings.get("overlap") is None else settings["overlap"]
    comparable["blend"] = settings.get("blend") or DEFAULT_BLEND
    comparable["keep_largest"] = bool(settings.get("keep_largest"))
    return comparable


class RunRecord:
    """``<stem>.segment.json``: frames done (a prefix, in order), failures, and the settings,
    so ``--resume`` continues exactly where an interrupted run stopped; and a digest of the
    first frame it wrote (the ``witness``), so that a stack acquired again under its name is
    not continued (its first frames would keep the earlier acquisition's masks), while a
    failed frame fixed in place still is."""

    def __init__(self, path: pathlib.Path, frames: int, settings: dict):
        self.path, self.frames, self.settings = path, frames, settings
        self.done = 0
        self.failed: dict[int, str] = {}
        self.witness: dict | None = None  # {"frame": index, "digest": frame_digest(...)}

    @classmethod
    def load(cls, path: pathlib.Path, frames: int, settings: dict) -> "RunRecord":
        saved = json.loads(path.read_text())
        if saved.get("frames") != frames:
            raise ValueError(f"{path}: the interrupted run had {saved.get('frames')} frames, this input {frames}; "
                             "add --overwrite (instead of --resume) to start again")
        previous = comparable_settings(saved.get("settings") or {})
        current = comparable_settings(settings)
        if "location" not in previous:  # a record from before locations were kept: the name alone
            current.pop("location", None)
        if previous.get("network", "") is None:  # from before the default network was resolved: unknown
            current.pop("network", None)
        differing = sorted(k for k in {*previous, *current} if previous.get(k) != current.get(k))
        if differing:
            given = ", ".join(f"{k} {previous.get(k)!r} there, {current.get(k)!r} now" for k in differing)
            raise ValueError(f"{path}: the run it continues had other settings ({given}); resume with its settings, "
                             "or add --overwrite (instead of --resume) to start again")
        record = cls(path, frames, settings)
        record.done = int(saved["done"])
        record.failed = {int(k): v for k, v in saved.get("failed", {}).items()}
        record.witness = saved.get("witness")
        return record

    def witness_written(self, index: int, frame: np.ndarray) -> None:
        """Keep ``frame``, frame ``index`` just written, as the witness (the first one's)."""
        self.witness = {"frame": index, "digest": frame_digest(frame)}

    def check_witness(self, load: Callable[[int], np.ndarray], label: str) -> None:
        """Raises ValueError when the witness frame of the input (``load(index)``) is no
        longer the frame the run wrote its outputs of."""
        if self.witness is not None and frame_digest(load(self.witness["frame"])) != self.witness["digest"]:
            raise ValueError(f"{label}: frame {self.witness['frame']} is not the one the run it continues segmented "
                             "(acquired again under this name? written over?); add --overwrite (instead of --resume) "
                             "to segment it again")

    def is_finished(self) -> bool:
        """Every frame processed, and not every one failed (a run that wrote nothing, say with
        a mistyped option, must not replace an earlier result)."""
        return self.done >= self.frames and (self.frames == 0 or len(self.failed) < self.frames)

    def remaining(self) -> list[int]:
        """Frames still to segment: earlier failures, then everything after the done prefix."""
        return sorted(self.failed) + list(range(self.done, self.frames))

    def mark(self, index: int, error: str | None) -> None:
        if error is None:
            self.failed.pop(index, None)
        else:
            self.failed[index] = error
        self.done = max(self.done, index + 1)

    def save(self) -> None:
        body = {"version": RECORD_VERSION, "frames": self.frames, "done": self.done,
                "failed": {str(k): v for k, v in sorted(self.failed.items())}, "settings": self.settings,
                **({"witness": self.witness} if self.witness else {})}
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(body, indent=1))
        os.replace(temporary, self.path)

    @staticmethod
    def is_complete_file(path: pathlib.Path) -> bool:
        """True when the record at ``path`` says every frame was processed (failed or not)."""
        try:
            saved = json.loads(path.read_text())
            return int(saved["done"]) >= int(saved["frames"])
        except (OSError, ValueError, KeyError, TypeError):
            return False


PARTIAL = ".partial"  # marks a stack output whose run has not finished
IMAGEJ_LIMIT_BYTES = 2**32 - 2**25  # tifffile's BigTIFF threshold: an ImageJ TIFF cannot be one
HDF5_CLOSE_RESERVE_BYTES = 32 << 20  # room kept on the disk for HDF5 to flush its metadata and close


def frame_digest(frame: np.ndarray) -> str:
    """A digest of a frame's pixels, their type and shape."""
    frame = np.ascontiguousarray(frame)
    digest = hashlib.blake2b(f"{frame.dtype.str}{frame.shape}".encode(), digest_size=16)
    digest.update(memoryview(frame).cast("B"))
    return digest.hexdigest()


def file_identity(path: pathlib.Path) -> list[int]:
    """[size, mtime in ns] of a file: one written since differs."""
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


def partial_name(path: pathlib.Path) -> pathlib.Path:
    """``scan_mask.tif`` -> ``scan_mask.partial.tif``."""
    return path.with_name(f"{path.stem}{PARTIAL}{path.suffix}")


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_")


class StackWriter:
    """Preallocated outputs of a stack, in the input's container kind.

    TIFF and NPY: ``<stem>_<output>.tif|.npy`` memory-mapped (TIFF uncompressed, so frames
    land in place). HDF5: ``<stem>_segmentation.h5`` with a group named after the input dataset
    holding ``mask``, ``probabilities``, ``contour`` (one chunk per frame, gzip).

    A run writes under partial names (``<stem>_mask.partial.tif``; the group
    ``<dataset>.partial``) and ``publish`` renames them once every frame is processed, so a
    file under its own name is a finished run's, and an earlier result stays as it was until a
    later run has finished (a mistyped option failing every frame replaces nothing).
    """

    def __init__(self, source: Source, out_dir: pathlib.Path, outputs: list[str], num_classes: int, resume: bool,
                 finished: bool = False):
        """``resume``: continue the outputs of the run a record describes: a ``finished`` one's,
        under their own names, else the interrupted one's partial outputs.

        Raises:
            ValueError: resuming, those outputs are gone (an HDF5 output made anew was published
                all 0, a class, as if segmented; another run's file under the own name was
                continued in, mixing two runs' settings).
        """
        self.source, self.outputs = source, outputs
        height_width = source.frame_shape[-2:]
        stack = () if source.one_frame else (source.count,)
        self.shapes = {name: (*stack, num_classes, *height_width) if name == "probabilities"
                       else (*stack, *height_width) for name in outputs}
        self._h5 = None
        self.paths = self.paths_for(source, out_dir, outputs)
        self.published = False
        if source.kind == "hdf5":
            self.group = source.dataset
            self.partial_group = f"{source.dataset.rstrip('/')}{PARTIAL}"
            if resume and not self.paths["mask"].exists():
                raise self._gone(f"{self.paths['mask']}")
            self.arrays = self._open_hdf5(self.paths["mask"], resume, finished)
        else:
            self.partial_paths = {name: partial_name(path) for name, path in self.paths.items()}
            # The interrupted run's partial outputs, while they are there (also a finished run's
            # killed before it renamed them); else a finished run's, under their own names.
            self.published = resume and finished and not all(path.exists() for path in self.partial_paths.values())
            missing = [str(path) for path in (self.paths if self.published else self.partial_paths).values() if not path.exists()]
            if resume and missing:
                raise self._gone(", ".join(missing))
            self.arrays = {name: self._open_array(name, resume) for name in outputs}

    @staticmethod
    def _gone(what: str) -> ValueError:
        return ValueError(f"--resume: the outputs of the run it continues are gone ({what}: moved or deleted? or "
                          "written in place by a version before partial names); add --overwrite (instead of --resume) "
                          "to start again")

    @staticmethod
    def paths_for(source: Source, out_dir: pathlib.Path, outputs: list[str]) -> dict[str, pathlib.Path]:
        """Where each output of ``source`` goes (HDF5: one file, a group per input dataset)."""
        stem = image_stem(source.path)
        if source.kind == "hdf5":
            return {name: out_dir / f"{stem}_segmentation.h5" for name in outputs}
        suffix = ".tif" if source.kind == "tiff" else ".npy"
        return {name: out_dir / f"{stem}_{name}{suffix}" for name in outputs}

    @classmethod
    def targets(cls, source: Source, out_dir: pathlib.Path, outputs: list[str]) -> list[Target]:
        """Everything this stack's run writes, its record included."""
        place = source.dataset if source.kind == "hdf5" else ""
        owner = f"{source.path}:{place}" if place else str(source.path)
        outputs = [Target(owner, path, place) for path in sorted(set(cls.paths_for(source, out_dir, outputs).values()))]
        return [*outputs, Target(owner, cls.record_path_for(source, out_dir))]  # the record is a whole file

    @staticmethod
    def record_path_for(source: Source, out_dir: pathlib.Path) -> pathlib.Path:
        """Where the run record of ``source``'s outputs lives."""
        return StackWriter.record_path_at(source.path, source.dataset if source.kind == "hdf5" else None, out_dir)

    @staticmethod
    def record_path_at(path: pathlib.Path, dataset: str | None, out_dir: pathlib.Path) -> pathlib.Path:
        """The run record of the stack in file ``path`` (HDF5: its ``dataset``) in ``out_dir``."""
        if dataset:
            return out_dir / f"{image_stem(path)}_{safe_name(dataset)}.segment.json"
        return out_dir / f"{image_stem(path)}.segment.json"

    def describe(self) -> str:
        if self.source.kind == "hdf5":
            group = (self.group if self.published else self.partial_group).strip("/")
            return f"{self.paths['mask']}:/{group}/{{{','.join(self.outputs)}}}"
        return ", ".join(str(p) for p in (self.paths if self.published else self.partial_paths).values())

    def _open_array(self, name: str, resume: bool) -> FrameFile:
        """The output's frames in its file (made here, or the interrupted run's when resuming),
        written in place: the file is laid out through a memory map, written without one."""
        path = self.paths[name] if self.published else self.partial_paths[name]
        shape, dtype = self.shapes[name], OUTPUT_DTYPES[name]
        if resume:
            array = tifffile.memmap(path, mode="r+") if path.suffix == ".tif" else load_npy(path, mmap_mode="r+")
            if array.shape != shape or array.dtype != dtype:
                raise ValueError(f"{path}: shape {list(array.shape)} {array.dtype} does not match this run "
                                 f"({list(shape)} {np.dtype(dtype)}); add --overwrite (instead of --resume) to start again")
        elif path.suffix == ".tif":
            array = tifffile.memmap(path, shape=shape, dtype=dtype, **self._tiff_keywords(shape, dtype))
        else:
            array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        frames = FrameFile.of_memmap(array, writable=True)
        if frames is None:
            raise ValueError(f"{path}: its frames are not stored in one piece; add --overwrite (instead of --resume) "
                             "to start again")
        return frames

    def _tiff_keywords(self, shape: tuple[int, ...], dtype) -> dict:
        """The input stack's pixel size for an output of ``shape`` (``[N, H, W]`` or
        ``[N, K, H, W]``); its frames are Z slices where it has a Z spacing, else times. An
        output beyond 4 GiB keeps X and Y only: an ImageJ file cannot be a BigTIFF, and other
        readers see one page of a larger one."""
        calibration = tiff_calibration(self.source.path)
        if math.prod(shape) * np.dtype(dtype).itemsize > IMAGEJ_LIMIT_BYTES:
            calibration.pop("imagej", None)
        frames = "Z" if "spacing" in calibration.get("imagej", {}) else "T"
        return tiff_keywords(calibration, f"{frames}YX" if len(shape) == 3 else f"{frames}CYX")

    def _open_hdf5(self, path: pathlib.Path, resume: bool, finished: bool) -> dict:
        import h5py

        self._h5 = h5py.File(path, "a")
        self.published = resume and finished and self.partial_group not in self._h5  # as for files, above
        group_path = self.group if self.published else self.partial_group
        if resume and group_path not in self._h5:
            self._h5.close()
            raise self._gone(f"{path}:/{group_path.strip('/')}")
        if not resume and group_path in self._h5:
            del self._h5[group_path]
        group = self._h5.require_group(group_path)
        arrays = {}
        for name in self.outputs:
            shape, dtype = self.shapes[name], OUTPUT_DTYPES[name]
            if name in group and (group[name].shape != shape or group[name].dtype != dtype):
                raise ValueError(f"{path}:{group_path}/{name}: shape {list(group[name].shape)} does not match this "
                                 f"run ({list(shape)}); add --overwrite (instead of --resume) to start again")
            chunks = shape if self.source.one_frame else (1, *shape[1:])
            arrays[name] = group.require_dataset(name, shape=shape, dtype=dtype, chunks=chunks,
                                                 compression="gzip", compression_opts=1)
        return arrays

    def write(self, index: int, result) -> None:
        self._refuse_a_full_disk()
        for name in self.outputs:
            self.arrays[name][self.place_of(index)] = getattr(result, name)

    def write_failed(self, index: int) -> None:
        self._refuse_a_full_disk()
        for name in self.outputs:
            self.arrays[name][self.place_of(index)] = np.nan if name == "probabilities" else FAILED_VALUE

    def _refuse_a_full_disk(self) -> None:
        """HDF5 outputs: refuse a frame while the disk still has room for HDF5 to close the file
        (``check_hdf5_room``); the run record and the summary were lost to the crash.

        Raises:
            OSError: ENOSPC, with the free space and what a frame may need.
        """
        if self._h5 is None:
            return  # TIFF and NPY frames are written with pwrite, which fails cleanly
        frame_bytes = sum(math.prod(shape[1:] if not self.source.one_frame else shape) * np.dtype(OUTPUT_DTYPES[name]).itemsize
                          for name, shape in self.shapes.items())
        check_hdf5_room(self.paths["mask"], frame_bytes, "the next frame")

    def place_of(self, index: int):
        """Where frame ``index`` goes in an output array: the whole of a one-frame output."""
        return Ellipsis if self.source.one_frame else index

    def flush(self) -> None:
        """Make written frames durable before the run record says they are done."""
        if self._h5 is not None:
            self._h5.flush()
        else:
            for array in self.arrays.values():
                array.flush()

    def close(self, publish: bool = False) -> None:
        """Flush and close; with ``publish``, give the outputs their own names (replacing an
        earlier run's)."""
        self.flush()
        for array in self.arrays.values():
            if isinstance(array, FrameFile):
                array.close()
        self.arrays.clear()
        if self._h5 is not None:
            if publish and not self.published:
                if self.group in self._h5:
                    del self._h5[self.group]
                self._h5.move(self.partial_group, self.group)
                self.published = True
            self._h5.close()
        elif publish and not self.published:
            for name, partial in self.partial_paths.items():
                os.replace(partial, self.paths[name])
            self.published = True


class FileWriter:
    """One set of files per input image: ``<stem>_mask.<fmt>`` and, on request,
    ``_probabilities``, ``_contour`` and a PNG ``_overlay``; each written under a temporary name
    and renamed, so a file that exists is complete. ``segment-log.jsonl`` beside them says, per
    output file, which input and settings it was last written with: ``--resume`` skips an image
    whose outputs exist and were each written from the same input with the same settings."""

    LOG_NAME = "segment-log.jsonl"

    def __init__(self, source: Source, out_dir: pathlib.Path, outputs: list[str], array_format: str,
                 overlay_max_size: int | None, settings: dict | None = None):
        self.source, self.outputs, self.format = source, outputs, array_format
        self.out_dir = out_dir / source.label if source.kind == "directory" else out_dir
        self.overlay_max_size = overlay_max_size
        self.settings = settings
        self._log: dict[str, dict] | None = None

    def targets(self) -> list[Target]:
        """Every file this run may write, for every frame."""
        return [Target(str(self.source.files[index]), path) for index in range(self.source.count)
                for path in self.paths(index).values()]

    def paths(self, index: int) -> dict[str, pathlib.Path]:
        stem = image_stem(self.source.files[index])
        paths = {name: self.out_dir / f"{stem}_{name}.{self.format}" for name in self.outputs}
        if self.overlay_max_size:
            paths["overlay"] = self.out_dir / f"{stem}_overlay.png"
        return paths

    def is_written(self, index: int) -> bool:
        """Every output of image ``index`` exists."""
        return all(path.exists() for path in self.paths(index).values())

    def is_done(self, index: int) -> bool:
        """Written, every output from this input as it is now (a file re-acquired under its name
        since is not) with these settings (outputs of a version without the log count as done)."""
        if not self.is_written(index):
            return False
        log = self.written_with()
        if log is None:
            return True
        entry = self.entry(index)
        return all(logged is not None and self._same_write(logged, entry)
                   for logged in (log.get(path.name) for path in self.paths(index).values()))

    @staticmethod
    def _same_write(logged: dict, entry: dict) -> bool:
        """Whether a logged write (its input, file identity, settings) is ``entry``'s; older
        lines hold no "file"."""
        return all(comparable_settings(logged[key] or {}) == comparable_settings(entry[key] or {}) if key == "settings"
                   else logged[key] == entry[key] for key in logged)

    def entry(self, index: int) -> dict:
        path = self.source.files[index]
        return {"input": str(path.resolve()), "file": file_identity(path), "settings": self.settings}

    def written_with(self) -> dict[str, dict | None] | None:
        """``{output file name: {"input", "settings"}}`` of each file's last write, from the
        log (None: being written when the run stopped); None without a log. A line cut by a
        kill is skipped."""
        if self._log is None:
            path = self.out_dir / self.LOG_NAME
            if not path.exists():
                return None
            self._log = {}
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                    written = None if record.get("writing") else {"input": record["input"], "settings": record["settings"]}
                    if written is not None and "file" in record:  # lines before inputs' identities were kept hold none
                        written["file"] = record["file"]
                    self._log.update(dict.fromkeys(record["outputs"], written))
                except (ValueError, KeyError, TypeError):
                    continue
        return self._log

    def write(self, index: int, result) -> list[pathlib.Path]:
        paths = self.paths(index)
        names = [path.name for path in paths.values()]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log({"outputs": names, "writing": True})  # a kill in between leaves them unvouched for
        calibration = self.calibration(index)
        for name in self.outputs:
            atomic_write(paths[name], lambda tmp, name=name: write_array(tmp, getattr(result, name), calibration))
        if "overlay" in paths:
            picture = overlay(self.source.load(index), result.mask, max_size=self.overlay_max_size)
            atomic_write(paths["overlay"], lambda tmp: picture.save(tmp, format="PNG"))
        self.log({"outputs": names, **self.entry(index)})
        return list(paths.values())

    def calibration(self, index: int) -> dict | None:
        """The pixel size of a TIFF input, for its TIFF outputs (a mask measured in Fiji is
        measured in the image's unit); None for the others."""
        image = self.source.files[index]
        return tiff_calibration(image) if self.format == "tif" and image.suffix.lower() in (".tif", ".tiff") else None

    def log(self, record: dict) -> None:
        with open(self.out_dir / self.LOG_NAME, "a") as log:
            log.write(json.dumps(record) + "\n")


@dataclasses.dataclass(frozen=True)
class Target:
    """What one input writes: ``path``, and ``place`` inside it (an HDF5 group; "" for a file)."""

    owner: str  # the input, as the user named it
    path: pathlib.Path
    place: str = ""


def refuse_files_not_written_here(paths: list[pathlib.Path], unvouched: str) -> None:
    """Refuse to replace ``paths``, files at outputs' names that the command did not write
    (``unvouched``: what does not say it did), naming the first three.

    Raises:
        ValueError: when there are any, saying what to do.
    """
    if paths:
        listed = ", ".join(str(path) for path in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        raise ValueError(f"{listed}: in --out at an output's name, and {unvouched} (a file of your own? an earlier "
                         "version's output?); move it away, choose another --out, or add --overwrite to replace it")


def check_distinct_targets(targets: list[Target], inputs: list[pathlib.Path]) -> None:
    """Refuse a run where two inputs would write the same output (one result would be lost,
    or one stack record would mix two inputs), an output would replace an input, or a
    directory input would get its outputs among its frames (a rerun would segment them).

    Args:
        targets: what every input of the run writes.
        inputs: the run's input files, and its directory inputs.

    Raises:
        ValueError: naming both inputs, or the input, and the output.
    """
    owners: dict[tuple[pathlib.Path, str], str] = {}
    for target in targets:
        key = (target.path.resolve(), target.place)
        if owners.setdefault(key, target.owner) != target.owner:
            where = f"{target.path}:{target.place}" if target.place else str(target.path)
            raise ValueError(f"{owners[key]} and {target.owner} would both write {where}; segment them into "
                             "different --out directories")
    written = {path for path, _ in owners}
    folders = {path.parent for path in written}
    for path in inputs:
        if path.resolve() in written or (path.is_dir() and path.resolve() in folders):
            raise ValueError(f"--out would put outputs {'among the frames of' if path.is_dir() else 'over'} the "
                             f"input {path}; choose another --out")


def check_hdf5_room(target: pathlib.Path, needed_bytes: int, what: str) -> None:
    """Raise OSError (ENOSPC) unless the disk of HDF5 file ``target`` has ``needed_bytes`` free
    for ``what``, and room for HDF5 to close the file (``HDF5_CLOSE_RESERVE_BYTES``). HDF5 whose
    write fails on a full disk crashes the process when the file is closed (a segmentation
    fault; h5py issue 914), so the write is not tried."""
    free = shutil.disk_usage(target.parent).free
    needed = needed_bytes + HDF5_CLOSE_RESERVE_BYTES
    if free < needed:
        raise OSError(errno.ENOSPC, f"no space left on device for {what} in {target} ({free / 2**20:.1f} MiB free, "
                      f"up to {needed / 2**20:.1f} MiB needed with room to close the file); free some space, then "
                      "rerun with --resume")


def atomic_write(path: pathlib.Path, write: Callable[[pathlib.Path], object], suffix: str | None = None) -> None:
    """``write(temporary)``, then the temporary file renamed to ``path``: whole or not at all.
    The temporary name keeps ``suffix`` (default: the last one; ``.nii.gz`` for NIfTI), which
    writers read the format from."""
    atomic_write_all({path: write}, suffix)


def atomic_write_all(writes: dict[pathlib.Path, Callable[[pathlib.Path], object]], suffix: str | None = None) -> None:
    """Each ``write(temporary)``, then every temporary file renamed to its path: all of them
    whole, or none (a write that fails, on a full disk say, leaves every path as it was). The
    temporary names keep ``suffix`` as ``atomic_write``'s."""
    temporaries = {path: path.with_name(f".{path.name.removesuffix(suffix or path.suffix)}.partial{suffix or path.suffix}")
                   for path in writes}
    try:
        for path, write in writes.items():
            write(temporaries[path])
        for path, temporary in temporaries.items():
            os.replace(temporary, path)
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
