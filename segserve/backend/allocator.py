"""Memory of a large frame given back to the system as soon as the step is done with it.

The launcher preloads tcmalloc into tritonserver and, through the environment, into every
stub: it keeps freed buffers for the next frame, which is what makes it faster than glibc
here (docs/benchmarks.md). For an 8192x8192 frame, though, what the step frees would stay in
the stub while the outputs travel on (measured: docs/benchmarks.md, peak memory):
- after blending, the float frame, the count map and normalisation temporaries (about
  0.6 GiB): the step asks tcmalloc to release them before it builds the outputs
  (:func:`release_free_memory`);
- the outputs themselves, which the stub frees only after it has copied them to its shared
  memory and told the server, while the server copies them into the response: a thread
  releases them the moment they are freed (:func:`release_when_freed`);
- the Python backend's own copy of each CPU output (:func:`discard_backend_copy`).
glibc unmaps buffers that large when they are freed, so there only the last one matters.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import threading
import time

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef

# Largest buffer (the blending accumulator) from which a frame counts as large.
RELEASE_ABOVE_BYTES = 256 << 20
# A CPU tensor from which the backend's copy of it is discarded, and an output from which it is
# moved into shared memory early (segserve.backend.tensors): an 8192² MASK (64 MiB) is one, a
# 2048² frame's PROBABILITIES (48 MiB) too; below, the BLS round trip is not worth it.
LARGE_TENSOR_BYTES = 32 << 20
# How long a released output may stay referenced (the server copying it) before the thread
# that waits for it gives up: longer than any response of a frame below the pixel limit.
RELEASE_WAIT_S = 600.0
# How often that thread looks: the server's copy of an 8192² output takes about 0.3 s.
RELEASE_POLL_S = 0.005


@functools.cache
def _release_function():
    """tcmalloc's ``MallocExtension_ReleaseFreeMemory`` when it is the allocator, else None."""
    return getattr(ctypes.CDLL(None), "MallocExtension_ReleaseFreeMemory", None)


def release_free_memory(largest_buffer_bytes: int) -> None:
    """After a frame whose largest buffer took ``largest_buffer_bytes``: give the allocator's
    free pages back to the system when that is at least RELEASE_ABOVE_BYTES."""
    release = _release_function()
    if release is not None and largest_buffer_bytes >= RELEASE_ABOVE_BYTES:
        release()


def release_when_freed(tensor: torch.Tensor) -> threading.Thread | None:
    """For a large CPU output (at least RELEASE_ABOVE_BYTES) under tcmalloc: a daemon thread
    that gives the free pages back as soon as ``tensor``'s memory is freed, which happens
    after the step returns, when the stub has handed the response over (the caller must drop
    its own references). Returns the thread, or None when there is nothing to do."""
    release = _release_function()
    if release is None or tensor.is_cuda or tensor.untyped_storage().nbytes() < RELEASE_ABOVE_BYTES:
        return None
    storage = StorageWeakRef(tensor.untyped_storage())

    def release_once_freed():
        deadline = time.monotonic() + RELEASE_WAIT_S
        while not storage.expired() and time.monotonic() < deadline:
            time.sleep(RELEASE_POLL_S)
        release()

    thread = threading.Thread(target=release_once_freed, name="release-output", daemon=True)
    thread.start()
    return thread


@functools.cache
def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise


def discard_pages(address: int, size: int) -> None:
    """Give the whole pages inside ``size`` bytes at ``address`` back to the system
    (``madvise`` ``MADV_DONTNEED``): they read as zeros from then on. Only for private memory
    that nobody reads again; the partial pages at either end (allocator headers) are kept."""
    page = mmap.PAGESIZE
    start = -(-address // page) * page
    end = (address + size) // page * page
    if end > start and _madvise()(start, end - start, mmap.MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), f"madvise of {end - start} bytes failed")


def discard_backend_copy(backend_copy: np.ndarray | None, source: torch.Tensor) -> bool:
    """Discard the pages of the copy that the Python backend keeps of a CPU tensor it sends or
    received from ``source``'s memory (see ``segserve.backend.tensors.output_tensor``), when
    it is large (at least LARGE_TENSOR_BYTES) and really a buffer of its own: numpy owns it
    and it does not overlap ``source``'s storage. Returns whether it was discarded."""
    if backend_copy is None or backend_copy.nbytes < LARGE_TENSOR_BYTES or backend_copy.dtype.hasobject:
        return False
    owner = backend_copy
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    storage = source.untyped_storage()
    copy_start, copy_end = backend_copy.ctypes.data, backend_copy.ctypes.data + backend_copy.nbytes
    source_start, source_end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    if not owner.flags.owndata or not (copy_end <= source_start or source_end <= copy_start):
        return False
    discard_pages(copy_start, backend_copy.nbytes)
    return True
