"""``sliding_window_2d``: NORMALIZED [C, H, W] -> LOGITS [K, H, W] through BLS tile batches."""

from __future__ import annotations

import pathlib

import torch
import triton_python_backend_utils as pb_utils

from segserve.backend.tensors import error_response, input_tensor, model_parameters, parse_model_config, to_torch, to_triton
from segserve.network_spec import NetworkSpec, load_network_spec
from segserve.options import parse_options
from segserve.sliding_window import blended_logits


class NetworkCallError(RuntimeError):
    """The network model answered a tile batch with an error."""


class TritonPythonModel:
    def initialize(self, args):
        parameters = model_parameters(parse_model_config(args))
        self.default_network = parameters["default_network"]
        self.repository = pathlib.Path(args["model_repository"]).parent
        self._specs: dict[str, NetworkSpec] = {}

    def execute(self, requests):
        return [self._execute_one(request) for request in requests]

    def _execute_one(self, request):
        try:
            options = parse_options(request.parameters())
            network = self._network_spec(options.network or self.default_network)
            image = input_tensor(request, "NORMALIZED")
            logits = blended_logits(image, network, lambda tiles: self._predict(network, tiles), options)
            return pb_utils.InferenceResponse(output_tensors=[to_triton("LOGITS", logits)])
        except Exception as error:
            return error_response(error)

    def _network_spec(self, name: str) -> NetworkSpec:
        if name not in self._specs:
            self._specs[name] = load_network_spec(self.repository, name)
        return self._specs[name]

    @staticmethod
    def _predict(network: NetworkSpec, tiles: torch.Tensor) -> torch.Tensor:
        """One BLS call: ``[B, C, *tile]`` float32 -> ``[B, K, *tile]`` float32 logits."""
        request = pb_utils.InferenceRequest(
            model_name=network.name,
            requested_output_names=[network.output_name],
            inputs=[to_triton(network.input_name, tiles)],
        )
        response = request.exec()
        if response.has_error():
            raise NetworkCallError(f"network {network.name!r} failed: {response.error().message()}")
        return to_torch(pb_utils.get_output_tensor_by_name(response, network.output_name))
