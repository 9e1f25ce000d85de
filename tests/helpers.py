"""Helpers shared by the test modules (one place: test modules never import each other)."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from client import SegmentationClient
from client.shared_memory import DEV_SHM, REGION_PREFIX, is_stale, owner_pid
from segproto import TOKEN_ENV, TOKEN_FILE_ENV
from segserve.launcher import python_backend_region_users, python_backend_regions
from segserve.reference import reference_probabilities
from tests.conftest import NETWORK_DEVICE
from training.synthetic import synthetic_slice, to_detector_counts
from training.synthetic_3d import synthetic_volume, to_int16_hu

# In-process MONAI reference of the default 2D network: tile and tolerance of the server's probabilities.
TILE = (128, 128)
TOLERANCE = 1e-4


def without_token(monkeypatch) -> None:
    """This process, as a user without the server's token: no ``$SEGSERVE_TOKEN`` and a token
    file that does not exist (a real one may sit in ~/.config/segserve from another run)."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv(TOKEN_FILE_ENV, "/nonexistent/segserve-token")


def environment_without_token(directory: pathlib.Path) -> dict[str, str]:
    """Environment of a subprocess run by a user without the token."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env[TOKEN_FILE_ENV] = str(directory / "no-token-here")
    return env


def make_stack(rng, frames: int, shape: tuple[int, int], dtype=np.uint16) -> np.ndarray:
    """Frames that differ from each other, so a frame written in the wrong place shows."""
    return np.stack([to_detector_counts(synthetic_slice(shape, rng)[0], dtype, rng) for _ in range(frames)])


def reference_masks(server, stack: np.ndarray) -> np.ndarray:
    with SegmentationClient(server.grpc_url) as client:
        return np.stack([client.segment(frame).mask for frame in stack])


def cli(server, *args: str, transport: str = "grpc") -> list[str]:
    url = server.http_url if transport == "http" else server.grpc_url
    return [sys.executable, "-m", "client", "segment", *args, "--url", url, "--transport", transport]


def wait_for_record(path: pathlib.Path, frames_done: int, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"client exited early: {process.stderr.read()}")
        try:
            if json.loads(path.read_text())["done"] >= frames_done:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    pytest.fail(f"{path} never reached {frames_done} frames")


def our_dev_shm_entries() -> list[str]:
    """The client's ``/dev/shm`` files of this process or of dead ones (clients the tests ran
    and leaked), not those a live client of someone else on this machine holds now."""
    return sorted(p.name for p in DEV_SHM.glob(f"{REGION_PREFIX}_*")
                  if owner_pid(p.name) == os.getpid() or is_stale(p.name))


def registered_regions(server, kind: str = "system") -> list[str]:
    with grpcclient.InferenceServerClient(server.grpc_url) as control:
        status = getattr(control, f"get_{kind}_shared_memory_status")(as_json=True, headers=server.token_headers())
    return sorted(status.get("regions", {}))


def assert_matches_reference(result, frame, network, options, tile=TILE):
    """PROBABILITIES within TOLERANCE of in-process MONAI; MASK their argmax wherever two
    classes are not within the tolerance of each other."""
    expected = reference_probabilities(frame, network, tile, options, NETWORK_DEVICE).numpy()
    assert result.probabilities.shape == expected.shape
    difference = np.abs(result.probabilities - expected).max()
    assert difference <= TOLERANCE, f"max abs difference {difference:.3g}"
    # MASK is the argmax; where two classes are within the tolerance either answer is right.
    top2 = np.sort(expected, axis=0)[-2:]
    decided = (top2[1] - top2[0]) > 2 * TOLERANCE
    assert np.array_equal(result.mask[decided], expected.argmax(0)[decided])
    assert np.array_equal(result.mask, result.probabilities.argmax(0))


def frame_of(shape, dtype, rng) -> np.ndarray:
    image, _ = synthetic_slice(shape, rng)
    pixels = image if dtype == np.float32 else to_detector_counts(image, dtype, rng)
    return pixels[np.newaxis]


def ct_volume(shape, rng) -> np.ndarray:
    image, _ = synthetic_volume(shape, rng)
    return to_int16_hu(image)


class FakeClock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def regions_left_since(before: set[str]) -> set[str]:
    """Python-backend regions made since ``before`` that no live process maps: what a stopped
    server left behind. Those of other servers running on the machine meanwhile (another
    test run, a developer's server) are mapped by their stubs, so they do not count."""
    users = python_backend_region_users()
    return {name for name in python_backend_regions() - before if not users.get(name)}


def resident_file_mb() -> float:
    """This process's resident pages mapped from files (RssFile), in MiB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("RssFile:"))
    return int(line.split()[1]) / 1024


@contextlib.contextmanager
def running_with_stderr(command: list[str], **popen) -> Iterator[tuple[subprocess.Popen, list[str]]]:
    """``command`` running, its stderr lines gathered as they come (by a thread, so the test
    can wait on what it says); killed if still running when the block ends."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, **popen)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        yield process, lines
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=10)
