"""Freed pages of a large frame given back to the system before its outputs are sent.

The launcher preloads tcmalloc into tritonserver and, through the environment, into every
stub: it keeps freed buffers for the next frame, which is what makes it faster than glibc
here (docs/benchmarks.md). For an 8192x8192 frame, though, the buffers the step frees after
blending (the float frame, the count map, normalisation temporaries: about 0.6 GiB) would stay
in the stub while the outputs are copied to Triton, so after a frame that large the step asks
tcmalloc to release them. glibc unmaps buffers that large when they are freed.
"""

from __future__ import annotations

import ctypes
import functools

# Largest buffer (the blending accumulator) from which a frame counts as large.
RELEASE_ABOVE_BYTES = 256 << 20


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
