"""``sliding_window_2d`` / ``_3d``: NORMALIZED [C, *spatial] -> LOGITS [K, *spatial] through
BLS tile batches.

Parameter ``postprocess``: ``true`` makes the step emit the pipeline's outputs (MASK,
PROBABILITIES, CONTOUR; the postprocess step's code) instead of LOGITS, so the K-channel logits
never travel between processes: for volumes that saves two copies of the largest tensor
(``segment_3d``). Parameter ``tile_requests_in_flight``: each tile batch is split into this many BLS requests
sent at once (``async_exec``), so network instances on several GPUs work on one frame
together; ``auto`` means one per visible GPU. Default 1: one request per batch.
"""

from __future__ import annotations

import asyncio
import pathlib

import torch
import triton_python_backend_utils as pb_utils

from segserve.backend.postprocess import forward_package_logs, segmentation_outputs
from segserve.backend.tensors import error_response, input_tensor, model_parameters, parse_model_config, to_torch, to_triton
from segserve.metrics import METRICS
from segserve.network_spec import NetworkSpec, load_network_spec
from segserve.options import parse_options
from segserve.sliding_window import blended_logits


class NetworkCallError(RuntimeError):
    """The network model answered a tile batch with an error."""


class TritonPythonModel:
    def initialize(self, args):
        METRICS.bind(args["model_name"])
        parameters = model_parameters(parse_model_config(args))
        self.default_network = parameters["default_network"]
        self.repository = pathlib.Path(args["model_repository"]).parent
        self.requests_in_flight = requests_in_flight(parameters.get("tile_requests_in_flight", "1"))
        self.postprocess = parameters.get("postprocess", "false").lower() == "true"
        if self.postprocess:
            forward_package_logs()
        self._loop = asyncio.new_event_loop() if self.requests_in_flight > 1 else None
        self._specs: dict[str, NetworkSpec] = {}
        pb_utils.Logger.log_info(f"{args['model_name']}: {self.requests_in_flight} tile request(s) in flight per batch")

    def finalize(self):
        if self._loop is not None:
            self._loop.close()

    def execute(self, requests):
        return [METRICS.timed(self._execute_one, request) for request in requests]

    def _execute_one(self, request):
        try:
            options = parse_options(request.parameters())
            network = self._network_spec(options.network or self.default_network)
            image = input_tensor(request, "NORMALIZED")
            logits = blended_logits(image, network, lambda tiles: self._predict(network, tiles), options)
            if self.postprocess:
                return pb_utils.InferenceResponse(output_tensors=segmentation_outputs(logits, options))
            return pb_utils.InferenceResponse(output_tensors=[to_triton("LOGITS", logits)])
        except Exception as error:
            return error_response(error)

    def _network_spec(self, name: str) -> NetworkSpec:
        if name not in self._specs:
            self._specs[name] = load_network_spec(self.repository, name)
        return self._specs[name]

    def _predict(self, network: NetworkSpec, tiles: torch.Tensor) -> torch.Tensor:
        """``[B, C, *tile]`` float32 -> ``[B, K, *tile]`` float32 logits on the tiles' device,
        in one BLS call or ``requests_in_flight`` concurrent ones."""
        parts = torch.tensor_split(tiles, min(self.requests_in_flight, tiles.shape[0]))
        METRICS.tile_batch(tiles.shape[0], len(parts), tiles.ndim - 2)
        if len(parts) == 1:
            return network_logits(network, network_request(network, tiles).exec()).to(tiles.device)
        requests = [network_request(network, part) for part in parts]
        responses = self._loop.run_until_complete(exec_all(requests))
        return torch.cat([network_logits(network, response).to(tiles.device) for response in responses])


async def exec_all(requests: list) -> list:
    """Send BLS requests at once (``async_exec`` needs a running event loop) and await all."""
    return await asyncio.gather(*(request.async_exec() for request in requests))


def requests_in_flight(setting: str) -> int:
    if setting == "auto":
        return max(torch.cuda.device_count(), 1)
    return max(int(setting), 1)


def network_request(network: NetworkSpec, tiles: torch.Tensor) -> "pb_utils.InferenceRequest":
    return pb_utils.InferenceRequest(
        model_name=network.name,
        requested_output_names=[network.output_name],
        inputs=[to_triton(network.input_name, tiles)],
    )


def network_logits(network: NetworkSpec, response) -> torch.Tensor:
    """The logits of a BLS response; its error raised as NetworkCallError."""
    if response.has_error():
        raise NetworkCallError(f"network {network.name!r} failed: {response.error().message()}")
    return to_torch(pb_utils.get_output_tensor_by_name(response, network.output_name))
