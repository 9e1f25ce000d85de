"""What the pipeline needs to know of a network model, read from its ``config.pbtxt``."""

from __future__ import annotations

import dataclasses
import pathlib

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2


class NetworkConfigError(ValueError):
    """A network model's configuration cannot drive the sliding window."""


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """Input/output contract of an exported segmentation network.

    The network takes ``[B, in_channels, *tile_size]`` float32 and returns
    ``[B, num_classes, *tile_size]`` float32 logits, with ``B <= max_batch_size``.
    """

    name: str
    input_name: str
    output_name: str
    in_channels: int
    num_classes: int
    tile_size: tuple[int, ...]
    max_batch_size: int

    @property
    def spatial_dims(self) -> int:
        return len(self.tile_size)


def read_model_config(config_path: pathlib.Path) -> model_config_pb2.ModelConfig:
    """Parse a Triton ``config.pbtxt`` into its protobuf message."""
    return text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())


def network_spec_from_config(config: model_config_pb2.ModelConfig, name: str | None = None) -> NetworkSpec:
    """Derive a :class:`NetworkSpec` from a parsed network model configuration.

    Raises:
        NetworkConfigError: not exactly one input and one output, or shapes that disagree.
    """
    name = name or config.name
    if len(config.input) != 1 or len(config.output) != 1:
        raise NetworkConfigError(f"model {name!r} is not a network (a network has one input and one output, it has "
                                 f"{len(config.input)} and {len(config.output)}: a pipeline?)")
    image_dims = list(config.input[0].dims)
    logits_dims = list(config.output[0].dims)
    if len(image_dims) < 3 or len(image_dims) != len(logits_dims):
        raise NetworkConfigError(f"network {name!r} has input dims {image_dims} and output dims {logits_dims}")
    if any(d <= 0 for d in image_dims) or image_dims[1:] != logits_dims[1:]:
        raise NetworkConfigError(
            f"network {name!r} needs fixed tile dims equal on input and output, got {image_dims} -> {logits_dims}"
        )
    return NetworkSpec(
        name=name,
        input_name=config.input[0].name,
        output_name=config.output[0].name,
        in_channels=image_dims[0],
        num_classes=logits_dims[0],
        tile_size=tuple(image_dims[1:]),
        max_batch_size=max(config.max_batch_size, 1),
    )


def load_network_spec(repository: pathlib.Path, name: str, config_name: str | None = None) -> NetworkSpec:
    """Read the spec of network model ``name`` from a model repository directory: from its
    configuration variant ``configs/<config_name>.pbtxt`` when given and present (the one
    ``tritonserver --model-config-name`` loads), else from its ``config.pbtxt``."""
    model_dir = pathlib.Path(repository) / name
    config_path = model_dir / "config.pbtxt"
    if config_name and (model_dir / "configs" / f"{config_name}.pbtxt").is_file():
        config_path = model_dir / "configs" / f"{config_name}.pbtxt"
    if not config_path.is_file():
        raise NetworkConfigError(f"no network model {name!r} in the model repository")
    return network_spec_from_config(read_model_config(config_path), name)


def repository_networks(repository: pathlib.Path, config_name: str | None = None) -> dict[str, NetworkSpec]:
    """Spec of every network model in the repository, by name: the directories whose config
    (or its ``config_name`` variant) is a network's; hidden ones (an export's staging) skipped."""
    networks = {}
    for model_dir in sorted(pathlib.Path(repository).iterdir()):
        if model_dir.name.startswith(".") or not (model_dir / "config.pbtxt").is_file():
            continue
        try:
            networks[model_dir.name] = load_network_spec(repository, model_dir.name, config_name)
        except (NetworkConfigError, text_format.ParseError, OSError):
            continue  # a pipeline step or an ensemble; a config the server refuses anyway
    return networks
