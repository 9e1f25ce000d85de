"""Server-side logic of the segmentation service: options, pre/postprocessing, sliding
window, network runner and the Triton server launcher. The Triton ``model.py`` files are thin
shims over :mod:`segserve.backend`; everything else here imports without a server."""

__version__ = "0.1.0"
