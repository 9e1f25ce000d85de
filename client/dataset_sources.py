"""Dataset inputs read in pieces, by any process: zarr arrays (a path inside a store too),
OME-Zarr images (level 0 of the first multiscale), HDF5 datasets (``FILE.h5:/path``), TIFF
stacks and NPY files.

A ``DatasetSource`` is a small picklable description (shape, dtype, where it is, by absolute
path: a worker's working directory is not the driver's); each Dask worker opens the file
itself (``read``) and keeps the handle for the rest of the run, so no process ever holds more
than the region it was asked for. Handles belong to one run (``run``): a later run on the
same long-lived cluster opens the file anew (it may have been rewritten), and the driver
closes the input's handles on every worker when a run ends (``release_handles``), so that an
HDF5 input is not left locked against writing. Leading axes of length 1 beyond the rank the
network needs (an OME-Zarr ``t`` or ``c`` of 1) are dropped.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import pathlib
import threading

import numpy as np

from client.frames import load_npy
from client.stacks import open_hdf5_dataset, split_hdf5_argument

MAX_OPEN_HANDLES = 4  # per process: handles of runs whose driver died before releasing them go first
_HANDLES: collections.OrderedDict[tuple, object] = collections.OrderedDict()  # (kind, path, inner, run) -> array
_RELEASED_RUNS: set[str] = set()  # a task of one of these still starting reads without keeping the file open
_HANDLES_LOCK = threading.Lock()  # tasks open in their threads, release_handles runs in the worker's event loop


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """An input array as the network takes it: ``shape`` without the dropped leading axes.

    ``dropped``: leading axes of length 1 not part of ``shape``; ``ome``: the OME-Zarr image's
    multiscale metadata (axes, level-0 transformations), None for other inputs; ``run``: the
    run whose handles this source's reads use."""

    argument: str
    kind: str  # zarr | ome-zarr | hdf5 | tiff | npy
    path: str
    inner: str | None
    shape: tuple[int, ...]
    dtype: str
    dropped: int = 0
    ome: dict | None = None
    run: str = ""

    def open(self):
        """The stored array (zarr array, h5py dataset, ``NpyRegions``), opened once per process and run
        (each time, and closed when dropped, once the run's handles were released)."""
        key = (self.kind, self.path, self.inner, self.run)
        with _HANDLES_LOCK:
            if key in _HANDLES:
                _HANDLES.move_to_end(key)
                return _HANDLES[key]
        handle = open_stored_array(self.kind, self.path, self.inner)  # outside the lock: a slow file system
        with _HANDLES_LOCK:
            if self.run in _RELEASED_RUNS:
                return handle
            if key in _HANDLES:  # another thread of this worker opened it meanwhile
                close_stored_array(handle)
                return _HANDLES[key]
            _HANDLES[key] = handle
            evicted = [_HANDLES.popitem(last=False)[1] for _ in range(len(_HANDLES) - MAX_OPEN_HANDLES)]
        for array in evicted:
            close_stored_array(array)
        return handle

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """The voxels of ``region`` (over ``shape``'s axes) as a numpy array."""
        return np.asarray(self.open()[(0,) * self.dropped + tuple(region)])


def open_stored_array(kind: str, path: str, inner: str | None):
    if kind in ("zarr", "ome-zarr"):
        import zarr

        return zarr.open_array(store=path, path=inner or "", mode="r")
    if kind == "hdf5":
        return open_hdf5_dataset(pathlib.Path(path), inner)
    if kind == "npy":
        return NpyRegions(path)
    if kind == "tiff":
        import zarr

        from client.tiffs import zarr_store

        return zarr.open_array(zarr_store(pathlib.Path(path)), mode="r")  # a file written page by page: all its pages
    raise ValueError(f"unknown input kind {kind!r}")


class NpyRegions:
    """An NPY file, indexed like the array it holds (``regions[...]`` is a numpy copy), through
    a memory map made for each read and let go after it. Through one map kept for the run, a
    worker's resident memory counted every page of the file it had read (measured: all of a
    256 MiB input), and Dask's memory limit counts resident memory."""

    def __init__(self, path: str):
        mapped = load_npy(path, mmap_mode="r")
        self.path, self.shape, self.dtype, self.offset = path, mapped.shape, mapped.dtype, mapped.offset
        self.order = "F" if mapped.flags.f_contiguous and not mapped.flags.c_contiguous else "C"

    def __getitem__(self, region) -> np.ndarray:
        mapped = np.memmap(self.path, self.dtype, "r", self.offset, self.shape, self.order)
        return np.array(mapped[region])  # the map goes with ``mapped``, on return


def close_stored_array(array) -> None:
    """Close the file behind an array ``open_stored_array`` returned (an NPY file holds none open)."""
    if hasattr(array, "file"):  # h5py dataset
        array.file.close()
    elif hasattr(array, "store"):  # zarr array; a TIFF's store holds the open file
        array.store.close()


def release_handles(source: DatasetSource) -> int:
    """Close this process's handles of ``source``'s run and of its file from other runs (those
    of a driver killed before its end: the run resuming it releases them); how many. Run on
    every worker at a run's end. Another run using the file reopens it (a read caught at that
    instant fails, and Dask reruns its task)."""
    location = (source.kind, source.path, source.inner)
    with _HANDLES_LOCK:
        _RELEASED_RUNS.add(source.run)
        released = [_HANDLES.pop(key) for key in list(_HANDLES) if key[3] == source.run or key[:3] == location]
    for array in released:
        with contextlib.suppress(Exception):  # a file that fails to close is closed when dropped
            close_stored_array(array)
    return len(released)


def split_zarr_argument(argument: str) -> tuple[str, str] | None:
    """``store.zarr/inner/path`` or ``store.zarr:/inner/path`` -> (store, inner path); None
    when the argument names no ``.zarr`` directory."""
    store, sep, inner = argument.partition(".zarr:")
    if sep:
        return store + ".zarr", inner.strip("/")
    parts = pathlib.PurePath(argument).parts
    for index, part in enumerate(parts):
        if part.lower().endswith(".zarr"):
            return str(pathlib.PurePath(*parts[: index + 1])), "/".join(parts[index + 1:])
    return None


def ome_level0(attributes: dict) -> dict | None:
    """The first multiscale of NGFF image metadata (0.4: in the attributes, 0.5: under ``ome``)."""
    multiscales = attributes.get("multiscales") or attributes.get("ome", {}).get("multiscales")
    return multiscales[0] if multiscales else None


def open_source(argument: str, rank: int) -> DatasetSource:
    """Describe the input named by ``argument``, keeping its last ``rank`` or more axes.

    Args:
        rank: the fewest axes the network can take (a frame's or a volume's); leading axes of
            length 1 are dropped down to ``rank + 1`` (a stack or channels stay).

    Raises:
        FileNotFoundError, ValueError: missing input, unsupported kind, wrong rank.
    """
    kind, path, inner, ome = locate(argument)
    array = open_stored_array(kind, path, inner)
    shape, dtype = tuple(int(n) for n in array.shape), str(np.dtype(array.dtype))
    if kind == "hdf5":
        array.file.close()
    dropped = 0
    while len(shape) - dropped > rank + 1 and shape[dropped] == 1:
        dropped += 1
    if not rank <= len(shape) - dropped <= rank + 1 + (rank == 2):
        raise ValueError(f"{argument}: shape {list(shape)} is not a {'frame or stack' if rank == 2 else 'volume'} "
                         f"for this network")
    return DatasetSource(argument, kind, path, inner, shape[dropped:], dtype, dropped, ome)


def locate(argument: str) -> tuple[str, str, str | None, dict | None]:
    """(kind, absolute file or store path, path inside it, OME-Zarr multiscale metadata)."""
    hdf5 = split_hdf5_argument(argument)
    if hdf5 is not None:
        if not hdf5[0].exists():
            raise FileNotFoundError(f"{hdf5[0]}: no such file")
        return "hdf5", os.path.abspath(hdf5[0]), hdf5[1], None
    zarr_parts = split_zarr_argument(argument)
    if zarr_parts is not None:
        return locate_zarr(*zarr_parts)
    path = pathlib.Path(argument)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return "npy", os.path.abspath(path), None, None
    if suffix in (".tif", ".tiff"):
        return "tiff", os.path.abspath(path), None, None
    raise ValueError(f"{argument}: unsupported input; use a zarr array or OME-Zarr image (.zarr), FILE.h5:/dataset, "
                     ".tif or .npy")


def locate_zarr(store: str, inner: str) -> tuple[str, str, str | None, dict | None]:
    import zarr

    if not pathlib.Path(store).exists():
        raise FileNotFoundError(f"{store}: no such zarr store")
    store = os.path.abspath(store)
    node = zarr.open(store=store, path=inner, mode="r")
    if isinstance(node, zarr.Array):
        return "zarr", store, inner, None
    multiscale = ome_level0(dict(node.attrs))
    if multiscale is None:
        names = ", ".join(sorted(name for name, _ in node.arrays())) or "none"
        raise ValueError(f"{store}/{inner}: a zarr group without OME-Zarr multiscales; name an array in it "
                         f"(arrays here: {names})")
    level0 = multiscale["datasets"][0]["path"]
    return "ome-zarr", store, "/".join(p for p in (inner, level0) if p), multiscale
