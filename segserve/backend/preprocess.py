"""``preprocess_2d`` / ``preprocess_3d``: one of IMAGE / IMAGE_UINT8 / IMAGE_UINT16 / IMAGE_INT16 -> NORMALIZED."""

from __future__ import annotations

import torch
import triton_python_backend_utils as pb_utils

from segserve.backend.tensors import (error_response, input_tensor, instance_gpu, model_parameters, parse_model_config,
                                     to_triton)
from segserve.metrics import METRICS
from segserve.options import parse_options
from segserve.preprocess import InputError, normalize, validate_frame

IMAGE_INPUTS = ("IMAGE", "IMAGE_UINT8", "IMAGE_UINT16", "IMAGE_INT16")


def pipeline_device(setting: str, gpu: int | None = None) -> torch.device:
    """``auto``: the instance's GPU (``KIND_GPU``), else the first GPU when there is one (the
    later steps follow the tensor), else the CPU."""
    if setting == "auto":
        if gpu is not None:
            return torch.device("cuda", gpu)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


class TritonPythonModel:
    def initialize(self, args):
        METRICS.bind(args["model_name"])
        parameters = model_parameters(parse_model_config(args))
        self.spatial_dims = int(parameters.get("spatial_dims", "2"))
        self.max_pixels = int(parameters["max_pixels"]) if "max_pixels" in parameters else None
        self.device = pipeline_device(parameters.get("device", "auto"), instance_gpu(args))
        pb_utils.Logger.log_info(f"{args['model_name']}: pipeline tensors on {self.device}")

    def execute(self, requests):
        return [METRICS.timed(self._execute_one, request) for request in requests]

    def _execute_one(self, request):
        try:
            options = parse_options(request.parameters())
            frame = self._single_image(request)
            validate_frame(frame, self.spatial_dims, self.max_pixels)
            METRICS.frame_accepted(frame)
            normalized = normalize(frame.to(self.device), options)
            return pb_utils.InferenceResponse(output_tensors=[to_triton("NORMALIZED", normalized)])
        except Exception as error:  # every failure becomes this request's error response
            return error_response(error)

    @staticmethod
    def _single_image(request):
        given = {name: input_tensor(request, name) for name in IMAGE_INPUTS}
        given = {name: tensor for name, tensor in given.items() if tensor is not None}
        if len(given) != 1:
            raise InputError(
                f"send exactly one of {', '.join(IMAGE_INPUTS)} (by pixel type), got {sorted(given) or 'none'}"
            )
        return next(iter(given.values()))
