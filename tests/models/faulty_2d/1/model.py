"""faulty_2d: a deterministic bug or a transient failure on demand (see config.pbtxt)."""

import torch
import triton_python_backend_utils as pb_utils

from segserve.backend.tensors import error_response, output_tensor

BUG, MEMORY_SHORT = -1.0, -2.0


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            image = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
            try:
                if image.flat[0] == BUG:
                    raise ZeroDivisionError("division by zero in faulty_2d (a bug: fails every time)")
                if image.flat[0] == MEMORY_SHORT:
                    raise MemoryError("faulty_2d could not allocate its buffer")
                # Through DLPack: pb_utils.Tensor(name, numpy_array) sends 0 bytes in 2.51 with NumPy 2.
                mask = torch.zeros(image.shape[1:], dtype=torch.uint8)
                responses.append(pb_utils.InferenceResponse([output_tensor("MASK", mask)]))
            except Exception as error:  # every failure becomes this request's error response
                responses.append(error_response(error))
        return responses
