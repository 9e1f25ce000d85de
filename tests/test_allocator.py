"""A large frame's freed buffers go back to the system under the server's tcmalloc."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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
