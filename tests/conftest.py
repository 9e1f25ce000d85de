"""Shared fixtures. The real tritonserver starts once per session on a copy of the model
repository that also holds a second exported network (a one-channel BasicUNet), on free local ports."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from monai.networks import nets

from client.auth import TOKEN_ENV
from export.network_export import ExportSettings, build_network, export_network, settings_from_spec
from segserve.launcher import REPO_ROOT, ServerConfig, TritonServer, copy_models
from segserve.network_spec import read_model_config
from segserve.onnx_network import OnnxNetwork
from segserve.torchscript_network import TorchScriptNetwork

# Where the server's network runs, so the in-process reference runs there too.
NETWORK_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CHECKPOINT = REPO_ROOT / "training" / "checkpoints" / "unet2d_particles"
DEFAULT_NETWORK = "unet2d_particles"
DEFAULT_NETWORK_3D = "unet3d_organs"
SECOND_NETWORK = "basicunet_test"
FAULTY_MODEL = "faulty_2d"
# A small valid frame [1, 70, 90] float32: the "good request" after each bad one.
GOOD_FRAME = np.random.default_rng(0).random((1, 70, 90), dtype=np.float32)
# The 2D pipeline alone: for extra servers that need to start (and restart) quickly.
# Its Python-backend steps (one, segment_2d itself: preprocessing, sliding window and
# postprocessing in one process).
TWO_D_STEPS = ("segment_2d",)
TWO_D_MODELS = (*TWO_D_STEPS, DEFAULT_NETWORK)


def pytest_collection_modifyitems(items) -> None:
    """Mark every test that uses the session's server (directly or through another fixture)
    ``server``: `make test-fast` (``-m "not server"``) leaves them out."""
    for item in items:
        if "server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)


class InBackground:
    """A slow preparation that needs no server (a virtual env or a resolution from the package
    index), run in a thread from the moment the tests are chosen, so that it overlaps the
    session server's start instead of following it; the test that needs it awaits ``result``."""

    def __init__(self, function: Callable[[], object], directory: pathlib.Path):
        self.directory = directory
        self._result: object = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function: Callable[[], object]) -> None:
        try:
            self._result = function()
        except BaseException as error:  # noqa: BLE001 - raised again in the awaiting test
            self._error = error

    def result(self) -> object:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result

    def discard(self, timeout_s: float = 60.0) -> None:
        """Let it finish (a session cut short may not have awaited it), then remove its files."""
        self._thread.join(timeout_s)
        shutil.rmtree(self.directory, ignore_errors=True)


BACKGROUND: dict[str, InBackground] = {}


def pytest_collection_finish(session) -> None:
    """Start the background preparations (``BACKGROUND_PREPARATIONS = {name: function}`` in a
    test module) of the modules with a chosen test. Each function gets a fresh directory,
    removed when the session ends."""
    for item in session.items:
        preparations = getattr(getattr(item, "module", None), "BACKGROUND_PREPARATIONS", {})
        for name, function in preparations.items():
            if name not in BACKGROUND:
                directory = pathlib.Path(tempfile.mkdtemp(prefix=f"segserve-test-{name}-"))
                BACKGROUND[name] = InBackground(lambda function=function, directory=directory: function(directory),
                                                directory)


def pytest_sessionfinish(session) -> None:
    for preparation in BACKGROUND.values():
        preparation.discard()


def background_result(name: str) -> object:
    """The result of a background preparation started for this session (see InBackground)."""
    return BACKGROUND[name].result()


def copy_2d_repository(destination: pathlib.Path, sliding_window_instances: int | None = None) -> pathlib.Path:
    """A model repository with only the 2D pipeline and its default network; with
    ``sliding_window_instances``, that many sliding-window stubs instead of the shipped count
    (a server that starts sooner, for tests where the count does not matter)."""
    repository = copy_models(destination, TWO_D_MODELS)
    if sliding_window_instances is not None:
        set_instance_count(repository / "segment_2d" / "config.pbtxt", sliding_window_instances)
    return repository


def set_instance_count(config: pathlib.Path, count: int) -> None:
    """Rewrite a model's ``instance_group`` count in its config.pbtxt."""
    shipped = read_model_config(config).instance_group[0].count
    config.write_text(config.read_text().replace(f"count: {shipped} kind: KIND_CPU", f"count: {count} kind: KIND_CPU", 1))
    assert read_model_config(config).instance_group[0].count == count, config


# One output channel, as a binary network trained with a sigmoid: the export serves it as two
# classes (export.network_export.OneChannelAsTwoClasses).
SECOND_NETWORK_SETTINGS = dict(
    architecture="BasicUNet",
    arguments={"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "features": [8, 8, 16, 32, 64, 8]},
    tile=(64, 48),
)


@pytest.fixture(scope="session")
def default_network_cpu() -> torch.nn.Module:
    """The default network in torch on the CPU, from the committed checkpoint."""
    return build_network(settings_from_spec(CHECKPOINT.with_suffix(".json"), CHECKPOINT.with_suffix(".pt"), DEFAULT_NETWORK))


@pytest.fixture(scope="session")
def default_network(default_network_cpu) -> torch.nn.Module:
    """The parity reference: on the CPU, the torch network built from the committed checkpoint.

    On a GPU, the TorchScript twin the server runs there: GPU kernels differ from each other
    by ~1e-3 on this network's logits (its instance norms amplify rounding on flat tiles),
    so only the same kernels can be held to 1e-4.
    """
    if NETWORK_DEVICE == "cuda":
        return TorchScriptNetwork(REPO_ROOT / "model_repository" / DEFAULT_NETWORK / "1" / "model.ts", torch.device("cuda"))
    return default_network_cpu


@pytest.fixture(scope="session")
def network_3d() -> Callable[[torch.Tensor], torch.Tensor]:
    """The parity reference for the default 3D network: the ONNX file the server runs, with
    onnxruntime in-process (on a GPU, the TorchScript twin the server runs there). Not the torch
    module: on a volume smaller than a tile, the padded, mostly flat window makes the instance
    norms amplify torch-vs-onnxruntime rounding to 1.8e-4 (measured), past the 1e-4 bound."""
    version = REPO_ROOT / "model_repository" / DEFAULT_NETWORK_3D / "1"
    if NETWORK_DEVICE == "cuda":
        return TorchScriptNetwork(version / "model.ts", torch.device("cuda"))
    return OnnxNetwork(version / "model.onnx", use_cuda=False)


@pytest.fixture(scope="session")
def second_network_checkpoint(tmp_path_factory) -> pathlib.Path:
    torch.manual_seed(3)
    network = getattr(nets, SECOND_NETWORK_SETTINGS["architecture"])(**SECOND_NETWORK_SETTINGS["arguments"])
    path = tmp_path_factory.mktemp("checkpoints") / "basicunet.pt"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory, second_network_checkpoint) -> pathlib.Path:
    repository = tmp_path_factory.mktemp("server") / "model_repository"
    shutil.copytree(REPO_ROOT / "model_repository", repository)
    for network in (DEFAULT_NETWORK, DEFAULT_NETWORK_3D):
        if not (repository / network / "1" / "model.onnx").exists():
            pytest.fail(f"default network {network} not exported: run `make setup`")
    # A lower pixel limit than the shipped one, so the over-limit case stays small.
    preprocess_config = repository / "segment_2d" / "config.pbtxt"
    preprocess_config.write_text(preprocess_config.read_text().replace('"100000000"', f'"{4096 * 4096}"'))
    # One 3D sliding-window instance, not the shipped 2: one stub fewer to start (~6 s of CPU).
    # The 2D pipeline keeps its 4: concurrent frames' tiles must meet in network batches.
    set_instance_count(repository / "segment_3d" / "config.pbtxt", 1)
    # A model that fails on demand through the server's error marking (tests/test_retry.py).
    shutil.copytree(REPO_ROOT / "tests" / "models" / FAULTY_MODEL, repository / FAULTY_MODEL)
    settings = ExportSettings(checkpoint=second_network_checkpoint, name=SECOND_NETWORK, max_batch_size=8, **SECOND_NETWORK_SETTINGS)
    export_network(settings, repository, log=lambda *_: None)
    return repository


@pytest.fixture(scope="session")
def server(model_repository, tmp_path_factory) -> TritonServer:
    log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    config = ServerConfig(model_repository=model_repository, http_port=0, grpc_port=0, metrics_port=0)
    running = TritonServer(config, log_path=log).start()
    # Clients made by the tests, and CLIs they start, find the restricted endpoints' token here.
    previous = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = running.config.token
    try:
        yield running
    finally:
        # Killed after 2 s rather than waiting for Triton's graceful unload of every model (10 s);
        # the graceful stop has its own test (tests/test_faults.py).
        running.stop(timeout_s=2)
        if previous is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = previous


@pytest.fixture
def grpc(server) -> grpcclient.InferenceServerClient:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        yield client


@pytest.fixture(scope="session")
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


TRITON_DTYPES = {np.float32: "FP32", np.uint8: "UINT8", np.uint16: "UINT16", np.int16: "INT16", np.int32: "INT32",
                 np.float64: "FP64"}


class Endpoint:
    """A tritonclient client of one protocol with the server's restricted-endpoint token."""

    def __init__(self, protocol: str, server):
        self.protocol = protocol
        self.module = grpcclient if protocol == "grpc" else httpclient
        self.client = self.module.InferenceServerClient(server.grpc_url if protocol == "grpc" else server.http_url)
        self.token = server.token_headers(protocol)

    def tensor(self, name: str, array: np.ndarray, triton_dtype: str | None = None):
        tensor = self.module.InferInput(name, list(array.shape), triton_dtype or TRITON_DTYPES[array.dtype.type])
        if triton_dtype is None:
            tensor.set_data_from_numpy(array)
        return tensor

    def infer(self, inputs: dict[str, np.ndarray] | list, parameters=None, outputs=("MASK",)):
        tensors = inputs if isinstance(inputs, list) else [self.tensor(n, a) for n, a in inputs.items()]
        requested = [o if not isinstance(o, str) else self.module.InferRequestedOutput(o) for o in outputs]
        return self.client.infer("segment_2d", tensors, outputs=requested, parameters=parameters or {})

    def assert_still_serving(self):
        assert self.infer({"IMAGE": GOOD_FRAME}).as_numpy("MASK").shape == GOOD_FRAME.shape[1:]


@pytest.fixture(params=["grpc", "http"])
def endpoint(request, server) -> Endpoint:
    """An Endpoint for each protocol, gRPC then HTTP."""
    endpoint = Endpoint(request.param, server)
    yield endpoint
    endpoint.client.close()
