"""Build a MONAI network from its name and arguments, export it to ONNX, check it, and write
it into a Triton model repository with a generated ``config.pbtxt``."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import inspect
import itertools
import json
import os
import pathlib
import pickle
import re
import secrets
import shutil
import signal
import stat
import tempfile
import threading
import warnings
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import torch
from google.protobuf import text_format
from monai.networks import nets
from tritonclient.grpc import model_config_pb2

from segserve.network_spec import read_model_config

SUPPORTED_ARCHITECTURES = ("UNet", "BasicUNet", "SegResNet", "AttentionUnet", "FlexibleUNet", "DynUNet")
INPUT_NAME, OUTPUT_NAME = "INPUT__0", "OUTPUT__0"
# What marks a model directory as a network this exporter wrote (every version of MODEL_PY has
# it); pipeline steps (segment_2d, segment_3d) are python-backend models too, with other runners.
EXPORTED_RUNNER = "segserve.backend.onnx_runner"
MODEL_PY = f'''"""Network model {{name}}: onnxruntime or TorchScript runner (logic in {EXPORTED_RUNNER})."""

from {EXPORTED_RUNNER} import TritonPythonModel  # noqa: F401
'''


class ExportError(RuntimeError):
    """The network cannot be exported or fails a check."""


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """What to export and how to serve it.

    Attributes:
        architecture: class name in ``monai.networks.nets`` (see SUPPORTED_ARCHITECTURES).
        arguments: keyword arguments of that class.
        checkpoint: file of the trained weights (:func:`read_checkpoint`, :func:`network_weights`), or None for untrained.
        tile: spatial size of one tile, e.g. ``(128, 128)``.
        name: model name in the repository.
        max_batch_size: largest tile batch the network model accepts (CPU configuration).
        gpu_max_batch_size: the same in the ``gpu`` and ``onnxruntime`` variants; None: 256
            for 2D tiles (room for segment_2d's 128-tile calls there, and for the
            dynamic batcher to merge two), ``max_batch_size`` for 3D tiles (GPU memory).
        tolerance: largest allowed |onnxruntime - torch| on the check batch.
        instances_per_gpu: network instances on each GPU in the ``gpu`` and ``onnxruntime``
            configuration variants.
        tensorrt: the ``onnxruntime`` variant runs the network through onnxruntime's TensorRT
            execution accelerator (FP16), else through its CUDA provider.
    """

    architecture: str
    arguments: dict
    checkpoint: pathlib.Path | None
    tile: tuple[int, ...]
    name: str
    max_batch_size: int = 32
    gpu_max_batch_size: int | None = None
    tolerance: float = 1e-4
    instances_per_gpu: int = 2
    tensorrt: bool = False

    @property
    def gpu_batch_limit(self) -> int:
        if self.gpu_max_batch_size is not None:
            return self.gpu_max_batch_size
        return 256 if len(self.tile) == 2 else self.max_batch_size

    @property
    def gpu_warmup_batches(self) -> tuple[int, ...]:
        """The GPU sliding window's default tiles per call (segment_2d: 128,
        segment_3d: 8; their configs/gpu.pbtxt) and the largest merged batch."""
        return (128 if len(self.tile) == 2 else 8, self.gpu_batch_limit)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ExportError(f"architecture {self.architecture!r} not supported; choose one of {', '.join(SUPPORTED_ARCHITECTURES)}")
        if not isinstance(self.arguments, dict):
            raise ExportError(f"--arguments must be a JSON object of the network's arguments, got {type(self.arguments).__name__}")
        spatial_dims = network_spatial_dims(self.architecture, self.arguments)
        if spatial_dims not in (2, 3):
            raise ExportError(f"spatial_dims must be 2 (segment_2d) or 3 (segment_3d), got {spatial_dims!r}")
        if len(self.tile) != spatial_dims:
            raise ExportError(f"tile {list(self.tile)} has {len(self.tile)} dims but the network has spatial_dims={spatial_dims}")
        if any(size < 1 for size in self.tile):
            raise ExportError(f"tile sizes must be positive, got {list(self.tile)}")
        if self.max_batch_size < 1:
            raise ExportError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.gpu_max_batch_size is not None and self.gpu_max_batch_size < 1:
            raise ExportError(f"gpu_max_batch_size must be >= 1, got {self.gpu_max_batch_size}")
        if self.instances_per_gpu < 1:
            raise ExportError(f"instances_per_gpu must be >= 1, got {self.instances_per_gpu}")
        if not self.name or "/" in self.name or self.name.startswith("."):  # "..", ".": outside; ".x": staging names
            raise ExportError(f"model name must be a plain directory name (no '/', not starting with '.'), got {self.name!r}")
        if not MODEL_NAME.fullmatch(self.name):  # Triton 2.51 never loads "my net", nor says so: the start hung
            raise ExportError(f"model name may hold letters, digits, '_', '-' and '.' only, and begin with a letter, "
                              f"digit or '_', got {self.name!r}")


MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def network_spatial_dims(architecture: str, arguments: dict) -> int:
    """``spatial_dims`` as the network will be built: given, else the constructor's default
    (FlexibleUNet's is 2, BasicUNet's 3).

    Raises:
        ExportError: the architecture needs it and ``arguments`` lack it.
    """
    if "spatial_dims" in arguments:
        return arguments["spatial_dims"]
    default = inspect.signature(getattr(nets, architecture)).parameters.get("spatial_dims")
    if default is None or default.default is inspect.Parameter.empty:
        raise ExportError(f"{architecture} needs spatial_dims in --arguments (2 or 3)")
    return default.default


def settings_from_spec(spec_path: pathlib.Path, checkpoint: pathlib.Path | None, name: str) -> ExportSettings:
    """Settings from a training spec JSON (``architecture``, ``arguments``, ``tile``)."""
    spec = json.loads(pathlib.Path(spec_path).read_text())
    return ExportSettings(spec["architecture"], spec["arguments"], checkpoint, tuple(spec["tile"]), name)


def build_network(settings: ExportSettings) -> torch.nn.Module:
    """Instantiate the MONAI network and load its checkpoint, in eval mode."""
    try:
        network = getattr(nets, settings.architecture)(**settings.arguments)
    except TypeError as error:
        raise ExportError(f"bad arguments for {settings.architecture}: {error}") from None
    except OSError as error:  # urllib's URLError: pretrained weights, downloaded by the constructor
        raise ExportError(f"{settings.architecture} could not download its pretrained weights ({first_line(error)}); "
                          "set \"pretrained\": false in --arguments and give the trained weights with --checkpoint") from None
    if settings.checkpoint is not None:
        loaded = read_checkpoint(pathlib.Path(settings.checkpoint))
        network.load_state_dict(network_weights(loaded, network, f"checkpoint {settings.checkpoint}", settings.architecture))
    return network.eval()


def read_checkpoint(path: pathlib.Path) -> object:
    """What ``torch.save`` wrote, loaded with ``weights_only`` (no pickled code runs), on the CPU;
    a TorchScript file (a MONAI bundle's ``model.ts``) gives its module's state dict."""
    if is_torchscript_archive(path):
        try:
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError as error:
            raise ExportError(f"checkpoint {path}: not a readable TorchScript file: {first_line(error)}") from None
    if not zipfile.is_zipfile(path):  # torch.save's format since 1.6 is a zip file
        with open(path, "rb") as file:
            if file.read(4) == b"PK\x03\x04":
                raise ExportError(f"checkpoint {path} is damaged: a zip file without its end (truncated?)")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # the legacy format's reader fails on other files in many ways
            raise ExportError(f"checkpoint {path} is not a file torch.save or torch.jit.save wrote") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ExportError(f"checkpoint {path} holds pickled objects besides weights (a whole model saved with "
                          f"torch.save(model), numpy values?); save the weights alone: torch.save(model.state_dict(), path)") from None
    except Exception as error:
        raise ExportError(f"checkpoint {path} cannot be read: {first_line(error)}") from None


def is_torchscript_archive(path: pathlib.Path) -> bool:
    """TorchScript archives are zip files like torch.save's, with the module's code in them."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def network_weights(loaded: object, network: torch.nn.Module, source: str, architecture: str) -> dict[str, torch.Tensor]:
    """The network's state dict out of a loaded checkpoint.

    Taken as training code writes it: a state dict, or one held under a key (Lightning's
    ``state_dict``, the PyTorch tutorials' ``model_state_dict``, MONAI CheckpointSaver's ``net``),
    with the prefix a wrapper puts before every key (``module.`` of DataParallel, ``model.`` of a
    Lightning module's attribute, ``_orig_mod.`` of torch.compile) removed. The weights must be
    exactly the network's, by name and shape; anything else is an ExportError saying what differs.
    """
    expected = network.state_dict()
    found = tensor_dicts(loaded)
    candidates = [(where, prefix) for where, tensors in found.items() for prefix in name_prefixes(tensors, expected)]
    exact = [(where, prefix) for where, prefix in candidates if names_under(found[where], prefix) == expected.keys()]
    if not exact:
        raise ExportError(describe_mismatch(loaded, found, expected, candidates, source, architecture))
    if len(exact) > 1:
        places = ", ".join(f"{where or 'top level'}{f' prefix {prefix!r}' if prefix else ''}" for where, prefix in exact)
        raise ExportError(f"{source} holds weights fitting {architecture} in {len(exact)} places ({places}); "
                          f"save the one to serve alone: torch.save(model.state_dict(), path)")
    where, prefix = exact[0]
    weights = {key[len(prefix):]: value for key, value in found[where].items() if key.startswith(prefix)}
    misshapen = [(key, list(value.shape), list(expected[key].shape)) for key, value in weights.items()
                 if value.shape != expected[key].shape]
    if misshapen:
        key, theirs, ours = misshapen[0]
        raise ExportError(f"{located(source, where)} does not fit {architecture}: {len(misshapen)} of its weights differ "
                          f"in shape, e.g. {key} is {theirs} there and {ours} in the network; check --arguments")
    return weights


def tensor_dicts(loaded: object) -> dict[str, dict[str, torch.Tensor]]:
    """``{where: {name: tensor}}``: the tensors of the checkpoint itself (``where`` ``""``) and
    of each mapping among its values (``where`` e.g. ``"['state_dict']"``), those holding any."""
    def tensors_of(mapping: dict) -> dict[str, torch.Tensor]:
        return {key: value for key, value in mapping.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}

    if not isinstance(loaded, dict):
        return {}
    found = {"": tensors_of(loaded)}
    found.update({f"[{key!r}]": tensors_of(value) for key, value in loaded.items() if isinstance(value, dict)})
    return {where: tensors for where, tensors in found.items() if tensors}


def name_prefixes(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """Prefixes (empty, or ending in ``.``), in order, under which at least one of the network's names is a key."""
    prefixes = {key[:len(key) - len(name)] for key in tensors for name in expected if key.endswith(name)}
    return sorted(prefix for prefix in prefixes if prefix == "" or prefix.endswith("."))


def names_under(tensors: dict[str, torch.Tensor], prefix: str) -> set[str]:
    return {key[len(prefix):] for key in tensors if key.startswith(prefix)}


def describe_mismatch(loaded: object, found: dict[str, dict[str, torch.Tensor]], expected: dict[str, torch.Tensor],
                      candidates: list[tuple[str, str]], source: str, architecture: str) -> str:
    """One line on why no mapping of the checkpoint holds the network's weights, against the
    closest one (most of the network's names)."""
    if not found:
        contents = ", ".join(map(repr, list(loaded)[:6])) if isinstance(loaded, dict) else f"a {type(loaded).__name__}"
        return (f"{source} holds no weights (found {contents or 'an empty dict'}); "
                "save them with torch.save(model.state_dict(), path)")
    largest = max(found, key=lambda where: len(found[where]))
    where, prefix = max(candidates, key=lambda pair: len(names_under(found[pair[0]], pair[1]) & expected.keys()),
                        default=(largest, ""))
    names = names_under(found[where], prefix)
    missing, extra = sorted(expected.keys() - names), sorted(names - expected.keys())
    parts = [f"{len(missing)} of the network's {len(expected)} weights are not in it (e.g. {missing[0]})"] if missing else []
    parts += [f"{len(extra)} of its {len(names)} weights are not in the network (e.g. {prefix}{extra[0]})"] if extra else []
    return f"{located(source, where)} does not fit {architecture}: {' and '.join(parts)}; check --architecture and --arguments"


def located(source: str, where: str) -> str:
    """``checkpoint X ['state_dict']``: where in the checkpoint (``where`` from :func:`tensor_dicts`)."""
    return f"{source} {where}" if where else source


class OneChannelAsTwoClasses(torch.nn.Module):
    """A network with one output channel (a sigmoid-trained binary network) as two-class logits
    ``[0, logit]``: the server's softmax of them is ``[1 - sigmoid(logit), sigmoid(logit)]`` and
    its argmax is ``logit > 0``, i.e. sigmoid > 0.5 (``[B, 1, *tile]`` -> ``[B, 2, *tile]`` float32)."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        logits = self.network(tiles)
        return torch.cat([torch.zeros_like(logits), logits], dim=1)


def output_classes(network: torch.nn.Module, in_channels: int, tile: tuple[int, ...]) -> int:
    """Channels of the network's output on one zero tile, checked to keep the tile's size.

    Raises:
        ExportError: the network cannot take such a tile, or returns another size.
    """
    advice = "choose a tile the network's downsampling divides (2 per step: e.g. a multiple of 16 or 32)"
    try:
        with torch.no_grad():
            output = network(torch.zeros((1, in_channels, *tile), dtype=torch.float32))
    except (RuntimeError, ValueError) as error:  # ValueError: a norm layer left with one pixel per channel
        raise ExportError(f"the network cannot take a tile of {list(tile)} ({first_line(error)}); {advice}") from None
    if list(output.shape[2:]) != list(tile):
        raise ExportError(f"network changes the spatial size of a tile: {list(tile)} -> {list(output.shape[2:])}; {advice}")
    return int(output.shape[1])


def export_onnx(network: torch.nn.Module, in_channels: int, tile: tuple[int, ...], path: pathlib.Path) -> None:
    """Export with a dynamic batch axis; spatial axes are fixed to the tile."""
    example = torch.zeros((2, in_channels, *tile), dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        # InstanceNorm keeps no running statistics, so training mode computes what eval mode does;
        # max_difference checks the file against the network whatever torch says here.
        warnings.filterwarnings("ignore", message=".*'instance_norm' is set to train=True", category=UserWarning)
        torch.onnx.export(
            network, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=17, dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def export_torchscript(network: torch.nn.Module, in_channels: int, tile: tuple[int, ...], path: pathlib.Path) -> None:
    """Traced TorchScript twin of the ONNX file: the GPU engine where onnxruntime has no CUDA,
    and the CPU engine of 2D networks (segserve.backend.onnx_runner)."""
    example = torch.zeros((2, in_channels, *tile), dtype=torch.float32)
    with torch.no_grad():
        torch.jit.trace(network, example, check_trace=False).save(str(path))


def max_difference(network: torch.nn.Module, path: pathlib.Path, in_channels: int, tile: tuple[int, ...]) -> float:
    """Largest |onnxruntime - torch| over a random batch of 3 tiles (a batch size unseen at export)."""
    sample = torch.rand((3, in_channels, *tile), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = network(sample).numpy()
    options = ort.SessionOptions()
    options.log_severity_level = 4  # its failure is reported below, in one line
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    try:
        (actual,) = session.run(None, {session.get_inputs()[0].name: sample.numpy()})
    except Exception as error:  # onnxruntime's Fail, InvalidArgument, ...
        raise ExportError(f"the exported graph fails on a batch of 3 tiles (it was traced with 2: the network fixes "
                          f"a batch size inside, as FlexibleUNet's resnet backbones do), so it cannot take the server's "
                          f"batches: {first_line(error)}") from None
    if actual.shape != expected.shape:
        raise ExportError(f"onnxruntime output shape {actual.shape} differs from torch {expected.shape}")
    return float(np.max(np.abs(actual - expected)))


# Tile batches the network model runs at load time (Triton's model_warmup), before it, and so
# the server, is ready. GPU (ExportSettings.gpu_warmup_batches): the sliding window's default
# batch and the largest merged one; first calls of a shape cost far more than later ones there
# (CUDA context, TorchScript's profiling runs, cuDNN). CPU: the default batch only; a first
# call costs little more than later ones, and onnxruntime's memory arena keeps what the
# largest batch needed (idle footprint).
CPU_WARMUP_BATCHES = (8,)


def add_warmup(config: model_config_pb2.ModelConfig, batch_sizes: tuple[int, ...]) -> None:
    """Replace the config's ``model_warmup`` with one zero batch of each size (capped by the
    config's max batch size)."""
    del config.model_warmup[:]
    sizes = sorted({min(size, config.max_batch_size) for size in batch_sizes})
    for size in sizes:
        warmup = config.model_warmup.add(name=f"zero tiles x{size}", batch_size=size, count=1)
        tensor = warmup.inputs[config.input[0].name]
        tensor.data_type = config.input[0].data_type
        tensor.dims.extend(config.input[0].dims)
        tensor.zero_data = True


def preferred_batch_sizes(max_batch_size: int, sizes: tuple[int, ...]) -> list[int]:
    return [size for size in sizes if size <= max_batch_size] or [max_batch_size]


def model_config(settings: ExportSettings, in_channels: int, num_classes: int) -> model_config_pb2.ModelConfig:
    """``config.pbtxt`` of the network model: Python-backend runner (onnxruntime or TorchScript), dynamic batching."""
    config = model_config_pb2.ModelConfig(name=settings.name, backend="python", max_batch_size=settings.max_batch_size)
    config.input.add(name=INPUT_NAME, data_type=model_config_pb2.TYPE_FP32, dims=[in_channels, *settings.tile])
    config.output.add(name=OUTPUT_NAME, data_type=model_config_pb2.TYPE_FP32, dims=[num_classes, *settings.tile])
    config.dynamic_batching.preferred_batch_size.extend(preferred_batch_sizes(settings.max_batch_size, (8, 16, 32)))
    config.dynamic_batching.max_queue_delay_microseconds = 200
    config.instance_group.add(count=1, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)
    # spin_wait: the network has its own stub process, and keeping its onnxruntime threads
    # spinning between tile batches measured 4-8% faster end to end (docs/benchmarks.md).
    parameters = {"FORCE_CPU_ONLY_INPUT_TENSORS": "no", "intra_op_threads": "0", "use_cuda": "true", "engine": "auto",
                  "spin_wait": "true"}
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    add_warmup(config, CPU_WARMUP_BATCHES)
    return config


def gpu_variant(config: model_config_pb2.ModelConfig, settings: ExportSettings) -> model_config_pb2.ModelConfig:
    """Variant ``gpu``: the same Python-backend runner with instances on every GPU, larger
    batches (each BLS call with GPU tensors has a fixed price) warmed up at load."""
    variant = model_config_pb2.ModelConfig()
    variant.CopyFrom(config)
    del variant.instance_group[:]
    variant.instance_group.add(count=settings.instances_per_gpu, kind=model_config_pb2.ModelInstanceGroup.KIND_GPU)
    variant.max_batch_size = settings.gpu_batch_limit
    del variant.dynamic_batching.preferred_batch_size[:]
    variant.dynamic_batching.preferred_batch_size.extend(sorted(set(settings.gpu_warmup_batches)))
    add_warmup(variant, settings.gpu_warmup_batches)
    return variant


def onnxruntime_variant(config: model_config_pb2.ModelConfig, settings: ExportSettings) -> model_config_pb2.ModelConfig:
    """Variant ``onnxruntime``: Triton's native onnxruntime backend on ``1/model.onnx`` (in
    NVIDIA's server images, not in the pip-installed server), instances on every GPU."""
    variant = gpu_variant(config, settings)
    variant.backend = "onnxruntime"
    variant.default_model_filename = "model.onnx"
    variant.parameters.clear()
    if settings.tensorrt:
        accelerator = variant.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters["precision_mode"] = "FP16"
        accelerator.parameters["max_workspace_size_bytes"] = str(2 << 30)
    return variant


def describe_existing(model_dir: pathlib.Path) -> tuple[str, bool] | None:
    """What sits at ``model_dir``: None when nothing (or an empty directory), else (a
    description, whether it is a network this exporter wrote)."""
    if model_dir.is_symlink():
        return f"a symbolic link to {os.readlink(model_dir)}", False
    if not model_dir.exists():
        return None
    if not model_dir.is_dir():
        return "a file, not a model directory", False
    if not any(model_dir.iterdir()):
        return None
    config_path = model_dir / "config.pbtxt"
    if not config_path.is_file():
        if only_exporter_files(model_dir):  # an export interrupted before its config (older exporters wrote in place)
            return "the unfinished export of a network", True
        return "a directory without a config.pbtxt", False
    try:
        config = read_model_config(config_path)
    except Exception as error:  # text_format.ParseError, UnicodeDecodeError, OSError
        return f"a model whose config.pbtxt does not parse ({str(error).splitlines()[0]})", False
    if config.platform == "ensemble":
        return "an ensemble model", False
    if config.backend != "python":
        return f"a {config.backend or config.platform or 'model of unknown backend'} model", False
    runner_path = model_dir / "1" / "model.py"
    runner = runner_path.read_text(errors="replace") if runner_path.is_file() else ""
    found = re.search(r"^from\s+([\w.]+)\s+import\s+TritonPythonModel", runner, re.MULTILINE)
    if found and found.group(1) == EXPORTED_RUNNER:
        return f"the network {config.name or model_dir.name}", True
    return f"a python-backend model running {found.group(1) if found else 'its own 1/model.py'}", False


EXPORTER_FILES = {"1", "1/model.onnx", "1/model.onnx.tmp", "1/model.ts", "1/model.py", "configs", "configs/gpu.pbtxt",
                  "configs/onnxruntime.pbtxt", "config.pbtxt"}


def only_exporter_files(model_dir: pathlib.Path) -> bool:
    """True when every path under ``model_dir`` is one an export writes."""
    return all(str(path.relative_to(model_dir)) in EXPORTER_FILES for path in model_dir.rglob("*"))


def check_target(repository: pathlib.Path, name: str, overwrite: bool = False) -> bool:
    """Refuse to export over ``<repository>/<name>`` when something is there that is not a
    network this exporter wrote (always), or is one and ``overwrite`` is not set. True when
    the export will replace a network."""
    model_dir = pathlib.Path(repository) / name
    existing = describe_existing(model_dir)
    if existing is None:
        return False
    what, exported = existing
    if not exported:
        raise ExportError(f"{model_dir} is {what}, not a network exported by python -m export: "
                          "export never replaces it (choose another --name)")
    if not overwrite:
        raise ExportError(f"{model_dir} already holds {what} exported by python -m export; add --overwrite to replace it")
    return True


def write_model(settings: ExportSettings, repository: pathlib.Path, onnx_path: pathlib.Path,
                torchscript_path: pathlib.Path, in_channels: int, num_classes: int, overwrite: bool = False) -> pathlib.Path:
    """Write ``<repository>/<name>/{config.pbtxt, configs/{gpu,onnxruntime}.pbtxt, 1/model.onnx,
    1/model.ts, 1/model.py}``; returns the model dir.

    The model is written into a directory beside it (``.<name>.export-*``) and moved into place
    only once complete; with ``overwrite`` it replaces a network written before as a whole (no
    file of the old one stays). Leftovers are removed on failure or Ctrl-C (and the repository
    directories made for it): Triton takes every directory of the repository, hidden ones
    included, for a model. A file system error is an ExportError naming the repository."""
    try:
        made = make_directories(repository)
        try:
            remove_leftovers(repository, settings.name)
            stage_and_move(settings, repository, onnx_path, torchscript_path, in_channels, num_classes, overwrite)
        except BaseException:
            remove_empty_directories(made)
            raise
    except OSError as error:  # the staging directory's path in it would name what the user never gave
        raise ExportError(f"cannot write to the repository {repository}: {error.strerror or error}") from error
    return repository / settings.name


def stage_and_move(settings: ExportSettings, repository: pathlib.Path, onnx_path: pathlib.Path,
                   torchscript_path: pathlib.Path, in_channels: int, num_classes: int, overwrite: bool) -> None:
    """The model's files written into a staging directory, then moved to ``<repository>/<name>``
    with Ctrl-C held off (never half-moved); the staging directory is removed whatever happens."""
    staging = make_unique_directory(repository, f".{settings.name}.export-")
    try:
        write_model_files(settings, staging, onnx_path, torchscript_path, in_channels, num_classes)
        check_target(repository, settings.name, overwrite)  # again: the repository may have changed meanwhile
        with interrupts_held():
            replace_directory(staging, repository / settings.name)
    finally:
        with interrupts_held():  # a second Ctrl-C does not cut the cleanup short
            shutil.rmtree(staging, ignore_errors=True)


def make_directories(path: pathlib.Path) -> list[pathlib.Path]:
    """Make directory ``path`` and its missing parents; returns those made, deepest first."""
    made = list(itertools.takewhile(lambda parent: not os.path.lexists(parent), (path, *path.parents)))
    path.mkdir(parents=True, exist_ok=True)
    return made


def remove_empty_directories(paths: list[pathlib.Path]) -> None:
    """Remove those of ``paths`` (deepest first) that are empty directories."""
    for path in paths:
        with contextlib.suppress(OSError):
            path.rmdir()


def repository_problem(repository: pathlib.Path) -> str | None:
    """Why no model can be written into ``repository`` (made if absent), as ``strerror`` says
    it, or None: it, or its nearest existing parent, is not a directory, or not writable."""
    existing = next((path for path in (repository, *repository.parents) if path.exists()), pathlib.Path("."))
    if not existing.is_dir():
        return os.strerror(errno.ENOTDIR)
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    if not os.access(existing, os.W_OK | os.X_OK):
        return os.strerror(errno.EACCES)
    return None


def check_repository(repository: pathlib.Path) -> None:
    """Refuse a repository that cannot be written, before the minutes an export can take."""
    problem = repository_problem(repository)
    if problem is not None:
        raise ExportError(f"cannot write to the repository {repository}: {problem}")


# What ends an export from the outside (python -m export makes SIGTERM a KeyboardInterrupt too).
INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def interrupts_held():
    """Run the block with Ctrl-C and SIGTERM held off, so a change of the repository is not
    cut half-way; one that came meanwhile is delivered after it (to the handler before: a
    KeyboardInterrupt, the default action, or nothing), unless the block raised."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers are the main thread's
        yield
        return
    came = []
    previous = {signum: signal.signal(signum, lambda signum, frame: came.append(signum)) for signum in INTERRUPTS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    for signum in dict.fromkeys(came):
        signal.raise_signal(signum)


def make_unique_directory(parent: pathlib.Path, prefix: str) -> pathlib.Path:
    """A new directory ``parent/prefix<random>`` with the umask's mode, as ``mkdir`` makes it
    (``mkdtemp``'s 0700 would stay on the renamed model: a server running as another user, the
    image's, could not read it)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def remove_leftovers(repository: pathlib.Path, name: str) -> None:
    """Remove the staging directories of an export of ``name`` that was killed (SIGKILL, power)
    before it could: Triton would take each for a model and fail to start."""
    for pattern in (f".{name}.export-*", f".{name}.replaced-*"):
        for leftover in repository.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def replace_directory(new: pathlib.Path, target: pathlib.Path) -> None:
    """Put directory ``new`` at ``target``; what was at ``target`` is moved aside, then deleted
    (put back if the move fails)."""
    if not os.path.lexists(target):
        new.rename(target)
        return
    old = make_unique_directory(target.parent, f".{target.name}.replaced-")
    old.rmdir()  # a free name on the same file system: rename needs it absent
    target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_model_files(settings: ExportSettings, model_dir: pathlib.Path, onnx_path: pathlib.Path,
                      torchscript_path: pathlib.Path, in_channels: int, num_classes: int) -> None:
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, model_dir / "1" / "model.onnx")
    shutil.copyfile(torchscript_path, model_dir / "1" / "model.ts")
    (model_dir / "1" / "model.py").write_text(MODEL_PY.format(name=settings.name))
    config = model_config(settings, in_channels, num_classes)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))
    (model_dir / "configs").mkdir(exist_ok=True)
    for variant, build in (("gpu", gpu_variant), ("onnxruntime", onnxruntime_variant)):
        (model_dir / "configs" / f"{variant}.pbtxt").write_text(text_format.MessageToString(build(config, settings)))


DEFAULT_NETWORK_LINE = re.compile(r'(key:\s*"default_network"\s*value:?\s*\{\s*string_value:\s*)"[^"]*"')


def default_network_configs(model_dir: pathlib.Path) -> list[pathlib.Path]:
    """The pipeline's config files that ``set_default_network`` edits (links to them are not)."""
    paths = [model_dir / "config.pbtxt", *sorted((model_dir / "configs").glob("*.pbtxt"))]
    return [path for path in paths if not path.is_symlink()]


def set_default_network(repository: pathlib.Path, name: str, pipeline: str = "segment_2d") -> None:
    """Point the pipeline's ``default_network`` parameter (in every config variant) at ``name``.

    Only that value changes: the configs keep their comments and layout. All or nothing: every
    file is edited and written beside itself first, then all are renamed over the old ones
    (a failure before leaves them as they were: ExportError naming the file)."""
    paths = default_network_configs(repository / pipeline)
    replace_files({path: with_default_network(path, name) for path in paths})


def with_default_network(config_path: pathlib.Path, name: str) -> str:
    """The text of ``config_path`` with its ``default_network`` value ``name``."""
    try:
        text, count = DEFAULT_NETWORK_LINE.subn(lambda match: f'{match.group(1)}"{name}"', config_path.read_text())
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
    except OSError as error:
        raise ExportError(f"--set-default: cannot read {config_path}: {error.strerror or error}") from error
    except (text_format.ParseError, UnicodeDecodeError) as error:
        raise ExportError(f"--set-default: {config_path} does not parse: {first_line(error)}") from error
    if count != 1 or config.parameters["default_network"].string_value != name:
        raise ExportError(f"{config_path}: expected one default_network parameter, found {count}")
    return text


def replace_files(texts: dict[pathlib.Path, str]) -> None:
    """Write each text into a new file beside its path, then rename them all over their paths
    (Ctrl-C held off meanwhile): a failure before the renames leaves every path as it was."""
    written = {}
    try:
        for path, text in texts.items():
            written[path] = write_beside(path, text)
        with interrupts_held():
            for path, new in written.items():
                os.replace(new, path)
    finally:
        with interrupts_held():
            for new in written.values():
                new.unlink(missing_ok=True)


def write_beside(path: pathlib.Path, text: str) -> pathlib.Path:
    """A new file ``.<name>.*.tmp`` beside ``path`` holding ``text`` (on disk), with ``path``'s mode."""
    try:
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise ExportError(f"--set-default: cannot write {path}: {error.strerror or error}") from error
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))  # mkstemp's 0600 would lock out a server of another user
    except BaseException as error:
        os.unlink(temporary)
        if isinstance(error, OSError):
            raise ExportError(f"--set-default: cannot write {path}: {error.strerror or error}") from error
        raise
    return pathlib.Path(temporary)


MAX_CLASSES = 255  # MASK is uint8, and 255 marks a failed frame in stack outputs (client.stacks.FAILED_VALUE)


def export_network(settings: ExportSettings, repository: pathlib.Path, log=print, overwrite: bool = False) -> pathlib.Path:
    """The whole export: build, ONNX export, checker, onnxruntime-vs-torch check, write.

    Refuses (ExportError, before any work) a name under which the repository holds anything but
    a network this exporter wrote, and such a network unless ``overwrite``, and a repository that
    cannot be written; a failed or interrupted (KeyboardInterrupt) export leaves the repository
    as it was."""
    repository = pathlib.Path(repository)
    check_repository(repository)
    replaced = check_target(repository, settings.name, overwrite)
    network = build_network(settings)
    in_channels = settings.arguments.get("in_channels", 1)
    num_classes = output_classes(network, in_channels, settings.tile)
    if num_classes > MAX_CLASSES:  # every request failed with "value cannot be converted to type uint8_t"
        raise ExportError(f"the network has {num_classes} output channels; MASK holds a class per pixel as uint8, "
                          f"255 marking a failed frame: at most {MAX_CLASSES} classes")
    if num_classes == 1:
        network, num_classes = OneChannelAsTwoClasses(network), 2
        log("one output channel: served as classes [background, foreground], "
            "foreground probability sigmoid(output), mask 1 where it is > 0.5")
    with tempfile.TemporaryDirectory() as scratch:
        onnx_path = pathlib.Path(scratch) / "model.onnx"
        export_onnx(network, in_channels, settings.tile, onnx_path)
        log("onnx.checker: ok")
        difference = max_difference(network, onnx_path, in_channels, settings.tile)
        log(f"onnxruntime vs torch max abs difference: {difference:.3g} (bound {settings.tolerance:g})")
        if not difference <= settings.tolerance:
            raise ExportError(f"onnxruntime differs from torch by {difference:.3g} > {settings.tolerance:g}")
        torchscript_path = pathlib.Path(scratch) / "model.ts"
        export_torchscript(network, in_channels, settings.tile, torchscript_path)
        model_dir = write_model(settings, repository, onnx_path, torchscript_path, in_channels, num_classes, overwrite)
    log(f"{'replaced' if replaced else 'wrote'} {model_dir} (a running server serves it once restarted)")
    return model_dir
