"""Faults, against `python -m segserve serve` run as users run it (its own server, not the
session's, on the 2D pipeline with one network): a user without the token on default options,
a pipeline stub killed mid-stream (the launcher reloads that model; the client's default
patience rides it out), the server killed under a streaming client then resumed, and SIGTERM
with requests in flight."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client import SegmentationClient
from client.api import SegmentationError
from segserve.options import PipelineOptions
from segserve.launcher import REPO_ROOT, free_ports, python_backend_regions, python_backend_stubs
from tests.conftest import DEFAULT_NETWORK, copy_2d_repository
from tests.helpers import assert_matches_reference, environment_without_token, make_stack, reference_masks, regions_left_since, wait_for_record

pytestmark = pytest.mark.server  # starts its own server


STARTUP_TIMEOUT_S = 600


class Serve:
    """``python -m segserve serve`` in a subprocess on fixed free ports with a known token."""

    def __init__(self, directory: pathlib.Path, model_repository: pathlib.Path, drain_timeout_s: float = 20):
        self.directory, self.model_repository, self.drain_timeout_s = directory, model_repository, drain_timeout_s
        self.ports = dict(zip(("grpc", "http", "metrics"), free_ports(3)))
        self.token = "faults-test-token"
        self.output = directory / "serve.out"
        self.process: subprocess.Popen | None = None
        self.ready_lines = 0  # "segserve ready" lines printed before the start awaited now
        self.regions_before: set[str] = set()  # regions before the last start: ours must go at SIGTERM

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def start(self) -> None:
        self.launch()
        self.wait_until(lambda: self.text().count("segserve ready") > self.ready_lines, "ready")

    def launch(self) -> None:
        """Start the command without waiting for readiness."""
        command = [sys.executable, "-m", "segserve", "serve", "--model-repository", str(self.model_repository),
                   "--grpc-port", str(self.ports["grpc"]), "--http-port", str(self.ports["http"]),
                   "--metrics-port", str(self.ports["metrics"]), "--token", self.token,
                   "--token-file", str(self.directory / "token"), "--log-file", str(self.directory / "triton.log"),
                   "--drain-timeout", str(self.drain_timeout_s)]
        self.regions_before = python_backend_regions()
        self.process = subprocess.Popen(command, stdout=open(self.output, "a"), stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    def text(self) -> str:
        return self.output.read_text() if self.output.exists() else ""

    def wait_until(self, condition, what: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            if self.process.poll() is not None:
                pytest.fail(f"segserve exited ({self.process.returncode}) waiting for {what}:\n{self.text()[-2000:]}")
            time.sleep(0.25)
        pytest.fail(f"segserve not {what} after {timeout_s} s:\n{self.text()[-2000:]}")

    def mark(self) -> None:
        self.ready_lines = self.text().count("segserve ready")

    def stubs(self) -> dict[int, str]:
        return python_backend_stubs(self.process.pid)

    def tritonserver(self) -> psutil.Process | None:
        children = psutil.Process(self.process.pid).children()
        return next((child for child in children if "tritonserver" in child.name()), None)

    def client(self, **kwargs) -> SegmentationClient:
        return SegmentationClient(self.grpc_url, token=self.token, **kwargs)


def scratch_directories(tritonserver: psutil.Process) -> set[pathlib.Path]:
    """What the server keeps in the temporary directory while it runs (the backends it loads,
    the copy of the repository), from its command line: other servers' are not its own."""
    named = [argument.split("=", 1)[1] for argument in tritonserver.cmdline()
             if argument.startswith(("--backend-directory=", "--model-repository="))]
    return {next(parent for parent in (pathlib.Path(path), *pathlib.Path(path).parents) if parent.name.startswith("segserve-"))
            for path in named}


def assert_nothing_left(serve: Serve, tritonserver: psutil.Process, scratch: set[pathlib.Path]) -> None:
    assert not (tritonserver.is_running() and tritonserver.status() != psutil.STATUS_ZOMBIE)
    assert regions_left_since(serve.regions_before) == set()
    assert scratch and not any(path.exists() for path in scratch), scratch


# These four run before the module's server starts (the `serve` fixture): one server at a time.
def test_ctrl_c_while_the_models_load_stops_the_start_within_seconds_and_leaves_nothing(tmp_path):
    """Ctrl-C during the start was held until every model had loaded (minutes on a big
    repository), then the server was started and stopped."""
    starting = Serve(tmp_path, copy_2d_repository(tmp_path / "model_repository", sliding_window_instances=2))
    starting.launch()
    starting.wait_until(lambda: starting.tritonserver() is not None, "running tritonserver")
    tritonserver = starting.tritonserver()
    scratch = scratch_directories(tritonserver)
    starting.process.send_signal(signal.SIGINT)
    assert starting.process.wait(timeout=60) == 130, starting.text()
    assert "segserve ready" not in starting.text()
    assert "segserve: stopped before it was ready (SIGINT)" in starting.text()
    tritonserver.wait(timeout=30)
    assert_nothing_left(starting, tritonserver, scratch)


def test_sighup_drains_like_ctrl_c_and_a_second_signal_stops_at_once(tmp_path, rng):
    """SIGHUP (the terminal closed) killed serve without a drain; a second Ctrl-C did not end
    the drain, which a client that keeps sending holds off up to its timeout (here 600 s)."""
    running = Serve(tmp_path, copy_2d_repository(tmp_path / "model_repository", sliding_window_instances=2),
                    drain_timeout_s=600)
    running.start()
    tritonserver = running.tritonserver()
    scratch = scratch_directories(tritonserver)
    frame = make_stack(rng, 1, (256, 256))
    answered, sending = [], threading.Event()
    sending.set()

    def keep_sending() -> None:
        with grpcclient.InferenceServerClient(running.grpc_url) as client:
            image = grpcclient.InferInput("IMAGE_UINT16", list(frame.shape), "UINT16")
            image.set_data_from_numpy(frame)
            while sending.is_set():
                try:
                    client.infer("segment_2d", [image], client_timeout=60)
                    answered.append(True)
                except InferenceServerException:
                    time.sleep(0.1)  # refused while the server stops

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        running.wait_until(lambda: len(answered) >= 3, "3 frames answered")
        running.process.send_signal(signal.SIGHUP)
        running.wait_until(lambda: "stopping: letting requests in flight finish" in running.text(), "draining")
        answered_when_draining = len(answered)
        running.wait_until(lambda: len(answered) > answered_when_draining, "a frame answered while draining")
        running.process.send_signal(signal.SIGINT)
        assert running.process.wait(timeout=120) == 128 + signal.SIGHUP, running.text()  # the drain had 600 s to go
    finally:
        sending.clear()
        sender.join(timeout=120)
    assert "segserve: second signal: stopping now" in running.text()
    tritonserver.wait(timeout=30)
    assert_nothing_left(running, tritonserver, scratch)


SLOW_RELOAD_SHIM = '''"""segment_2d, loading slowly once the file SLOW exists: a reload long enough to stop serve in."""
import os
import time

from segserve.backend.sliding_window import TritonPythonModel as Pipeline

SLOW = {slow!r}


class TritonPythonModel(Pipeline):
    def initialize(self, args):
        if os.path.exists(SLOW):
            time.sleep(15)
        super().initialize(args)
'''


def test_ctrl_c_during_a_reload_drains_the_server_and_restarts_nothing(tmp_path):
    """A stop asked for while a dead stub's model reloaded killed the server within 3 s (exit
    130), abandoning requests in flight to the other models; it now drains as any stop does."""
    repository = copy_2d_repository(tmp_path / "model_repository", sliding_window_instances=2)
    slow = tmp_path / "slow_reload"
    (repository / "segment_2d" / "1" / "model.py").write_text(SLOW_RELOAD_SHIM.format(slow=str(slow)))
    running = Serve(tmp_path, repository)
    running.start()
    tritonserver = running.tritonserver()
    scratch = scratch_directories(tritonserver)
    slow.touch()
    os.kill(next(pid for pid, model in running.stubs().items() if "segment_2d" in model), signal.SIGKILL)
    running.wait_until(lambda: "reloading segment_2d" in running.text(), "reloading")
    running.process.send_signal(signal.SIGINT)
    assert running.process.wait(timeout=180) == 0, running.text()
    assert "stopping: letting requests in flight finish" in running.text()
    assert "restarting" not in running.text() and "ready again" not in running.text(), running.text()
    tritonserver.wait(timeout=30)
    assert_nothing_left(running, tritonserver, scratch)


def test_a_network_that_fails_to_load_is_named_and_the_others_serve(tmp_path, rng, default_network):
    """One user's broken export (its model files cut short) stopped the whole server from
    starting: every pipeline and network down, the error naming paths in the server's copy."""
    repository = copy_2d_repository(tmp_path / "model_repository", sliding_window_instances=2)
    broken = repository / "broken_net"
    shutil.copytree(repository / DEFAULT_NETWORK, broken)
    config = broken / "config.pbtxt"
    config.write_text(config.read_text().replace(f'name: "{DEFAULT_NETWORK}"', 'name: "broken_net"'))
    for name in ("model.onnx", "model.ts"):
        (broken / "1" / name).write_bytes((broken / "1" / name).read_bytes()[:1000])
    pipeline = repository / "segment_2d" / "config.pbtxt"  # broken_net is its default
    pipeline.write_text(pipeline.read_text().replace(f'string_value: "{DEFAULT_NETWORK}"', 'string_value: "broken_net"'))
    misedited = repository / "misedited_net"  # a config that does not parse: in no index, only in the log
    shutil.copytree(repository / DEFAULT_NETWORK, misedited)
    (misedited / "config.pbtxt").write_text(config.read_text().replace('name: "broken_net"', 'name: "misedited_net"') + "}\n")
    running = Serve(tmp_path, repository)
    running.start()
    try:
        warnings = [line for line in running.text().splitlines() if line.startswith("segserve: warning: ")]
        assert [line.split(" (requests")[0] for line in warnings] == [
            "segserve: warning: network broken_net failed to load and is not served",
            "segserve: warning: network misedited_net failed to load and is not served"], warnings
        assert warnings[0].startswith("segserve: warning: network broken_net failed to load and is not served (requests "
                                      "for it fail; the others serve; it is the default network of segment_2d: requests "
                                      "naming no network fail): "), warnings
        assert str(misedited / "config.pbtxt") in warnings[1], warnings  # the repository given, not the server's copy
        assert "segserve-loaded-" not in running.text()
        frame = make_stack(rng, 1, (150, 170))[0]
        with running.client(network=DEFAULT_NETWORK) as client:
            assert_matches_reference(client.segment(frame, probabilities=True), frame[None], default_network, PipelineOptions())
        for network in (None, "broken_net"):  # the default, or named
            with running.client(network=network) as client, pytest.raises(SegmentationError,
                                                                           match="'broken_net'.* is not ready"):
                client.segment(frame)
        # Asked with a patience, the question failed only at its end: "no available versions" is
        # also what a network reloading says; the index (with the token) tells the two apart.
        for protocol in ("grpc", "http"):
            url = running.grpc_url if protocol == "grpc" else f"127.0.0.1:{running.ports['http']}"
            with SegmentationClient(url, transport=protocol, token=running.token, network="broken_net") as client:
                started = time.monotonic()
                with pytest.raises(SegmentationError, match=f"network 'broken_net' failed to load on {url}: .*; loaded 2D "
                                   f"networks: {DEFAULT_NETWORK}"):
                    client.network_info(patience_s=600)
                assert time.monotonic() - started < 300  # not the patience
    finally:
        running.process.send_signal(signal.SIGINT)
        assert running.process.wait(timeout=120) == 0, running.text()


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    """On the 2D pipeline alone, with 2 sliding-window instances (shipped: 4): restarts and
    reloads take as long as loading the stubs, and this module does five of them."""
    directory = tmp_path_factory.mktemp("serve")
    running = Serve(directory, copy_2d_repository(directory / "model_repository", sliding_window_instances=2))
    running.mark()
    running.start()
    yield running
    if running.process.poll() is None:
        running.process.send_signal(signal.SIGTERM)
        running.process.wait(timeout=90)


def test_user_without_token_segments_with_default_options(serve, rng, tmp_path):
    stack = make_stack(rng, 3, (150, 170))
    np.save(tmp_path / "scan.npy", stack)
    command = [sys.executable, "-m", "client", "segment", str(tmp_path / "scan.npy"), "--out", str(tmp_path / "out"),
               "--url", serve.grpc_url, "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=environment_without_token(tmp_path),
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(tmp_path / "out" / "scan_mask.npy"), reference_masks(serve, stack))


def test_idle_stub_killed_is_reloaded_alone(serve):
    """A stub that dies with nothing in flight (and no request sent to it since): the launcher
    reloads that model alone, without a restart."""
    victim = next(pid for pid, model in serve.stubs().items() if "segment_2d" in model)
    serve.mark()
    os.kill(victim, signal.SIGKILL)
    serve.wait_until(lambda: serve.text().count("segserve ready") > serve.ready_lines, "ready again")
    assert "segserve ready again: reloaded segment_2d in" in serve.text()
    assert errors_of_concurrent_requests(serve, count=8) == []


def test_killed_stub_is_reloaded_and_the_stream_loses_nothing_with_default_options(serve, rng):
    frames = list(make_stack(rng, 30, (256, 256)))
    stubs_before = len(serve.stubs())
    outcomes = []
    with serve.client(transport="shm") as client:
        # Default patience (time-based, 600 s) rides out the reload, however busy the machine.
        stream = threading.Thread(target=lambda: outcomes.extend(client.segment_stream(frames, inflight=4)))
        stream.start()
        serve.wait_until(lambda: len(outcomes) >= 5, "5 frames in")
        serve.mark()
        victim = next(pid for pid, model in serve.stubs().items() if "segment_2d" in model)
        os.kill(victim, signal.SIGKILL)
        stream.join(timeout=900)
    assert not stream.is_alive()
    # Frames were inside the dead stub: Triton 2.51 never answers them, so after the reload the
    # launcher restarts the server to drop them (docs/recovery.md); the client retries them.
    assert "stub(s) of segment_2d died" in serve.text() and "reloading segment_2d" in serve.text()
    serve.wait_until(lambda: serve.text().count("segserve ready") > serve.ready_lines, "ready again")
    assert [o.index for o in outcomes] == list(range(30)) and all(o.ok for o in outcomes), [(o.index, o.attempts, o.error) for o in outcomes if not o.ok]
    assert np.array_equal(np.stack([o.result.mask for o in outcomes]), reference_masks(serve, frames))
    assert len(serve.stubs()) == stubs_before


def errors_of_concurrent_requests(serve: Serve, count: int) -> list[str]:
    """Send ``count`` small frames to segment_2d at once (so every instance gets one) over plain
    gRPC; the error messages of those that failed."""
    errors: list[str] = []

    def request() -> None:
        with grpcclient.InferenceServerClient(serve.grpc_url) as client:
            image = grpcclient.InferInput("IMAGE", [1, 64, 64], "FP32")
            image.set_data_from_numpy(np.zeros((1, 64, 64), np.float32))
            try:
                client.infer("segment_2d", [image], client_timeout=120)
            except InferenceServerException as error:
                errors.append(error.message())

    threads = [threading.Thread(target=request) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=150)
    return errors


def test_server_killed_mid_stream_then_resumed_writes_every_frame_once(serve, rng, tmp_path):
    stack = make_stack(rng, 40, (200, 230))
    np.save(tmp_path / "scan.npy", stack)
    out, record = tmp_path / "out", tmp_path / "out" / "scan.segment.json"
    command = [sys.executable, "-m", "client", "segment", str(tmp_path / "scan.npy"), "--out", str(out), "--url", serve.grpc_url,
               "--token", serve.token, "--transport", "shm", "--inflight", "2", "--retries", "1", "--no-progress"]
    streaming = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    wait_for_record(record, 5, streaming)
    # A crash, not a planned stop: the launcher is SIGKILLed; tritonserver follows (it dies with
    # its parent) and every frame in flight or still to send fails.
    tritonserver = psutil.Process(serve.process.pid).children()[0]
    serve.process.kill()
    serve.process.wait()
    tritonserver.wait(timeout=90)
    assert streaming.wait(timeout=120) == 1
    assert "failed" in streaming.stderr.read()
    serve.mark()
    serve.start()
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr  # --resume did the failed and unsent frames
    saved = json.loads(record.read_text())
    assert saved["done"] == 40 and saved["failed"] == {}
    assert np.array_equal(np.load(out / "scan_mask.npy"), reference_masks(serve, stack))


def test_sigterm_lets_requests_in_flight_finish_then_leaves_nothing_behind(serve, rng):
    frames = list(make_stack(rng, 3, (1024, 1024)))
    stub_pids = list(serve.stubs())
    assert len(stub_pids) >= 3 and python_backend_regions() - serve.regions_before  # 2 sliding windows, the network
    assert f"segserve ready: gRPC {serve.grpc_url}  HTTP 127.0.0.1:{serve.ports['http']}" in serve.text()
    results, errors = {}, {}

    def segment(index):
        try:
            with grpcclient.InferenceServerClient(serve.grpc_url) as client:
                image = grpcclient.InferInput("IMAGE_UINT16", [1, *frames[index].shape], "UINT16")
                image.set_data_from_numpy(frames[index][None])
                results[index] = client.infer("segment_2d", [image]).as_numpy("MASK")
        except Exception as error:  # noqa: BLE001 - recorded for the assertion
            errors[index] = error

    expected = reference_masks(serve, frames)
    threads = [threading.Thread(target=segment, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # all three in the server
    start = time.monotonic()
    serve.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=120)
    assert errors == {}, {i: str(e) for i, e in errors.items()}
    assert all(np.array_equal(results[i], expected[i]) for i in range(3))
    assert serve.process.wait(timeout=90) == 0
    assert time.monotonic() - start < 90
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in stub_pids)
    assert "stopped (tritonserver exit code 0)" in serve.text()
    assert regions_left_since(serve.regions_before) == set()
