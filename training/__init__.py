"""Training of the default networks on synthetic data (no data set can be downloaded here)."""
