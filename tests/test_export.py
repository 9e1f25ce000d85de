"""Export: ONNX with a dynamic batch axis, checked against torch, config from the graph; the
exported network then serves through segment_2d with no code written."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from client.api import SegmentationClient
from export.__main__ import main as export_main
from export.network_export import ExportError, ExportSettings, build_network, export_network
from segserve.network_spec import load_network_spec
from segserve.options import PipelineOptions
from segserve.reference import reference_probabilities
from tests.conftest import NETWORK_DEVICE, SECOND_NETWORK, SECOND_NETWORK_SETTINGS


def test_export_writes_model_and_config(tmp_path):
    settings = ExportSettings("UNet", {"spatial_dims": 2, "in_channels": 2, "out_channels": 4, "channels": [4, 8], "strides": [2]},
                              None, (32, 40), "tiny_unet", max_batch_size=6)
    model_dir = export_network(settings, tmp_path, log=lambda *_: None)
    graph = onnx.load(str(model_dir / "1" / "model.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    assert (model_dir / "1" / "model.py").read_text().count("import") == 1
    spec = load_network_spec(tmp_path, "tiny_unet")
    assert (spec.in_channels, spec.num_classes, spec.tile_size, spec.max_batch_size) == (2, 4, (32, 40), 6)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(architecture="ResNet", arguments={}, tile=(8, 8)), "not supported"),
        (dict(architecture="UNet", arguments={"spatial_dims": 2}, tile=(8, 8, 8)), "spatial_dims"),
        (dict(architecture="UNet", arguments={"spatial_dims": 2, "bogus": 1}, tile=(8, 8)), "bad arguments"),
    ],
)
def test_export_refuses_bad_settings(tmp_path, settings, message):
    with pytest.raises(ExportError, match=message):
        export_network(ExportSettings(checkpoint=None, name="x", **settings), tmp_path)


def test_export_cli_reports_mismatched_checkpoint_in_one_line(tmp_path, second_network_checkpoint, capsys):
    code = export_main(["--architecture", "UNet", "--arguments", '{"spatial_dims": 2, "in_channels": 1, "out_channels": 2, '
                        '"channels": [4, 8], "strides": [2]}', "--tile", "32", "32", "--checkpoint", str(second_network_checkpoint),
                        "--name", "x", "--repository", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 1 and error.startswith("export: error: checkpoint") and error.count("\n") == 1


def test_exported_network_serves_through_segment_2d(server, second_network_checkpoint, rng):
    settings = ExportSettings(checkpoint=second_network_checkpoint, name=SECOND_NETWORK, **SECOND_NETWORK_SETTINGS)
    network = build_network(settings).to(NETWORK_DEVICE)
    frame = rng.random((1, 150, 97), dtype=np.float32)
    with SegmentationClient(server.grpc_url, network=SECOND_NETWORK) as client:
        result = client.segment(frame, probabilities=True, sw_batch_size=5)
    expected = reference_probabilities(frame, network, SECOND_NETWORK_SETTINGS["tile"], PipelineOptions(sw_batch_size=5), NETWORK_DEVICE)
    assert result.probabilities.shape == (2, 150, 97)
    assert np.abs(result.probabilities - expected.numpy()).max() <= 1e-4


def test_torchscript_twin_matches_torch_inside_monai_sliding_window(default_network_cpu, rng):
    """The GPU engine's artifact (model.ts, no JIT fusion) gives the network's probabilities."""
    from segserve.launcher import REPO_ROOT
    from segserve.torchscript_network import TorchScriptNetwork

    twin = TorchScriptNetwork(REPO_ROOT / "model_repository" / "unet2d_particles" / "1" / "model.ts", torch.device("cpu"))
    frame = rng.random((1, 300, 170), dtype=np.float32)
    expected = reference_probabilities(frame, default_network_cpu, (128, 128))
    actual = reference_probabilities(frame, twin, (128, 128))
    assert float((actual - expected).abs().max()) <= 1e-5
