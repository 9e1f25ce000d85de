"""Preprocessing step: one of IMAGE / IMAGE_UINT8 / IMAGE_UINT16 / IMAGE_INT16 -> NORMALIZED.

The shipped pipelines run this code inside the sliding-window step (:class:`FramePreparation`):
the frame arrives there in its wire dtype (uint16 stays uint16, 2 bytes a pixel) and the
float32 copy is made in the process that uses it, so no full-size float frame crosses between
processes. The step on its own (``TritonPythonModel``) is what ``scripts/tune_2d.py`` measures
the fused layout against.
"""

from __future__ import annotations

import torch
import triton_python_backend_utils as pb_utils

from segserve.backend.tensors import (error_response, input_tensor, instance_gpu, model_parameters, output_tensor,
                                     parse_model_config)
from segserve.metrics import METRICS
from segserve.options import InputError, PipelineOptions, parse_options
from segserve.preprocess import normalize, validate_frame

IMAGE_INPUTS = ("IMAGE", "IMAGE_UINT8", "IMAGE_UINT16", "IMAGE_INT16")


def pipeline_device(setting: str, gpu: int | None = None) -> torch.device:
    """``auto``: the instance's GPU (``KIND_GPU``), else the first GPU when there is one (the
    later steps follow the tensor), else the CPU."""
    if setting == "auto":
        if gpu is not None:
            return torch.device("cuda", gpu)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def request_frame(request) -> torch.Tensor:
    """The one IMAGE* input of a request, ``[C, *spatial]`` in its wire dtype (zero-copy view)."""
    given = {name: input_tensor(request, name) for name in IMAGE_INPUTS}
    given = {name: tensor for name, tensor in given.items() if tensor is not None}
    if len(given) != 1:
        raise InputError(f"send exactly one of {', '.join(IMAGE_INPUTS)} (by pixel type), got {sorted(given) or 'none'}")
    return next(iter(given.values()))


class FramePreparation:
    """Settings of the preprocessing, read once from a model's config: ``spatial_dims``,
    ``max_pixels`` (per channel; absent means no limit) and ``device`` (auto | cpu | cuda[:n])."""

    def __init__(self, args: dict):
        parameters = model_parameters(parse_model_config(args))
        self.spatial_dims = int(parameters.get("spatial_dims", "2"))
        self.max_pixels = int(parameters["max_pixels"]) if "max_pixels" in parameters else None
        self.device = pipeline_device(parameters.get("device", "auto"), instance_gpu(args))
        pb_utils.Logger.log_info(f"{args['model_name']}: pipeline tensors on {self.device}")

    def __call__(self, request, options: PipelineOptions) -> torch.Tensor:
        """The request's frame validated and normalised: ``[C, *spatial]`` float32 in [0, 1] on
        ``device``. The frame moves to the device in its wire dtype, then becomes float."""
        frame = request_frame(request)
        validate_frame(frame, self.spatial_dims, self.max_pixels)
        METRICS.frame_accepted(frame)
        return normalize(frame.to(self.device), options)


class TritonPythonModel:
    def initialize(self, args):
        METRICS.bind(args["model_name"])
        self.prepare = FramePreparation(args)

    def finalize(self):
        METRICS.close()

    def execute(self, requests):
        return [METRICS.timed(self._execute_one, request) for request in requests]

    def _execute_one(self, request):
        try:
            normalized = self.prepare(request, parse_options(request.parameters()))
            return pb_utils.InferenceResponse(output_tensors=[output_tensor("NORMALIZED", normalized)])
        except Exception as error:  # every failure becomes this request's error response
            return error_response(error)
