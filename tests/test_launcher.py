"""`python -m segserve serve` starts, serves, and on SIGTERM stops with nothing left behind."""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import time

import psutil
import pytest
import urllib.request

from segserve.launcher import PYTHON_BACKEND_SHM_PREFIX, REPO_ROOT, free_port

pytestmark = pytest.mark.server  # starts its own server


def shm_regions() -> set[str]:
    return {p.name for p in pathlib.Path("/dev/shm").glob(f"{PYTHON_BACKEND_SHM_PREFIX}*")}


def test_serve_then_sigterm_leaves_no_stub_and_no_shared_memory(model_repository, tmp_path):
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    regions_before = shm_regions()
    launcher = subprocess.Popen(
        [sys.executable, "-m", "segserve", "serve", "--model-repository", str(model_repository), "--http-port", str(http_port),
         "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--log-file", str(tmp_path / "server.log")],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first_line = launcher.stdout.readline()
        assert f"gRPC 127.0.0.1:{grpc_port}" in first_line, first_line
        server = psutil.Process(launcher.pid).children()[0]
        stubs = [p for p in server.children(recursive=True) if "triton_python_backend_stub" in p.name()]
        assert len(stubs) >= 4
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/segment_2d/ready", timeout=5) as ready:
            assert ready.status == 200
        assert shm_regions() - regions_before
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0
        assert "stopped (tritonserver exit code 0)" in launcher.stdout.read()
        time.sleep(0.5)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in [server, *stubs])
        assert shm_regions() - regions_before == set()
    finally:
        if launcher.poll() is None:
            launcher.kill()
