"""Built-in datasets and the helpers that turn a ``data`` config entry into a loader."""

from .base import ImageDataset, TensorImageDataset, build_dataset

__all__ = ["ImageDataset", "TensorImageDataset", "build_dataset"]
