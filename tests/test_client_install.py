"""The client distribution on its own (``client/pyproject.toml``): a fresh virtual env with
only it and its dependencies from the package index (no torch, MONAI, onnx or server)
segments a frame with the CLI and a chunked volume (keep_largest and contour on the stitched
mask, client-side) with the API against the real server, with the same results as here."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from client import ChunkSettings, SegmentationClient
from segserve.launcher import REPO_ROOT
from tests.conftest import DEFAULT_NETWORK, background_result
from training.synthetic import synthetic_slice, to_detector_counts
from training.synthetic_3d import synthetic_volume, to_int16_hu

pytestmark = pytest.mark.slow  # builds a virtual env from the package index (minutes on the first run)

VOLUME_SHAPE, CHUNK_SHAPE = (197, 171, 45), (160, 160, 0)
IN_CLIENT_ENV = """
import importlib.util, json, sys
import numpy as np
from client import ChunkSettings, SegmentationClient
url, volume_path, out = sys.argv[1:4]
with SegmentationClient(url, model="segment_3d") as client:
    result = client.segment_volume(np.load(volume_path), chunks=ChunkSettings(shape=(160, 160, 0)), inflight=2,
                                   keep_largest=True, contour=True)
np.savez(out, mask=result.mask, contour=result.contour)
heavy = [m for m in ("torch", "monai", "onnx", "segserve", "tritonserver") if importlib.util.find_spec(m)]
print(json.dumps({"chunks": result.chunks, "heavy": heavy}))
"""


def build_client_env(directory: pathlib.Path) -> dict[str, str]:
    """A virtual env with only the client distribution; its environment for subprocesses.
    Built in the background from the session's start (tests/conftest.py, InBackground)."""
    # $CLIENT_ENV_PYTHON: build it with another interpreter (the client's oldest Python, 3.10).
    base_python = os.environ.get("CLIENT_ENV_PYTHON", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(directory / "venv")], check=True, timeout=300)
    python = directory / "venv" / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", str(REPO_ROOT / "client")],
                               capture_output=True, text=True, timeout=1800, cwd=directory)
    assert installed.returncode == 0, installed.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{directory / 'venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


BACKGROUND_PREPARATIONS = {"client-env": build_client_env}


@pytest.fixture(scope="session")
def client_env() -> dict[str, str]:
    return background_result("client-env")


def test_client_alone_segments_a_frame_and_a_chunked_volume(server, client_env, tmp_path, rng):
    image, _ = synthetic_slice((150, 170), rng)
    frame = to_detector_counts(image, np.uint16, rng)
    np.save(tmp_path / "frame.npy", frame)
    volume = to_int16_hu(synthetic_volume(VOLUME_SHAPE, rng)[0])
    np.save(tmp_path / "ct.npy", volume)
    run = dict(capture_output=True, text=True, cwd=tmp_path, env=client_env, timeout=600)  # not the repository root
    cli = subprocess.run(["segment-client", "segment", "frame.npy", "--out", "out", "--url", server.grpc_url,
                          "--network", DEFAULT_NETWORK, "--format", "npy", "--no-progress"], **run)
    assert cli.returncode == 0, cli.stderr
    api = subprocess.run(["python", "-c", IN_CLIENT_ENV, server.grpc_url, "ct.npy", "chunked.npz"], **run)
    assert api.returncode == 0, api.stderr
    report = json.loads(api.stdout.strip().splitlines()[-1])
    assert report == {"chunks": 4, "heavy": []}
    with SegmentationClient(server.grpc_url, network=DEFAULT_NETWORK) as client:
        assert np.array_equal(np.load(tmp_path / "out" / "frame_mask.npy"), client.segment(frame).mask)
    with SegmentationClient(server.grpc_url, model="segment_3d") as client:
        whole = client.segment(volume, keep_largest=True, contour=True)
        chunked_here = client.segment_volume(volume, chunks=ChunkSettings(shape=CHUNK_SHAPE), keep_largest=True,
                                             contour=True)
    chunked = np.load(tmp_path / "chunked.npz")
    assert np.array_equal(chunked["mask"], whole.mask) and np.array_equal(chunked["contour"], whole.contour)
    assert np.array_equal(chunked["mask"], chunked_here.mask)
