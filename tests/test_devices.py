"""Where the pipeline runs: on the GPU when there is one (tensors stay there between steps
through DLPack; the network on onnxruntime-CUDA or the TorchScript twin), else on the CPU."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch

from client.api import SegmentationClient
from segserve.onnx_network import cuda_provider_available


def server_log(server, rng) -> str:
    with SegmentationClient(server.grpc_url) as client:
        client.segment(rng.random((40, 50), dtype=np.float32))
    return server.log_path.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machine: see test_pipeline_runs_on_the_gpu")
def test_pipeline_runs_on_the_cpu_without_a_gpu(server, rng):
    log = server_log(server, rng)
    assert "segment_2d: pipeline tensors on cpu" in log
    # On the CPU the engine follows the network's dimensionality (segserve.backend.onnx_runner).
    assert "unet2d_particles: torchscript engine, ['TorchScript on cpu']" in log
    assert "unet3d_organs: onnxruntime engine, ['CPUExecutionProvider']" in log


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here; scripts/gpu_check.sh runs this on a GPU machine")
def test_pipeline_runs_on_the_gpu(server, rng):
    log = server_log(server, rng)
    assert "segment_2d: pipeline tensors on cuda" in log
    expected = "CUDAExecutionProvider" if cuda_provider_available() else "torchscript engine, ['TorchScript on cuda']"
    assert expected in log, onnxruntime.get_available_providers()
