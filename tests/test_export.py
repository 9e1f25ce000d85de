"""Export: ONNX with a dynamic batch axis, checked against torch, config from the graph; the
exported network then serves through segment_2d with no code written."""

from __future__ import annotations

import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import time
import warnings
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from monai.networks import nets

from client.api import SegmentationClient, SegmentationError
from export.__main__ import main as export_main
from export.network_export import ExportError, ExportSettings, build_network, export_network
from segserve.network_spec import load_network_spec, read_model_config
from segserve.options import PipelineOptions
from segserve.reference import reference_logits, reference_probabilities
from tests.conftest import NETWORK_DEVICE, SECOND_NETWORK, SECOND_NETWORK_SETTINGS

SHIPPED_REPOSITORY = pathlib.Path(__file__).resolve().parent.parent / "model_repository"
TINY_ARGUMENTS = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2]}


def export_tiny(repository: pathlib.Path, name: str, *extra: str, out_channels: int = 2) -> int:
    """``python -m export`` of a tiny 2D UNet (a second or so), in-process."""
    arguments = json.dumps({**TINY_ARGUMENTS, "out_channels": out_channels})
    return export_main(["--architecture", "UNet", "--arguments", arguments, "--tile", "32", "32",
                        "--name", name, "--repository", str(repository), *extra])


def snapshot(root: pathlib.Path) -> dict:
    """Every path under ``root``: a link's target, a file's bytes, None for a directory."""
    return {str(path.relative_to(root)): os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else None
            for path in sorted(root.rglob("*"))}


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
        (dict(architecture="UNet", arguments={"in_channels": 1, "out_channels": 2}, tile=(8, 8)),
         r"UNet needs spatial_dims in --arguments \(2 or 3\)"),
        (dict(architecture="BasicUNet", arguments={"spatial_dims": 1}, tile=(8,)), "spatial_dims must be 2 .* or 3 .*, got 1"),
        (dict(architecture="UNet", arguments=[2, 3, 4], tile=(8, 8)), "--arguments must be a JSON object .*, got list"),
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


def test_an_exported_one_channel_network_serves_sigmoid_probabilities_through_segment_2d(server, second_network_checkpoint, rng):
    """The second network has one output channel (trained with a sigmoid): served as classes
    background and foreground, whose probability is the sigmoid of MONAI's sliding window on
    the network as trained, and the mask is where that is above 0.5."""
    settings = ExportSettings(checkpoint=second_network_checkpoint, name=SECOND_NETWORK, **SECOND_NETWORK_SETTINGS)
    network = build_network(settings).to(NETWORK_DEVICE)
    frame = rng.random((1, 150, 97), dtype=np.float32)
    with SegmentationClient(server.grpc_url, network=SECOND_NETWORK) as client:
        result = client.segment(frame, probabilities=True, sw_batch_size=5)
    logits = reference_logits(frame, network, SECOND_NETWORK_SETTINGS["tile"], PipelineOptions(sw_batch_size=5), NETWORK_DEVICE)
    foreground = torch.sigmoid(logits[0]).cpu().numpy()
    assert result.probabilities.shape == (2, 150, 97)
    assert np.abs(result.probabilities[1] - foreground).max() <= 1e-4
    assert np.abs(result.probabilities[0] - (1 - foreground)).max() <= 1e-4
    decided = np.abs(foreground - 0.5) > 1e-6
    assert np.array_equal(result.mask[decided], (foreground > 0.5)[decided].astype(np.uint8))
    assert 0 < result.mask.mean() < 1  # both classes in it: the threshold is tested


def test_torchscript_twin_matches_torch_inside_monai_sliding_window(default_network_cpu, rng):
    """The GPU engine's artifact (model.ts, no JIT fusion) gives the network's probabilities."""
    from segserve.launcher import REPO_ROOT
    from segserve.torchscript_network import TorchScriptNetwork

    twin = TorchScriptNetwork(REPO_ROOT / "model_repository" / "unet2d_particles" / "1" / "model.ts", torch.device("cpu"))
    frame = rng.random((1, 300, 170), dtype=np.float32)
    expected = reference_probabilities(frame, default_network_cpu, (128, 128))
    actual = reference_probabilities(frame, twin, (128, 128))
    assert float((actual - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
@pytest.mark.parametrize("name, what", [("segment_2d", "a python-backend model running segserve.backend.sliding_window"),
                                        ("segment_3d", "a python-backend model running segserve.backend.sliding_window"),
                                        ("segment_2d_uint16", "an ensemble model")],
                         ids=["segment_2d", "segment_3d", "segment_2d_uint16"])
def test_export_never_replaces_a_pipeline_model(tmp_path, capsys, name, what, overwrite):
    """Refused up front (nothing exported), with or without --overwrite; its files unchanged byte for byte."""
    repository = tmp_path / "model_repository"
    shutil.copytree(SHIPPED_REPOSITORY / name, repository / name, symlinks=True)
    before = snapshot(repository)
    assert export_tiny(repository, name, *overwrite) == 1
    captured = capsys.readouterr()
    assert captured.err == (f"export: error: {repository / name} is {what}, not a network exported by python -m export: "
                            "export never replaces it (choose another --name)\n")
    assert captured.out == ""  # refused before the export started
    assert snapshot(repository) == before


def test_an_export_of_an_instance_norm_network_warns_of_nothing(tmp_path):
    """Every export printed torch's "operator 'instance_norm' is set to train=True. Exporting
    with train=True": true and harmless (no running statistics; the file is checked against the
    network), but read as a broken export."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert export_tiny(tmp_path, "tiny") == 0
    assert not [w for w in caught if "instance_norm" in str(w.message)]


def test_export_refuses_an_existing_network_without_overwrite(tmp_path, capsys):
    assert export_tiny(tmp_path, "tiny") == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert export_tiny(tmp_path, "tiny", out_channels=3) == 1
    captured = capsys.readouterr()
    assert captured.err == (f"export: error: {tmp_path / 'tiny'} already holds the network tiny exported by python -m export; "
                            "add --overwrite to replace it\n")
    assert captured.out == ""
    assert snapshot(tmp_path) == before


def test_export_overwrite_replaces_the_network_whole(tmp_path, capsys):
    assert export_tiny(tmp_path, "tiny") == 0
    (tmp_path / "tiny" / "1" / "stale.txt").write_text("from the old model")
    (tmp_path / "tiny" / "2").mkdir()
    (tmp_path / "tiny" / "2" / "model.onnx").write_bytes(b"an old version")
    assert export_tiny(tmp_path, "tiny", "--overwrite", out_channels=3) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"replaced {tmp_path / 'tiny'} (a running server serves it once restarted)"
    assert sorted(snapshot(tmp_path)) == ["tiny", "tiny/1", "tiny/1/model.onnx", "tiny/1/model.py", "tiny/1/model.ts",
                                          "tiny/config.pbtxt", "tiny/configs", "tiny/configs/gpu.pbtxt",
                                          "tiny/configs/onnxruntime.pbtxt"]  # no stale file, no staging directory left
    assert load_network_spec(tmp_path, "tiny").num_classes == 3


@pytest.mark.parametrize("failure, message", [("checkpoint", "export: error: checkpoint "),
                                              ("parity", "export: error: onnxruntime differs from torch by ")],
                         ids=["bad-checkpoint", "parity-fails"])
def test_failed_overwrite_leaves_the_old_network_intact(tmp_path, capsys, second_network_checkpoint, failure, message):
    repository = tmp_path / "model_repository"
    torch.manual_seed(0)  # the untrained weights: the parity failure below is reproducible
    assert export_tiny(repository, "tiny") == 0
    before = snapshot(repository)
    capsys.readouterr()
    extra = ["--checkpoint", str(second_network_checkpoint)] if failure == "checkpoint" else ["--tolerance", "1e-30"]
    assert export_tiny(repository, "tiny", "--overwrite", *extra) == 1
    error = capsys.readouterr().err
    assert error.startswith(message) and error.count("\n") == 1
    assert snapshot(repository) == before


def test_export_checks_set_default_before_exporting(tmp_path, capsys):
    assert export_tiny(tmp_path, "tiny", "--set-default") == 1
    assert capsys.readouterr().err == (f"export: error: --set-default: {tmp_path / 'segment_2d'} has no config.pbtxt "
                                       "(no segment_2d pipeline to set)\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [".", "..", ".hidden"])
def test_export_refuses_names_outside_the_repository_or_hidden(name):
    with pytest.raises(ExportError, match="plain directory name"):
        ExportSettings("UNet", TINY_ARGUMENTS, None, (32, 32), name)


@pytest.mark.parametrize("name", ["my net", "a:b", "net\n", "-x"])
def test_export_refuses_names_triton_cannot_serve(name):
    """The export of "my net" succeeded; the server then never became ready, nor said why."""
    with pytest.raises(ExportError, match="model name may hold letters, digits, '_', '-' and '.' only"):
        ExportSettings("UNet", TINY_ARGUMENTS, None, (32, 32), name)


def test_a_network_of_more_classes_than_a_uint8_mask_holds_is_refused(tmp_path, capsys):
    """300 classes exported and loaded; every request then failed with "value cannot be
    converted to type uint8_t without overflow"."""
    assert export_tiny(tmp_path, "many", out_channels=300) == 1
    error = capsys.readouterr().err
    assert error == ("export: error: the network has 300 output channels; MASK holds a class per pixel as uint8, 255 "
                     "marking a failed frame: at most 255 classes\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, reason", [("{", "Expecting property name"), ("[1, 2]", "expected a JSON object, got list")])
def test_a_bad_spec_file_is_named_in_one_line(tmp_path, capsys, text, reason):
    (tmp_path / "bad.json").write_text(text)
    assert export_main(["--spec", str(tmp_path / "bad.json"), "--name", "x", "--repository", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"export: error: --spec {tmp_path / 'bad.json'}: ") and reason in err and err.count("\n") == 1


def test_an_exported_network_gets_the_modes_mkdir_gives(tmp_path):
    """Staged in a directory of its own, yet readable as any directory made here: the image's
    server runs as another user than the export (a 0700 staging directory locked it out)."""
    (tmp_path / "plain").mkdir()
    assert export_tiny(tmp_path, "tiny") == 0
    assert export_tiny(tmp_path, "tiny", "--overwrite") == 0
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    assert (tmp_path / "tiny").stat().st_mode & 0o777 == expected
    assert (tmp_path / "tiny" / "1").stat().st_mode & 0o777 == expected


def test_leftovers_of_a_killed_export_are_replaced_or_removed(tmp_path, capsys):
    """SIGKILL leaves a staging directory (Triton would fail on it), and an older exporter,
    which wrote in place, a model directory without its config: the next export of that name
    removes the first, and replaces the second with --overwrite (it names it without)."""
    (tmp_path / ".tiny.export-1a2b" / "1").mkdir(parents=True)
    (tmp_path / "tiny" / "1").mkdir(parents=True)
    (tmp_path / "tiny" / "1" / "model.onnx").write_bytes(b"half an export")
    assert export_tiny(tmp_path, "tiny") == 1
    assert "holds the unfinished export of a network exported by python -m export; add --overwrite" in capsys.readouterr().err
    assert export_tiny(tmp_path, "tiny", "--overwrite") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    assert load_network_spec(tmp_path, "tiny").num_classes == 2



def tiny_network(out_channels: int = 2, seed: int = 5) -> torch.nn.Module:
    torch.manual_seed(seed)
    return nets.UNet(**{**TINY_ARGUMENTS, "out_channels": out_channels}).eval()


def exported_logits(model_dir: pathlib.Path, tiles: np.ndarray) -> np.ndarray:
    """``[B, 1, 32, 32]`` float32 tiles -> the exported ONNX graph's ``[B, K, 32, 32]`` output."""
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: tiles})[0]


def save_as(layout: str, network: torch.nn.Module, path: pathlib.Path) -> None:
    """The network's weights as training code writes them: ``layout`` names the code."""
    weights = network.state_dict()
    prefixed = lambda prefix: {prefix + key: value for key, value in weights.items()}  # noqa: E731
    saved = {"state dict": weights,
             "lightning": {"state_dict": prefixed("model."), "epoch": 7, "global_step": 700, "hyper_parameters": {"lr": 1e-3}},
             "dataparallel": prefixed("module."),
             "torch.compile": prefixed("_orig_mod."),
             "tutorial": {"epoch": 7, "model_state_dict": weights, "optimizer_state_dict": {"state": {}, "param_groups": []}},
             "monai CheckpointSaver": {"net": weights, "opt": {"state": {}, "param_groups": []}}}.get(layout)
    if layout == "torchscript (monai bundle)":
        torch.jit.script(network).save(str(path))
    else:
        torch.save(saved, path)


@pytest.mark.parametrize("layout", ["state dict", "lightning", "dataparallel", "torch.compile", "tutorial",
                                    "monai CheckpointSaver", "torchscript (monai bundle)"])
def test_checkpoints_as_training_code_writes_them_export_their_weights(tmp_path, capsys, layout):
    trained = tiny_network()
    save_as(layout, trained, tmp_path / "weights.pt")
    assert export_tiny(tmp_path / "repository", "tiny", "--checkpoint", str(tmp_path / "weights.pt")) == 0, capsys.readouterr().err
    tiles = np.random.default_rng(1).random((3, 1, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = trained(torch.from_numpy(tiles)).numpy()
    assert np.abs(exported_logits(tmp_path / "repository" / "tiny", tiles) - expected).max() <= 1e-4


def save_unfit(case: str, path: pathlib.Path) -> None:
    if case == "whole model":
        torch.save(tiny_network(), path)
    elif case == "not torch":
        path.write_text("epoch,loss\n1,0.5\n")
    elif case == "truncated":
        torch.save(tiny_network().state_dict(), path)
        path.write_bytes(path.read_bytes()[:2000])
    elif case == "no weights":
        torch.save({"epoch": 7, "best_metric": 0.9}, path)
    elif case == "other arguments":
        torch.save({"state_dict": {"model." + k: v for k, v in tiny_network(out_channels=3).state_dict().items()}}, path)
    elif case == "other architecture":
        torch.save(nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2).state_dict(), path)
    elif case == "two networks":
        weights = tiny_network().state_dict()
        torch.save({"state_dict": {f"{copy}.{k}": v for copy in ("model", "ema") for k, v in weights.items()}}, path)


UNFIT_CHECKPOINTS = {
    "whole model": "holds pickled objects besides weights (a whole model saved with torch.save(model), numpy values?); "
                   "save the weights alone: torch.save(model.state_dict(), path)",
    "not torch": "is not a file torch.save or torch.jit.save wrote",
    "truncated": "is damaged: a zip file without its end (truncated?)",
    "no weights": "holds no weights (found 'epoch', 'best_metric'); save them with torch.save(model.state_dict(), path)",
    "other arguments": "['state_dict'] does not fit UNet: 2 of its weights differ in shape, e.g. "
                   "model.2.conv.weight is [12, 3, 3, 3] there and [12, 2, 3, 3] in the network; check --arguments",
    "other architecture": "does not fit UNet: 8 of the network's 8 weights are not in it (e.g. model.0.adn.A.weight) "
                   "and 82 of its 82 weights are not in the network (e.g. conv_0.conv_0.adn.N.bias); check --architecture",
    "two networks": "holds weights fitting UNet in 2 places (['state_dict'] prefix 'ema.', ['state_dict'] prefix 'model.'); "
                   "save the one to serve alone",
}


@pytest.mark.parametrize("case", UNFIT_CHECKPOINTS)
def test_a_checkpoint_that_does_not_fit_is_explained_in_one_line(tmp_path, capsys, case):
    save_unfit(case, tmp_path / "weights.pt")
    assert export_tiny(tmp_path / "repository", "tiny", "--checkpoint", str(tmp_path / "weights.pt")) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"export: error: checkpoint {tmp_path / 'weights.pt'}") and captured.err.count("\n") == 1
    assert UNFIT_CHECKPOINTS[case] in captured.err, captured.err
    assert not (tmp_path / "repository" / "tiny").exists()


def test_a_one_channel_network_exports_as_background_and_foreground_logits(tmp_path, capsys):
    """A sigmoid-trained binary network: the graph gives ``[0, logit]``, whose softmax is
    ``[1 - sigmoid, sigmoid]`` and whose argmax is sigmoid > 0.5 (served as two classes)."""
    trained = tiny_network(out_channels=1)
    torch.save(trained.state_dict(), tmp_path / "binary.pt")
    assert export_tiny(tmp_path, "binary", "--checkpoint", str(tmp_path / "binary.pt"), out_channels=1) == 0
    assert "one output channel: served as classes [background, foreground]" in capsys.readouterr().out
    tiles = np.random.default_rng(2).random((3, 1, 32, 32), dtype=np.float32)
    with torch.no_grad():
        logit = trained(torch.from_numpy(tiles)).numpy()
    exported = exported_logits(tmp_path / "binary", tiles)
    assert exported.shape == (3, 2, 32, 32)
    assert np.all(exported[:, :1] == 0) and np.abs(exported[:, 1:] - logit).max() <= 1e-4
    assert load_network_spec(tmp_path, "binary").num_classes == 2


def test_set_default_changes_only_the_default_network_value(tmp_path, capsys):
    """The pipeline configs keep their comments and layout (they were rewritten whole, ~200
    lines of diff for one value); the onnxruntime variant stays a link to the gpu one."""
    repository = tmp_path / "model_repository"
    shutil.copytree(SHIPPED_REPOSITORY / "segment_2d", repository / "segment_2d", symlinks=True)
    before = {name: (repository / "segment_2d" / name).read_text().splitlines() for name in ("config.pbtxt", "configs/gpu.pbtxt")}
    assert export_tiny(repository, "tiny", "--set-default") == 0, capsys.readouterr().err
    for name, lines in before.items():
        after = (repository / "segment_2d" / name).read_text().splitlines()
        changed = [(old, new) for old, new in zip(lines, after, strict=True) if old != new]
        assert len(changed) == 1 and 'string_value: "tiny"' in changed[0][1] and "default_network" in changed[0][1]
        assert read_model_config(repository / "segment_2d" / name).parameters["default_network"].string_value == "tiny"
    assert (repository / "segment_2d" / "configs" / "onnxruntime.pbtxt").is_symlink()


@pytest.mark.parametrize("arguments, tile, message", [
    ({**TINY_ARGUMENTS, "channels": [4, 8, 16, 32], "strides": [2, 2, 2]}, ["100", "100"],
     "the network cannot take a tile of [100, 100] ("),
    ({**TINY_ARGUMENTS, "channels": [4, 8, 16], "strides": [2, 2]}, ["99", "99"],
     "network changes the spatial size of a tile: [99, 99] -> [100, 100]; "),
    (TINY_ARGUMENTS, ["2", "2"], "the network cannot take a tile of [2, 2] (Expected more than 1 spatial element"),
], ids=["cannot-take", "changes-size", "too-small-to-normalise"])
def test_a_tile_the_network_cannot_take_is_refused_saying_what_tiles_work(tmp_path, capsys, arguments, tile, message):
    code = export_main(["--architecture", "UNet", "--arguments", json.dumps(arguments), "--tile", *tile,
                        "--name", "x", "--repository", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 1 and error.count("\n") == 1 and message in error, error
    assert error.rstrip().endswith("choose a tile the network's downsampling divides (2 per step: e.g. a multiple of 16 or 32)")


@pytest.mark.parametrize("backbone", ["efficientnet-b0", "resnet18"])
def test_flexible_unet_exports_with_backbones_that_take_any_batch(tmp_path, capsys, backbone):
    """efficientnet's graph declares no output size (it was refused as changing the tile to
    [0, 0]); resnet's fixes the traced batch inside, which the check batch of 3 shows."""
    arguments = {"in_channels": 1, "out_channels": 3, "backbone": backbone}  # spatial_dims: FlexibleUNet's default, 2
    code = export_main(["--architecture", "FlexibleUNet", "--arguments", json.dumps(arguments), "--tile", "64", "64",
                        "--name", "flex", "--repository", str(tmp_path)])
    error = capsys.readouterr().err
    if backbone == "resnet18":
        assert code == 1 and error.startswith("export: error: the exported graph fails on a batch of 3 tiles (it was traced "
                                              "with 2: the network fixes a batch size inside") and error.count("\n") == 1
    else:
        assert code == 0, error
        assert load_network_spec(tmp_path, "flex").num_classes == 3


def test_pretrained_weights_that_cannot_be_downloaded_are_refused_in_one_line(tmp_path):
    """MONAI downloads ImageNet weights in the constructor; with no way out (this machine has
    none; a proxy on a closed port makes that certain), the message says what to do."""
    arguments = {"spatial_dims": 2, "in_channels": 1, "out_channels": 3, "backbone": "efficientnet-b0", "pretrained": True}
    closed = "http://127.0.0.1:9"
    environment = {**os.environ, "HTTPS_PROXY": closed, "HTTP_PROXY": closed, "https_proxy": closed, "http_proxy": closed,
                   "TORCH_HOME": str(tmp_path / "torch")}
    done = subprocess.run([sys.executable, "-m", "export", "--architecture", "FlexibleUNet", "--arguments", json.dumps(arguments),
                           "--tile", "64", "64", "--name", "flex", "--repository", str(tmp_path / "r")],
                          capture_output=True, text=True, env=environment, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("export: error:")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr
    assert errors[0].startswith("export: error: FlexibleUNet could not download its pretrained weights (")
    assert errors[0].endswith('set "pretrained": false in --arguments and give the trained weights with --checkpoint')


def test_exports_while_the_server_runs_take_effect_when_it_restarts(tmp_path):
    """A network overwritten while the server runs keeps serving as loaded (each instance read
    the new tile on its first request, while Triton ran the old network: requests failed); one
    exported after the start is refused saying to restart, by the client and by the server."""
    from segserve.launcher import ServerConfig, TritonServer
    from tests.conftest import copy_2d_repository

    repository = copy_2d_repository(tmp_path / "model_repository", sliding_window_instances=2)
    loaded = tiny_network(seed=8)
    torch.save(loaded.state_dict(), tmp_path / "loaded.pt")
    assert export_tiny(repository, "tiny", "--checkpoint", str(tmp_path / "loaded.pt")) == 0
    config = ServerConfig(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0)
    frame = np.random.default_rng(4).random((1, 90, 70), dtype=np.float32)
    with TritonServer(config, log_path=tmp_path / "server.log") as server:
        arguments = json.dumps({**TINY_ARGUMENTS, "channels": [4, 8, 16], "strides": [2, 2]})
        assert export_main(["--architecture", "UNet", "--arguments", arguments, "--tile", "48", "48", "--name", "tiny",
                            "--repository", str(repository), "--overwrite"]) == 0
        assert export_tiny(repository, "late") == 0
        with SegmentationClient(server.grpc_url, network="tiny", token=server.config.token) as client:
            results = [client.segment(frame, probabilities=True) for _ in range(4)]  # both instances, all batches
        expected = reference_probabilities(frame, loaded, (32, 32)).numpy()
        assert all(np.abs(result.probabilities - expected).max() <= 1e-4 for result in results)
        with SegmentationClient(server.grpc_url, network="late", token=server.config.token) as client:
            with pytest.raises(SegmentationError) as by_server:
                client.segment(frame)
            with pytest.raises(SegmentationError) as by_client:
                client.network_info()
    assert "(network 'late' was exported after the server started: restart the server to load it)" in str(by_server.value)
    assert str(by_client.value).startswith(f"network 'late' is not loaded on {server.grpc_url} (")
    assert str(by_client.value).endswith("loaded 2D networks: tiny, unet2d_particles. "
                                         "A network exported since the server started is loaded when it restarts; "
                                         "one that failed to load is named in the server's warnings")


@pytest.mark.server  # starts its own server, three times
def test_a_network_overwritten_while_the_server_runs_is_served_as_loaded_after_a_reload_or_restart(tmp_path):
    """The supervisor reloads a model whose stub died, or restarts the server: both used to
    load the repository as it was on disk by then, so a network re-exported since the start
    was served from then on without a word (91.9 % of a mask's pixels changed). The server
    runs on a copy taken at its start; a new server takes the new network."""
    import psutil

    from segserve.launcher import ServerConfig, TritonServer
    from tests.conftest import copy_2d_repository

    repository = copy_2d_repository(tmp_path / "model_repository", sliding_window_instances=1)
    loaded, exported_later = tiny_network(seed=8), tiny_network(seed=9)
    for name, network in (("loaded", loaded), ("later", exported_later)):
        torch.save(network.state_dict(), tmp_path / f"{name}.pt")
    assert export_tiny(repository, "tiny", "--checkpoint", str(tmp_path / "loaded.pt")) == 0
    frame = np.random.default_rng(4).random((1, 90, 70), dtype=np.float32)

    def served_by(server: TritonServer) -> torch.nn.Module:
        with SegmentationClient(server.grpc_url, network="tiny", token=server.config.token) as client:
            probabilities = client.segment(frame, probabilities=True).probabilities
        errors = {name: np.abs(probabilities - reference_probabilities(frame, network, (32, 32)).numpy()).max()
                  for name, network in (("loaded", loaded), ("later", exported_later))}
        assert min(errors.values()) <= 1e-4 < max(errors.values()), errors
        return loaded if errors["loaded"] <= 1e-4 else exported_later

    config = ServerConfig(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0)
    with TritonServer(config, log_path=tmp_path / "server.log") as server:
        assert served_by(server) is loaded
        assert export_tiny(repository, "tiny", "--checkpoint", str(tmp_path / "later.pt"), "--overwrite") == 0
        [stub] = [pid for pid, path in server.stub_processes().items() if "/tiny/" in path]
        psutil.Process(stub).kill()
        deadline = time.monotonic() + 60  # until Triton has reaped it
        while server.broken_models() != ["tiny"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.broken_models() == ["tiny"]
        server.reload_models(["tiny"])
        assert served_by(server) is loaded
        server.restart()
        assert served_by(server) is loaded
    config = ServerConfig(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0)
    with TritonServer(config, log_path=tmp_path / "server.log") as server:
        assert served_by(server) is exported_later


REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# A 2D UNet whose check (torch and onnxruntime on 3 tiles of 1536²) takes seconds: room to
# press Ctrl-C after "onnx.checker: ok" and before the export writes anything.
SLOW_ARGUMENTS = {**TINY_ARGUMENTS, "channels": [8, 16, 32], "strides": [2, 2]}


def export_command(repository: pathlib.Path, name: str, *extra: str, arguments: dict = TINY_ARGUMENTS,
                   tile: tuple[int, ...] = (32, 32)) -> list[str]:
    """``python -m export`` of a UNet, as a command line."""
    return [sys.executable, "-m", "export", "--architecture", "UNet", "--arguments", json.dumps(arguments),
            "--tile", *map(str, tile), "--name", name, "--repository", str(repository), *extra]


def wait_for_output(process: subprocess.Popen, path: pathlib.Path, text: str, timeout: float = 600) -> None:
    """Until ``text`` is in the file ``path`` (the process's output), the process ends, or ``timeout``."""
    deadline = time.monotonic() + timeout
    while text not in path.read_text() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert text in path.read_text() and process.poll() is None, f"no {text!r} from the running export: {path.read_text()}"


def test_ctrl_c_during_an_export_says_so_in_one_line_and_leaves_the_repository_as_it_was(tmp_path):
    """SIGINT while the export checks its network (replacing one, --set-default): exit code 130,
    one line (a traceback before), the repository byte for byte as before and no scratch
    directory left."""
    repository = tmp_path / "model_repository"
    shutil.copytree(SHIPPED_REPOSITORY / "segment_2d", repository / "segment_2d", symlinks=True)
    assert export_tiny(repository, "tiny") == 0
    before = snapshot(repository)
    (tmp_path / "tmp").mkdir()
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path / "tmp")}
    command = export_command(repository, "tiny", "--overwrite", "--set-default", "--tolerance", "1",
                             arguments=SLOW_ARGUMENTS, tile=(1536, 1536))
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=environment, cwd=REPO_ROOT)
    try:
        wait_for_output(process, tmp_path / "out.txt", "onnx.checker: ok")
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=600)
    finally:
        process.kill()
        process.wait()
    errors = (tmp_path / "err.txt").read_text()
    assert code == 130, errors
    assert "Traceback" not in errors and errors.splitlines()[-1:] == ["export: interrupted; nothing was written to the repository"], errors
    assert snapshot(repository) == before
    assert [path for path in (tmp_path / "tmp").iterdir() if path.is_dir()] == []  # the export's scratch (not a library's .ses file)


def test_a_ctrl_c_while_the_repository_changes_is_raised_once_the_change_is_done():
    """The moves into the repository (the model directory, the configs) hold Ctrl-C off: a SIGINT
    that comes during one is raised after it, not half-way."""
    from export.network_export import interrupts_held

    steps = []
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_held():
                os.kill(os.getpid(), signal.SIGINT)
                steps.append("moved")
            steps.append("went on")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert steps == ["moved"]


def limit_file_size(size: int):
    """``preexec_fn``: writes past ``size`` bytes fail (EFBIG; Python ignores SIGXFSZ), for root too."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_set_default_that_fails_on_one_config_changes_none(tmp_path):
    """--set-default writing configs/gpu.pbtxt fails (larger than the process may write; the
    export's own files are not): config.pbtxt, written before it in place, stayed changed, and
    gpu.pbtxt was cut short. Every config is now as before; one line names the file."""
    repository = tmp_path / "model_repository"
    shutil.copytree(SHIPPED_REPOSITORY / "segment_2d", repository / "segment_2d", symlinks=True)
    gpu = repository / "segment_2d" / "configs" / "gpu.pbtxt"
    gpu.write_text(gpu.read_text() + "".join(f"# a long comment, line {line}\n" for line in range(100_000)))
    assert gpu.stat().st_size > 2 << 20
    before = snapshot(repository / "segment_2d")
    done = subprocess.run(export_command(repository, "tiny", "--set-default"), capture_output=True, text=True, cwd=REPO_ROOT,
                          preexec_fn=limit_file_size(1 << 20), timeout=600)
    after = snapshot(repository / "segment_2d")
    assert [name for name in before if after.get(name) != before[name]] == [], done.stderr
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1:] == [f"export: error: --set-default: cannot write {gpu}: File too large"], done.stderr
    assert load_network_spec(repository, "tiny").num_classes == 2  # the export itself went through


def test_set_default_names_a_config_that_does_not_parse_and_changes_none(tmp_path, capsys):
    repository = tmp_path / "model_repository"
    shutil.copytree(SHIPPED_REPOSITORY / "segment_2d", repository / "segment_2d", symlinks=True)
    gpu = repository / "segment_2d" / "configs" / "gpu.pbtxt"
    gpu.write_text(gpu.read_text() + "instance_group [ { count: \n")
    before = snapshot(repository / "segment_2d")
    assert export_tiny(repository, "tiny", "--set-default") == 1
    error = capsys.readouterr().err
    assert error.startswith(f"export: error: --set-default: {gpu} does not parse: ") and error.count("\n") == 1, error
    assert snapshot(repository / "segment_2d") == before


def without_root_privilege() -> list[str]:
    """Command prefix under which permissions bind root too (no CAP_DAC_OVERRIDE): tests run as root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root, and no setpriv to drop the privilege of writing anywhere")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


@pytest.mark.parametrize("when", ["before", "during"])
def test_a_read_only_repository_is_named_in_one_line(tmp_path, when):
    """Read-only from the start: refused before the export. Made read-only while the export
    checks its network: the error named the hidden staging directory it could not make
    ([Errno 13] Permission denied: '.../.tiny.export-1a2b3c4d'); now the repository given."""
    repository = tmp_path / "model_repository"
    (repository / "other").mkdir(parents=True)
    before = snapshot(repository)
    if when == "before":
        repository.chmod(0o555)
    command = [*without_root_privilege(), *export_command(repository, "tiny", "--tolerance", "1",
                                                           arguments=SLOW_ARGUMENTS, tile=(1536, 1536))]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
            process = subprocess.Popen(command, stdout=out, stderr=err, env=environment, cwd=REPO_ROOT)
        try:
            if when == "during":
                wait_for_output(process, tmp_path / "out.txt", "onnx.checker: ok")
                repository.chmod(0o555)
            code = process.wait(timeout=600)
        finally:
            process.kill()
            process.wait()
    finally:
        repository.chmod(0o755)
    errors = (tmp_path / "err.txt").read_text()
    assert code == 1, errors
    assert errors.splitlines()[-1:] == [f"export: error: cannot write to the repository {repository}: Permission denied"], errors
    assert "Traceback" not in errors
    if when == "before":
        assert (tmp_path / "out.txt").read_text() == ""  # refused before the export started
    assert snapshot(repository) == before


@pytest.mark.parametrize("where", ["below a file", "a file"])
def test_a_repository_that_cannot_be_a_directory_is_refused_in_one_line_before_the_export(tmp_path, capsys, where):
    """A raw errno message after the whole export before (naming a hidden staging directory
    where the repository could be made but not written)."""
    (tmp_path / "file").write_text("not a directory")
    repository = tmp_path / "file" / "model_repository" if where == "below a file" else tmp_path / "file"
    assert export_tiny(repository, "tiny") == 1
    captured = capsys.readouterr()
    assert captured.err == f"export: error: cannot write to the repository {repository}: Not a directory\n"
    assert captured.out == ""  # refused before the export started
    assert (tmp_path / "file").read_text() == "not a directory"
