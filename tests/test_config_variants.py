"""Configuration variants (``configs/<name>.pbtxt``, chosen with ``--model-config-name``): every
file parses, keeps its model's name, inputs and outputs, and points at model files that exist;
the real server picks each variant up (on a machine without a GPU or without Triton's
onnxruntime backend, the models then report exactly that, not a configuration error)."""

from __future__ import annotations

import pathlib

import onnx
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2

from segserve.launcher import REPO_ROOT, ServerConfig, TritonServer
from segserve.network_spec import read_model_config
from tests.conftest import TWO_D_STEPS, copy_2d_repository

pytestmark = pytest.mark.server  # starts its own server


REPOSITORY = REPO_ROOT / "model_repository"
VARIANTS = ("gpu", "onnxruntime")
MODELS = sorted(p.name for p in REPOSITORY.iterdir() if (p / "config.pbtxt").is_file())


def variant_files(model: str) -> list[pathlib.Path]:
    return sorted((REPOSITORY / model / "configs").glob("*.pbtxt"))


def signature(config: model_config_pb2.ModelConfig) -> list[tuple]:
    tensors = [*config.input, *config.output]
    return [(t.name, t.data_type, list(t.dims), getattr(t, "optional", False)) for t in tensors] + [("batching", config.max_batch_size > 0)]


@pytest.mark.parametrize("model", MODELS)
def test_every_non_ensemble_model_has_both_variants(model):
    config = read_model_config(REPOSITORY / model / "config.pbtxt")
    names = {p.stem for p in variant_files(model)}
    assert names == (set() if config.platform == "ensemble" else set(VARIANTS))


@pytest.mark.parametrize("model", [m for m in MODELS if variant_files(m)])
def test_variants_agree_with_the_default_and_the_model_files(model):
    default = read_model_config(REPOSITORY / model / "config.pbtxt")
    for path in variant_files(model):
        variant = read_model_config(path)
        assert variant.name == model, path
        assert signature(variant) == signature(default), path
        # A GPU takes bigger tile batches (fewer BLS calls per frame): never smaller than the CPU's.
        assert variant.max_batch_size >= default.max_batch_size, path
        kinds = {group.kind for group in variant.instance_group}
        assert kinds == {model_config_pb2.ModelInstanceGroup.KIND_GPU}, path
        version = REPOSITORY / model / "1"
        if variant.backend == "python":
            assert (version / "model.py").is_file(), path
            assert dict(variant.parameters).keys() >= dict(default.parameters).keys() - {"device"}, path
        else:
            assert variant.backend == "onnxruntime" and variant.default_model_filename == "model.onnx", path
            graph = onnx.load(str(version / "model.onnx")).graph
            graph_dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][1:]
            assert (graph.input[0].name, graph_dims) == (variant.input[0].name, list(variant.input[0].dims))
            assert graph.output[0].name == variant.output[0].name


@pytest.mark.parametrize("variant", VARIANTS)
def test_server_loads_each_variant(tmp_path, variant):
    repository = copy_2d_repository(tmp_path / "model_repository")
    config = ServerConfig(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0,
                          extra_args=(f"--model-config-name={variant}", "--exit-on-error=false",
                                      "--strict-readiness=false"))
    with TritonServer(config, log_path=tmp_path / "server.log") as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        index = client.get_model_repository_index(headers=server.token_headers("grpc"), as_json=True)["models"]
        client.close()
    states = {entry["name"]: (entry.get("state"), entry.get("reason", "")) for entry in index}
    has_gpu = torch.cuda.is_available()
    for model in TWO_D_STEPS:
        state, reason = states[model]
        assert (state == "READY") if has_gpu else ("has kind KIND_GPU but no GPUs are available" in reason), (model, reason)
    state, reason = states["unet2d_particles"]
    if variant == "onnxruntime":  # the pip-installed server has no onnxruntime backend; NVIDIA's images do
        assert state == "READY" or "unable to find backend library for backend 'onnxruntime'" in reason, reason
    else:
        assert (state == "READY") if has_gpu else ("KIND_GPU but no GPUs are available" in reason), reason
