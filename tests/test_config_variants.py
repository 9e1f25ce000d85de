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

from segserve.launcher import REPO_ROOT, ServerConfig, ServerError, TritonServer
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
    """With a GPU every model of the variant loads; without one the launcher refuses the start,
    naming the pipeline that cannot load and Triton's reason for it and for the network."""
    repository = copy_2d_repository(tmp_path / "model_repository")
    config = ServerConfig(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0,
                          extra_args=(f"--model-config-name={variant}",))
    server = TritonServer(config, log_path=tmp_path / "server.log")
    if not torch.cuda.is_available():
        with pytest.raises(ServerError, match="tritonserver could not load segment_2d") as raised:
            server.start()
        message = str(raised.value)
        assert "instance group segment_2d_0 of model segment_2d has kind KIND_GPU but no GPUs are available" in message
        network_reason = ("unable to find backend library for backend 'onnxruntime'" if variant == "onnxruntime"
                          else "of model unet2d_particles has kind KIND_GPU but no GPUs are available")
        assert network_reason in message, message  # the pip-installed server has no onnxruntime backend
        return
    with server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        index = client.get_model_repository_index(headers=server.token_headers("grpc"), as_json=True)["models"]
        client.close()
    states = {entry["name"]: (entry.get("state"), entry.get("reason", "")) for entry in index}
    for model in (*TWO_D_STEPS, "unet2d_particles"):
        state, reason = states[model]
        # NVIDIA's images have the onnxruntime backend; the pip-installed server has not
        assert state == "READY" or (variant == "onnxruntime" and model == "unet2d_particles"
                                    and "unable to find backend library for backend 'onnxruntime'" in reason), (model, reason)
