"""``segment_2d`` / ``segment_3d``: the whole pipeline as one Python model, a frame
[C, *spatial] -> MASK, PROBABILITIES, CONTOUR, through BLS tile batches to the network model.

Input: one raw IMAGE* input in its wire dtype, validated and normalised here; or, where a
model's configuration declares it (the split layout ``make bench`` compares against),
NORMALIZED float32 from a preprocess step. Parameter ``postprocess``: ``true`` makes the model
emit MASK, PROBABILITIES and CONTOUR instead of LOGITS, so the K-channel logits never travel
between processes. The only full-size tensors crossing a process boundary are the frame in
its wire dtype and the outputs (docs/benchmarks.md, memory). The pipelines are not ensembles:
an ensemble allocates every output of its step once more before the response.

Parameters of the tile batches:
- ``sw_batch_size``: tiles per BLS call when a request names none (default 8; the GPU
  variant asks for more, so a frame takes a handful of calls).
- ``pad_last_batch``: ``true`` pads a partial last batch with zero tiles to the full batch
  size, so the engine sees one shape (TorchScript, CUDA graphs, TensorRT profiles).
- ``network_config``: the configuration variant the network models run under (``gpu``): their
  max batch size is read from ``configs/<variant>.pbtxt``, else from ``config.pbtxt``.
- ``tile_requests_in_flight``: each tile batch is split into this many BLS requests sent at
  once (``async_exec``), so network instances on several GPUs work on one frame together;
  ``auto`` means one per visible GPU. Default 1.

The step warms itself up in ``initialize`` (a small frame through normalisation, blending and
postprocessing, with zero logits in place of the network: BLS targets may not be loaded yet),
so the model, and with it the server, is ready only once first-call costs are paid; the
network model warms itself with Triton's ``model_warmup`` (written by the export).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import time

import torch
import triton_python_backend_utils as pb_utils

from segserve.backend.allocator import release_free_memory, release_when_freed
from segserve.backend.log import stamped
from segserve.backend.postprocess import forward_package_logs, segmentation_outputs
from segserve.backend.preprocess import FramePreparation
from segserve.backend.tensors import (error_response, input_tensor, model_parameters, output_tensor, parse_model_config,
                                     to_torch, to_triton)
from segserve.metrics import METRICS
from segserve.network_spec import NetworkConfigError, NetworkSpec, load_network_spec, repository_networks
from segserve.options import PipelineOptions, parse_options
from segserve.preprocess import normalize
from segserve.sliding_window import (DEFAULT_SW_BATCH_SIZE, blended_logits, pad_batch, resolve_sw_batch_size,
                                     window_limit)
from segserve.postprocess import postprocess

SOURCE_REPOSITORY_ENV = "SEGSERVE_SOURCE_REPOSITORY"  # set by segserve.launcher, whose name it repeats


class NetworkCallError(RuntimeError):
    """The network model answered a tile batch with an error."""


class RequestCancelled(RuntimeError):
    """The client gave up on the request (its deadline passed, or it cancelled it): the frame's
    remaining tile batches are not computed. A client whose ``--timeout`` is shorter than a
    frame's compute left every retry running to the end on the server, several frames' work at
    once for nobody."""


class TritonPythonModel:
    def initialize(self, args):
        METRICS.bind(args["model_name"])
        parameters = model_parameters(parse_model_config(args))
        self.name = args["model_name"]
        self.default_network = parameters["default_network"]
        self.repository = pathlib.Path(args["model_repository"]).parent
        # The launcher runs the server on a copy of the repository; networks exported since it
        # started are found in the one the user named (launcher.SOURCE_REPOSITORY_ENV).
        self.source_repository = pathlib.Path(os.environ.get(SOURCE_REPOSITORY_ENV) or self.repository)
        self.requests_in_flight = requests_in_flight(parameters.get("tile_requests_in_flight", "1"))
        self.default_sw_batch_size = int(parameters.get("sw_batch_size", str(DEFAULT_SW_BATCH_SIZE)))
        self.pad_last_batch = parameters.get("pad_last_batch", "false").lower() == "true"
        self.postprocess = parameters.get("postprocess", "false").lower() == "true"
        self.network_config = parameters.get("network_config") or None
        self.prepare = FramePreparation(args)
        if self.postprocess:
            forward_package_logs()
        self._loop = asyncio.new_event_loop() if self.requests_in_flight > 1 else None
        # Read once, as the server loaded them: a network overwritten by an export while the
        # server runs keeps serving as it was until the restart loads the new one (each instance
        # read the new tile on its first request, while Triton ran the old network).
        self._specs: dict[str, NetworkSpec] = repository_networks(self.repository, self.network_config)
        self._exported_since_start: set[str] = set()
        pb_utils.Logger.log_info(f"{self.name}: {self.default_sw_batch_size} tiles per network call by default"
                                 f"{', last batch padded' if self.pad_last_batch else ''}; "
                                 f"{self.requests_in_flight} tile request(s) in flight per batch")
        self._warm_up()

    def finalize(self):
        METRICS.close()
        if self._loop is not None:
            self._loop.close()

    def execute(self, requests):
        return [METRICS.timed(self._execute_one, request) for request in requests]

    def _execute_one(self, request):
        """The one place a request is finished: its outputs, or its error."""
        try:
            options = parse_options(request.parameters())
            network = self._network_spec(options.network or self.default_network)
            stop_if_cancelled(request, "before it started")
            logits = self._blended_logits(request, network, options)
            # The float frame and the count map are freed: their pages go back before the
            # outputs are copied (a large frame's; the allocator keeps a small frame's).
            release_free_memory(logits.numel() * logits.element_size())
            if self.postprocess:
                outputs = segmentation_outputs(logits, options)
            else:
                outputs = [output_tensor("LOGITS", logits)]
            # The logits' memory (sent from, where an output is not in shared memory) is
            # freed once the stub has handed the response over: released then.
            release_when_freed(logits)
            return pb_utils.InferenceResponse(output_tensors=outputs)
        except Exception as error:
            return error_response(error)

    def _blended_logits(self, request, network: NetworkSpec, options: PipelineOptions) -> torch.Tensor:
        """``[K, *spatial]`` float32 logits of the request's frame. The float frame is dropped
        on return, before postprocessing allocates."""
        image = input_tensor(request, "NORMALIZED")
        if image is None:
            image = self.prepare(request, options)
        batch_size = resolve_sw_batch_size(options, network, self.default_sw_batch_size)
        batches_done = 0

        def predict(tiles: torch.Tensor) -> torch.Tensor:
            nonlocal batches_done
            stop_if_cancelled(request, f"after {batches_done} tile batch(es) of {batch_size}")
            batches_done += 1
            return self._predict(network, tiles, batch_size)

        return blended_logits(image, network, predict, options, batch_size,
                              window_limit(self.prepare.max_pixels, network.tile_size))

    def _network_spec(self, name: str) -> NetworkSpec:
        if name not in self._specs:  # exported since the start: served once loaded (a restart)
            try:
                self._specs[name] = load_network_spec(self.source_repository, name, self.network_config)
            except NetworkConfigError as error:
                raise NetworkConfigError(f"{error}; the networks here: {', '.join(sorted(self._specs))}") from None
            self._exported_since_start.add(name)
        return self._specs[name]

    def _predict(self, network: NetworkSpec, tiles: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The one place tiles go to the network: ``[B, C, *tile]`` float32 -> ``[B, K, *tile]``
        float32 logits on the tiles' device, in one BLS call or ``requests_in_flight``
        concurrent ones. With ``pad_last_batch`` a short batch travels padded to ``batch_size``."""
        try:
            return self._network_call(network, tiles, batch_size)
        except NetworkCallError as error:
            if network.name not in self._exported_since_start:
                raise
            raise NetworkCallError(f"{error} (network {network.name!r} was exported after the server started: "
                                   "restart the server to load it)") from None

    def _network_call(self, network: NetworkSpec, tiles: torch.Tensor, batch_size: int) -> torch.Tensor:
        count = tiles.shape[0]
        if self.pad_last_batch:
            tiles = pad_batch(tiles, batch_size)
        parts = torch.tensor_split(tiles, min(self.requests_in_flight, tiles.shape[0]))
        METRICS.tile_batch(count, len(parts), tiles.ndim - 2)
        if len(parts) == 1:
            logits = network_logits(network, network_request(network, tiles).exec()).to(tiles.device)
        else:
            requests = [network_request(network, part) for part in parts]
            responses = self._loop.run_until_complete(exec_all(requests))
            logits = torch.cat([network_logits(network, response).to(tiles.device) for response in responses])
        return logits[:count]

    def _warm_up(self) -> None:
        """Pay this process's first-call costs before the model is ready: CUDA context and
        kernels on a GPU, MONAI's lazy imports and first allocations everywhere. The network is
        not called (it may not be loaded yet); it warms itself (``model_warmup``)."""
        try:
            network = self._network_spec(self.default_network)
        except NetworkConfigError as error:
            pb_utils.Logger.log_warn(f"{self.name}: no warm-up ({error})")
            return
        start = time.perf_counter()
        # One tile and a pixel in each dimension: overlapping windows, blending, padding-free.
        frame = torch.zeros((network.in_channels, *(size + 1 for size in network.tile_size)), dtype=torch.uint16)
        frame[(slice(None), *(slice(0, size) for size in network.tile_size))] = 1000
        image = normalize(frame.to(self.prepare.device), PipelineOptions())

        def zero_logits(tiles: torch.Tensor) -> torch.Tensor:
            return tiles.new_zeros((tiles.shape[0], network.num_classes, *tiles.shape[2:]))

        logits = blended_logits(image, network, zero_logits, PipelineOptions(), 2)
        if self.postprocess:
            postprocess(logits, probabilities=True, keep_largest=True, contour=True)
        if image.is_cuda:
            torch.cuda.synchronize(image.device)
        pb_utils.Logger.log_info(stamped(f"{self.name}: warm-up done in {time.perf_counter() - start:.2f} s"))


def stop_if_cancelled(request, progress: str) -> None:
    """Raise RequestCancelled when Triton says the request is cancelled (one message to the
    server process, as a metrics update costs: once per tile batch)."""
    if request.is_cancelled():
        raise RequestCancelled(f"the client gave up on this request (deadline passed or cancelled); stopped {progress}")


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
