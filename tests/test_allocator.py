"""A large frame's memory goes back to the system: freed buffers under the server's tcmalloc, and
the Python backend's unused copies of large tensors at once."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

import numpy as np
import psutil
import pytest
import torch

from segserve.backend.allocator import LARGE_TENSOR_BYTES, discard_backend_copy, discard_pages
from segserve.launcher import TritonServer

# Run under the allocator the launcher preloads: touch and free a 512 MiB buffer, then print
# the resident MiB after the free, after the call for a small frame, after the one for a large.
CHILD = """
import psutil, torch
from segserve.backend.allocator import RELEASE_ABOVE_BYTES, release_free_memory
process = psutil.Process()
buffer = torch.ones(128 << 20)
del buffer
freed = process.memory_info().rss
release_free_memory(RELEASE_ABOVE_BYTES - 1)
kept = process.memory_info().rss
release_free_memory(512 << 20)
print(freed >> 20, kept >> 20, process.memory_info().rss >> 20)
"""


def test_a_large_frames_freed_buffers_are_released_a_small_ones_kept():
    library = TritonServer().allocator_library()  # "auto": tcmalloc when installed
    if library is None:
        pytest.skip("tcmalloc is not installed (make setup installs libtcmalloc-minimal4)")
    result = subprocess.run([sys.executable, "-c", CHILD], env={**os.environ, "LD_PRELOAD": library},
                            capture_output=True, text=True, timeout=120, check=True)
    freed, kept, released = (int(value) for value in result.stdout.split())
    assert freed - kept < 100, (freed, kept, released)  # a small frame's: tcmalloc keeps them
    assert kept - released > 400, (freed, kept, released)  # a large frame's 512 MiB: given back


def test_discarded_pages_leave_memory_and_read_as_zeros():
    process = psutil.Process()
    buffer = np.ones(64 << 20, dtype=np.uint8)
    before = process.memory_info().rss
    discard_pages(buffer.ctypes.data + 100, buffer.nbytes - 200)
    assert before - process.memory_info().rss > 60 << 20
    page = mmap.PAGESIZE
    assert buffer[:100].all() and buffer[-100:].all()  # the partial pages at the ends are kept
    assert not buffer[2 * page:-2 * page].any()  # every whole page inside the range


def test_the_backends_copy_is_discarded_only_when_large_separate_and_its_own():
    storage = torch.ones(LARGE_TENSOR_BYTES // 2)  # 2x the threshold, float32
    source = storage[len(storage) // 4:]  # a view with an offset into its storage
    copy = source.numpy().copy()
    assert not discard_backend_copy(source.numpy(), source)  # the source itself
    assert not discard_backend_copy(storage.numpy()[: len(storage) // 2], source)  # overlaps the storage
    assert not discard_backend_copy(copy[: len(copy) // 4], source)  # small
    assert not discard_backend_copy(np.frombuffer(memoryview(copy), dtype=np.float32), source)  # numpy does not own it
    assert not discard_backend_copy(None, source)
    assert storage.all() and copy.all()
    assert discard_backend_copy(copy.view(np.float32), source)  # a view of a numpy-owned buffer, as the backend's
    assert storage.all() and not copy[len(copy) // 2: len(copy) // 2 + 1024].any()


# Under the launcher's allocator: a large output's memory goes back when it is freed (the
# thread waits for that), a small one's thread is never started.
CHILD_RELEASE_WHEN_FREED = """
import psutil, torch
from segserve.backend.allocator import RELEASE_ABOVE_BYTES, release_when_freed
process = psutil.Process()
assert release_when_freed(torch.ones(1 << 20)) is None
output = torch.ones(RELEASE_ABOVE_BYTES // 2)  # 512 MiB of float32
thread = release_when_freed(output)
thread.join(timeout=0.5)
alive = thread.is_alive()  # still referenced: not released
touched = process.memory_info().rss
del output
thread.join(timeout=60)
print(int(alive), int(thread.is_alive()), (touched - process.memory_info().rss) >> 20)
"""


def test_a_large_outputs_memory_is_released_once_freed():
    library = TritonServer().allocator_library()
    if library is None:
        pytest.skip("tcmalloc is not installed (make setup installs libtcmalloc-minimal4)")
    result = subprocess.run([sys.executable, "-c", CHILD_RELEASE_WHEN_FREED], env={**os.environ, "LD_PRELOAD": library},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    waited, still_waiting, released_mib = (int(value) for value in result.stdout.split())
    assert waited == 1 and still_waiting == 0
    assert released_mib > 400, result.stdout
