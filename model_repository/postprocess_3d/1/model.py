"""postprocess_3d: thin shim; the logic is segserve.backend.postprocess."""

from segserve.backend.postprocess import TritonPythonModel  # noqa: F401
