"""Triton Python-backend models. Import only inside the Triton stub (needs
``triton_python_backend_utils``); the logic they call lives in :mod:`segserve`."""
