"""preprocess_3d: thin shim; the logic is segserve.backend.preprocess."""

from segserve.backend.preprocess import TritonPythonModel  # noqa: F401
