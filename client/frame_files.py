"""Frames of a stack stored back to back in a file (NPY, uncompressed TIFF), read and written
one at a time with positional I/O instead of through a memory map.

Every page of a memory map that a run touches stays in the process's resident memory until
the map is closed, so a run through a 4 GB stack grew to 4 GB and more (docs/benchmarks.md,
"Client memory"); batch schedulers (Slurm's memory enforcement, a container's cgroup limit)
count that. Read and written with ``pread``/``pwrite``, the frames pass through the page
cache, which the kernel reclaims as it needs, and the client stays at the size of a frame.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np


class FrameFile:
    """``shape[0]`` frames of ``shape[1:]`` ``dtype`` (C order, the dtype's byte order) from
    byte ``offset`` of ``path``. Indexed by frame: ``frames[i]`` reads ``[*shape[1:]]``;
    ``frames[i] = value`` writes one (a scalar fills it). ``flush`` makes the written frames
    durable."""

    def __init__(self, path: pathlib.Path, shape: tuple[int, ...], dtype, offset: int, writable: bool = False):
        self.path, self.shape, self.dtype, self.offset = pathlib.Path(path), tuple(shape), np.dtype(dtype), int(offset)
        self.frame_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._descriptor: int | None = None  # set first: __del__ runs even when the open fails
        self._descriptor = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)

    @classmethod
    def of_memmap(cls, array: np.memmap, writable: bool = False) -> FrameFile | None:
        """The frames of a memory-mapped stack at its place in its file; None when they are
        not stored back to back in C order (read those through the map)."""
        if array.ndim < 2 or not array.flags.c_contiguous or array.filename is None:
            return None
        return cls(pathlib.Path(array.filename), array.shape, array.dtype, array.offset, writable)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _position(self, index: int) -> int:
        if not 0 <= index < self.shape[0]:
            raise IndexError(f"frame {index} of {self.shape[0]} in {self.path}")
        return self.offset + index * self.frame_bytes

    def __getitem__(self, index: int) -> np.ndarray:
        frame = np.empty(self.shape[1:], self.dtype)
        view, position = memoryview(frame).cast("B"), self._position(index)
        done = 0
        while done < self.frame_bytes:
            count = os.preadv(self._open(), [view[done:]], position + done)
            if count == 0:
                raise ValueError(f"{self.path}: frame {index} is not whole in the file (it ends after "
                                 f"{position + done} bytes)")
            done += count
        return frame

    def __setitem__(self, index: int, value) -> None:
        frame = np.ascontiguousarray(np.broadcast_to(np.asarray(value, self.dtype), self.shape[1:]))
        view, position = memoryview(frame).cast("B"), self._position(index)
        done = 0
        while done < self.frame_bytes:
            done += os.pwrite(self._open(), view[done:], position + done)

    def flush(self) -> None:
        os.fdatasync(self._open())

    def _open(self) -> int:
        if self._descriptor is None:
            raise ValueError(f"{self.path}: closed")
        return self._descriptor

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    def __del__(self) -> None:
        self.close()
