"""Request parameters of the segmentation pipeline, parsed and validated in one place.

Every composing model of the ``segment_2d`` ensemble receives the same request parameters,
so each one calls :func:`parse_options` and reads the fields it needs. Unknown names and bad
values raise :class:`OptionError` with the offending name and value in the message.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

from segproto import BLEND_MODES, DEFAULT_BLEND, DEFAULT_OVERLAP


class InputError(ValueError):
    """The frame itself is unusable (shape, dtype or values). Here, not in segserve.preprocess,
    so that the network's stub can name it without importing MONAI (seconds and ~100 MB)."""


class OptionError(ValueError):
    """A request parameter has an unknown name or an invalid value."""


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """Settings of one segmentation request.

    Attributes:
        intensity_min, intensity_max: input range mapped to [0, 1] with clipping
            (MONAI ``ScaleIntensityRange``). When both are absent the frame is scaled between
            its own 1st and 99th percentiles.
        overlap: fraction of a tile shared with its neighbour, in [0, 1).
        blend: ``gaussian`` or ``constant`` weighting of overlapping tiles.
        sw_batch_size: tiles sent to the network per request; None means the pipeline default.
        network: network model to run; None means the pipeline default.
        probabilities: compute the ``PROBABILITIES`` output (the client sets it when it asks
            for that output; Triton asks every composing model for every mapped output).
        keep_largest: keep only the largest connected component of each foreground class.
        contour: compute the ``CONTOUR`` output (MONAI ``LabelToContour`` of the mask).
    """

    intensity_min: float | None = None
    intensity_max: float | None = None
    overlap: float = DEFAULT_OVERLAP
    blend: str = DEFAULT_BLEND
    sw_batch_size: int | None = None
    network: str | None = None
    probabilities: bool = False
    keep_largest: bool = False
    contour: bool = False

    def __post_init__(self) -> None:
        if (self.intensity_min is None) != (self.intensity_max is None):
            raise OptionError("intensity_min and intensity_max must be given together")
        if self.intensity_min is not None and not self.intensity_min < self.intensity_max:
            raise OptionError(
                f"intensity_min ({self.intensity_min}) must be below intensity_max ({self.intensity_max})"
            )
        if not 0.0 <= self.overlap < 1.0:
            raise OptionError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.blend not in BLEND_MODES:
            raise OptionError(f"blend must be one of {', '.join(BLEND_MODES)}, got {self.blend!r}")
        if self.sw_batch_size is not None and self.sw_batch_size < 1:
            raise OptionError(f"sw_batch_size must be >= 1, got {self.sw_batch_size}")
        if self.network is not None and not self.network.strip():
            raise OptionError("network must be a non-empty model name")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise OptionError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise OptionError(f"{name} must be finite, got {value!r}")
    return number


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise OptionError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise OptionError(f"{name} must be an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be an integer, got {value!r}") from None


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise OptionError(f"{name} must be true or false, got {value!r}")


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise OptionError(f"{name} must be a string, got {value!r}")
    return value


_PARSERS = {
    "intensity_min": _as_float,
    "intensity_max": _as_float,
    "overlap": _as_float,
    "blend": _as_str,
    "sw_batch_size": _as_int,
    "network": _as_str,
    "probabilities": _as_bool,
    "keep_largest": _as_bool,
    "contour": _as_bool,
}

OPTION_NAMES = tuple(_PARSERS)


def parse_options(parameters: Mapping[str, Any] | str | None) -> PipelineOptions:
    """Build :class:`PipelineOptions` from request parameters.

    Args:
        parameters: a mapping, the JSON string that ``request.parameters()`` returns in a
            Triton Python model, or None.

    Raises:
        OptionError: on an unknown name or a value of the wrong type or range.
    """
    if parameters is None or parameters == "":
        return PipelineOptions()
    if isinstance(parameters, str):
        try:
            parameters = json.loads(parameters)
        except json.JSONDecodeError as error:
            raise OptionError(f"request parameters are not valid JSON: {error}") from None
    unknown = sorted(set(parameters) - set(_PARSERS))
    if unknown:
        raise OptionError(
            f"unknown request parameter(s) {', '.join(unknown)}; known: {', '.join(OPTION_NAMES)}"
        )
    values = {name: _PARSERS[name](name, value) for name, value in parameters.items()}
    return PipelineOptions(**values)
