"""Network model: runs ``<version>/model.onnx`` with onnxruntime on dynamically batched tiles.

Each request carries ``[b, C, *tile]`` tiles; the requests Triton batched together run as one
``[sum(b), C, *tile]`` call and the logits are split back per request.
"""

from __future__ import annotations

import pathlib

import torch
import triton_python_backend_utils as pb_utils

from segserve.backend.tensors import error_response, model_parameters, parse_model_config, to_torch, to_triton
from segserve.onnx_network import OnnxNetwork


class TritonPythonModel:
    def initialize(self, args):
        config = parse_model_config(args)
        parameters = model_parameters(config)
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        model_path = pathlib.Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.network = OnnxNetwork(
            model_path,
            intra_op_threads=int(parameters.get("intra_op_threads", "0")),
            use_cuda=parameters.get("use_cuda", "true").lower() == "true",
        )
        pb_utils.Logger.log_info(f"{args['model_name']}: onnxruntime providers {self.network.providers}")

    def execute(self, requests):
        try:
            tiles = [to_torch(pb_utils.get_input_tensor_by_name(r, self.input_name)) for r in requests]
            logits = self.network(torch.cat(tiles) if len(tiles) > 1 else tiles[0])
        except Exception as error:
            return [error_response(error) for _ in requests]
        sizes = [t.shape[0] for t in tiles]
        return [
            pb_utils.InferenceResponse(output_tensors=[to_triton(self.output_name, part)])
            for part in torch.split(logits, sizes)
        ]
