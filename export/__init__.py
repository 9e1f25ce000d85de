"""Export a trained MONAI/PyTorch segmentation network into the Triton model repository."""
