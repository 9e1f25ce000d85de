"""The launcher on the real server: a failed start's exception carries the error lines of that
start's log (CI prints the exception, not the log file); a port taken before the server binds it
is picked again, a port given that is in use is refused; a killed server's cleanup removes its
own shared memory, never another's."""

from __future__ import annotations

import contextlib
import http.server
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from segproto import header_name
from segserve import launcher
from segserve.launcher import PortInUseError, ServerConfig, ServerError, TritonServer, log_errors, python_backend_regions
from tests.helpers import environment_without_token, regions_left_since

def broken_repository(root: pathlib.Path, model: str) -> pathlib.Path:
    """A repository whose only model names a backend that does not exist."""
    (root / model).mkdir(parents=True)
    (root / model / "config.pbtxt").write_text(f'name: "{model}"\nbackend: "no_such_backend"\n')
    return root


def loaded_copies() -> set[pathlib.Path]:
    """The launcher's copies of repositories in the temporary directory (other servers' too)."""
    return set(pathlib.Path(tempfile.gettempdir()).glob("segserve-loaded-*"))


def start_error(repository: pathlib.Path, log: pathlib.Path) -> str:
    """The error of a start that fails; it leaves no copy of the repository behind (one stayed
    until the process ended)."""
    config = ServerConfig(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0)
    before = loaded_copies()
    with pytest.raises(ServerError, match="could not load ") as raised:
        TritonServer(config, log_path=log).start()
    models = {path.name for path in repository.iterdir()}
    for copy in loaded_copies() - before:  # another server's, made meanwhile, holds other models
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile by its server
            assert {path.name for path in copy.iterdir()} != models, copy
    return str(raised.value)


@pytest.mark.server  # starts its own server
def test_a_failed_start_says_which_model_failed_and_only_from_its_own_log_lines(tmp_path):
    # The expected lines are Triton 2.51's wording (the pinned server): the launcher itself
    # only picks error lines, it never matches their words.
    log = tmp_path / "server.log"
    first = start_error(broken_repository(tmp_path / "a", "first_broken"), log)
    assert "failed to load model 'first_broken'" in first
    assert first.splitlines()[0] == f"tritonserver could not load first_broken; see {log}"
    if launcher.visible_gpu_count() == 0:  # Triton's lines of every start without a GPU are no reason
        assert "CudaDriverHelper" not in first and "NVML" not in first and "CUDA driver" not in first
    second = start_error(broken_repository(tmp_path / "b", "second_broken"), log)
    assert "failed to load model 'second_broken'" in second
    assert "first_broken" not in second  # the same log, appended: the earlier start's lines stay out
    assert "first_broken" in log.read_text()


SLOW_MODEL = '''import time


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(120)

    def execute(self, requests):
        return []
'''


@pytest.mark.server  # starts its own server
def test_a_start_that_times_out_says_so_with_the_logs_reasons(tmp_path):
    """With an error line in the log (a model that failed), a start past its timeout said "the
    server is not prepared: start() it": the reason was built after the stop removed the copy."""
    repository = broken_repository(tmp_path / "repository", "broken")
    (repository / "slow" / "1").mkdir(parents=True)
    (repository / "slow" / "config.pbtxt").write_text(
        'name: "slow"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [{ name: "X" data_type: TYPE_FP32 dims: [1] }]\noutput [{ name: "Y" data_type: TYPE_FP32 dims: [1] }]\n')
    (repository / "slow" / "1" / "model.py").write_text(SLOW_MODEL)
    log = tmp_path / "server.log"
    config = ServerConfig(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0)
    with pytest.raises(ServerError) as raised:
        TritonServer(config, log_path=log).start(timeout_s=45)  # broken fails at once, slow takes 120 s
    message = str(raised.value)
    assert message.startswith(f"tritonserver not ready after 45 s; failed to load: broken; see {log}"), message
    assert "failed to load model 'broken'" in message


def test_a_network_is_told_from_a_pipeline_by_its_files_or_its_runner():
    """A network whose ONNX file is missing (an export cut short) was taken for a pipeline, and
    its failure stopped the whole server."""
    shipped = pathlib.Path(launcher.REPO_ROOT) / "model_repository"
    assert launcher.is_network(shipped / "unet2d_particles") and not launcher.is_network(shipped / "segment_2d")
    assert not launcher.is_network(shipped / "segment_2d_uint16")  # an ensemble: no version files at all


def test_a_network_without_its_onnx_file_is_still_a_network(tmp_path):
    (tmp_path / "net" / "1").mkdir(parents=True)
    (tmp_path / "net" / "1" / "model.py").write_text(
        (pathlib.Path(launcher.REPO_ROOT) / "model_repository" / "unet2d_particles" / "1" / "model.py").read_text())
    assert launcher.is_network(tmp_path / "net")


def test_a_missing_repository_is_named_before_the_server_starts(tmp_path):
    config = ServerConfig(model_repository=tmp_path / "missing", http_port=0, grpc_port=0, metrics_port=0)
    with pytest.raises(ServerError, match=f"model repository {tmp_path / 'missing'} is not a directory"):
        TritonServer(config, log_path=tmp_path / "server.log").start()


@pytest.mark.server
def test_hidden_directories_of_the_repository_are_not_loaded(tmp_path):
    """An export killed mid-write leaves ``.<name>.export-*`` in the repository; a notebook
    leaves ``.ipynb_checkpoints``. Neither is a model, and neither stops the start."""
    repository = broken_repository(tmp_path / "repository", ".unet.export-1x2y")
    (repository / ".ipynb_checkpoints").mkdir()
    config = ServerConfig(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0)
    server = TritonServer(config, log_path=tmp_path / "server.log").start()
    try:
        with httpclient.InferenceServerClient(server.http_url) as client:
            assert client.is_server_ready()
    finally:
        server.stop()


def test_log_errors_keeps_error_lines_else_the_last_lines(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("I1201 loading\nE1201 21:12:11 x.cc:1] \"boom\"\nTraceback (most recent call last):\n"
                   "  File \"model.py\"\nValueError: bad tile\nI1201 exiting\n")
    assert log_errors(log) == ['E1201 21:12:11 x.cc:1] "boom"', "ValueError: bad tile"]
    assert launcher.failed_models(["E1 x] \"failed to load 'a' version 1: y\"", "error: load failed for model 'b': z",
                                   "E2 x] failed to load model 'a'"]) == ["a", "b"]
    quiet = tmp_path / "quiet.log"
    quiet.write_text("".join(f"I line {i}\n" for i in range(30)) + "x" * 1000 + "\n")
    tail = log_errors(quiet)
    assert len(tail) == 12 and tail[0] == "I line 19" and len(tail[-1]) == 400
    assert log_errors(tmp_path / "missing.log") == []


@pytest.mark.server
def test_a_port_taken_before_the_server_binds_it_is_picked_again(tmp_path, monkeypatch, capfd):
    with socket.socket() as thief:
        thief.bind(("127.0.0.1", 0))
        thief.listen()
        taken = thief.getsockname()[1]
        real_free_ports = launcher.free_ports
        picks = iter([[taken, *real_free_ports(2)]])
        monkeypatch.setattr(launcher, "free_ports", lambda count, host: next(picks, None) or real_free_ports(count, host))
        (tmp_path / "repository").mkdir()
        config = ServerConfig(model_repository=tmp_path / "repository", http_port=0, grpc_port=0, metrics_port=0)
        with TritonServer(config, log_path=tmp_path / "server.log") as server:
            assert server.is_ready()
            assert taken not in (config.http_port, config.grpc_port, config.metrics_port)
    assert f"port(s) {taken} were taken" in capfd.readouterr().err
    assert f":{taken}" in (tmp_path / "server.log").read_text()  # the first try did fail on it


def test_serve_on_a_port_in_use_is_refused_at_once_and_leaves_the_running_servers_token(tmp_path):
    """A second ``serve`` on the ports of a running one used to print "segserve ready" (the
    other server answered), overwrite the token file, fail to bind after loading its models and
    restart five times over minutes."""
    token_file = tmp_path / "token"
    token_file.write_text("token-of-the-running-server\n")
    with socket.socket() as running:
        running.bind(("127.0.0.1", 0))
        running.listen()
        port = running.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "segserve", "serve", "--http-port", "0", "--grpc-port", str(port),
                                 "--metrics-port", "0", "--token-file", str(token_file)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"segserve: error: grpc port {port} on 127.0.0.1 in use by another process "
                                          "(another server?); stop it or choose another port (0 picks a free one)"]
    assert "ready" not in result.stdout
    assert token_file.read_text() == "token-of-the-running-server\n"


@pytest.mark.parametrize("case", ["repository", "log-file", "token-file", "foreign-host", "no-host"])
def test_serve_refuses_what_it_cannot_start_with_in_one_line_and_leaves_the_token_file(tmp_path, case):
    """A mistyped repository replaced the running server's token before being refused; a log
    file or token file that cannot be written gave a traceback; an address not of this machine,
    or none at all, was told as "port ... in use by another process"."""
    token_file = tmp_path / "token"
    token_file.write_text("token-of-the-running-server\n")
    options = {"repository": ["--model-repository", str(tmp_path / "missing")],
               "log-file": ["--log-file", str(tmp_path / "no-such-directory" / "server.log")],
               "token-file": ["--token-file", str(tmp_path / "token" / "token")],
               "foreign-host": ["--host", "192.0.2.1"],  # TEST-NET-1: documentation's, no machine's
               "no-host": ["--host", "127.0.0.999"]}[case]
    command = [sys.executable, "-m", "segserve", "serve", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
               "--token-file", str(token_file), *options]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    expected = {"repository": f"model repository {tmp_path / 'missing'} is not a directory",
                "log-file": f"cannot write the log file {tmp_path / 'no-such-directory' / 'server.log'}: "
                            "No such file or directory",
                "token-file": f"{tmp_path / 'token'}",
                "foreign-host": "--host 192.0.2.1: cannot listen there (Cannot assign requested address: not an address "
                                "of this machine?)",
                "no-host": "--host 127.0.0.999: not a host name or address ("}[case]
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("segserve: error: ") and expected in line, line
    assert token_file.read_text() == "token-of-the-running-server\n"


@pytest.mark.parametrize("options, environment, message", [
    (["--http-port", "70000"], {}, "--http-port must be a port, 0 to 65535 (0 picks a free one), got 70000"),
    (["--grpc-port", "-1"], {}, "--grpc-port must be a port, 0 to 65535 (0 picks a free one), got -1"),
    (["--http-port", "9000", "--metrics-port", "9000"], {},
     "--http-port and --metrics-port are both 9000: each endpoint needs its own port"),
    (["--startup-timeout", "0"], {}, "--startup-timeout must be > 0 seconds, got 0.0"),
    (["--drain-timeout", "-1"], {}, "--drain-timeout must be >= 0 seconds, got -1.0"),
    (["--token", "abc:def"], {}, "--token may hold only letters, digits and . _ ~ -"),
    (["--token="], {}, "--token may hold only letters, digits and . _ ~ -, and not be empty"),
    ([], {"SEGSERVE_TOKEN": "a b"}, "$SEGSERVE_TOKEN may hold only letters, digits and . _ ~ -"),
])
def test_serve_refuses_settings_triton_cannot_take_in_one_line(tmp_path, options, environment, message):
    """A port out of range gave a traceback, one port for two endpoints Triton's usage text, an
    empty --token a random one, and "abc:def" a token a second server replaced."""
    result = subprocess.run([sys.executable, "-m", "segserve", "serve", "--token-file", str(tmp_path / "token"), *options],
                            capture_output=True, text=True, timeout=120, env={**os.environ, **environment})
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == f"python -m segserve serve: error: {message}", \
        result.stderr
    assert not (tmp_path / "token").exists()


class ReadyHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET as a ready server would."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.server
def test_readiness_answered_by_another_server_on_the_port_is_not_this_ones(tmp_path, monkeypatch):
    """Another server takes the HTTP port after the check, before this one binds it (two starts
    at once): its readiness must not pass for this server's."""
    (tmp_path / "repository").mkdir()
    http_port, grpc_port, metrics_port = launcher.free_ports(3)
    others = []
    real_start_once = TritonServer._start_once

    def start_once_after_another_server_took_the_port(server, timeout_s):
        others.append(http.server.ThreadingHTTPServer(("127.0.0.1", http_port), ReadyHandler))
        threading.Thread(target=others[-1].serve_forever, daemon=True).start()
        return real_start_once(server, timeout_s)

    monkeypatch.setattr(TritonServer, "_start_once", start_once_after_another_server_took_the_port)
    config = ServerConfig(model_repository=tmp_path / "repository", http_port=http_port, grpc_port=grpc_port,
                          metrics_port=metrics_port)
    server = TritonServer(config, log_path=tmp_path / "server.log")
    try:
        with pytest.raises(PortInUseError, match=f"http port {http_port} on 127.0.0.1 in use"):
            server.start(timeout_s=120)
    finally:
        server.stop()
        for other in others:
            other.shutdown()
            other.server_close()


ECHO_MODEL = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):  # through DLPack: pb_utils.Tensor(name, numpy) sends nothing with NumPy 2 here
        return [pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("OUT", pb_utils.get_input_tensor_by_name(r, "IN"))])
                for r in requests]
'''
ECHO_CONFIG = '''name: "echo"
backend: "python"
input [{ name: "IN", data_type: TYPE_INT32, dims: [ 1 ] }]
output [{ name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] }]
instance_group [{ kind: KIND_CPU, count: 1 }]
'''


def echo_repository(root: pathlib.Path) -> pathlib.Path:
    """A repository of one Python-backend model (one stub, one shared-memory region)."""
    (root / "echo" / "1").mkdir(parents=True)
    (root / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (root / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    return root


def echo(server: TritonServer, value: int) -> int:
    with httpclient.InferenceServerClient(server.http_url) as client:
        tensor = httpclient.InferInput("IN", [1], "INT32")
        tensor.set_data_from_numpy(np.array([value], dtype=np.int32))
        return int(client.infer("echo", [tensor]).as_numpy("OUT")[0])


@pytest.mark.server
def test_a_killed_server_removes_its_regions_and_leaves_a_later_servers_alone(tmp_path):
    def config(name: str) -> ServerConfig:
        return ServerConfig(model_repository=echo_repository(tmp_path / name), http_port=0, grpc_port=0, metrics_port=0)

    with TritonServer(config("first"), log_path=tmp_path / "first.log") as first:
        first_regions = python_backend_regions()
        with TritonServer(config("second"), log_path=tmp_path / "second.log") as second:
            second_regions = python_backend_regions() - first_regions
            assert second_regions  # its stub's region
            first.stop(timeout_s=0)  # SIGKILL: the launcher removes what the server left
            assert regions_left_since(first._regions_before) == set()
            assert second_regions <= python_backend_regions()  # the second server's are still there
            assert echo(second, 41) == 41


def serve_echo(tmp_path: pathlib.Path, name: str, token_file: pathlib.Path,
               *options: str) -> tuple[subprocess.Popen, pathlib.Path]:
    """``python -m segserve serve`` of the echo repository on free ports, once it is ready."""
    output = tmp_path / f"{name}.out"
    ports = launcher.free_ports(3)
    process = subprocess.Popen([sys.executable, "-m", "segserve", "serve", "--model-repository",
                                str(echo_repository(tmp_path / name)), "--http-port", str(ports[0]), "--grpc-port",
                                str(ports[1]), "--metrics-port", str(ports[2]), "--token-file", str(token_file),
                                "--log-file", str(tmp_path / f"{name}.log"), *options],
                               stdout=open(output, "w"), stderr=subprocess.STDOUT, env=environment_without_token(tmp_path))
    deadline = time.monotonic() + 600
    while "segserve ready" not in output.read_text():
        assert process.poll() is None and time.monotonic() < deadline, output.read_text()
        time.sleep(0.25)
    return process, f"127.0.0.1:{ports[1]}"


@pytest.mark.server
def test_a_second_server_on_the_machine_shares_the_token_in_the_file(tmp_path):
    """A second ``serve`` wrote a new token over the first one's, whose shared-memory clients
    (reading the file) were refused from then on, even after the second one stopped. A token of
    the first one's own choosing too (one with a dot, shorter than new_token's was replaced)."""
    token_file = tmp_path / "token"
    first, first_url = serve_echo(tmp_path, "first", token_file, "--token", "beamline.7~a")
    try:
        token = token_file.read_text().strip()
        assert token == "beamline.7~a"
        second, second_url = serve_echo(tmp_path, "second", token_file)
        try:
            assert token_file.read_text().strip() == token
            for url in (first_url, second_url):  # a restricted endpoint, with the token in the file
                with grpcclient.InferenceServerClient(url) as control:
                    control.get_system_shared_memory_status(headers={header_name("grpc"): token})
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=120) == 0
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0
    later, _ = serve_echo(tmp_path, "later", token_file)  # none running: a new token (a leaked one dies)
    try:
        assert token_file.read_text().strip() != token
    finally:
        later.send_signal(signal.SIGTERM)
        assert later.wait(timeout=120) == 0
