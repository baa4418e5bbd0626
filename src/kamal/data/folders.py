"""Datasets on disk: a folder of unlabeled images, and torchvision datasets already downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import ImageDataset, TensorImageDataset, resize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def build_image_folder(split: str | None = None, root: str = "", size: int = 32,
                       channels: int = 3) -> TensorImageDataset:
    """All images under ``root`` (recursively), resized to ``size``; unlabeled."""
    from torchvision.io import ImageReadMode, decode_image

    folder = Path(root)
    if not root or not folder.is_dir():
        raise ValueError(f"root '{root}' is not a folder; set data.<section>.root to a folder "
                         "of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under '{root}'")
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    images = [resize(decode_image(str(f), mode=mode)[None].float() / 255.0, size) for f in files]
    return TensorImageDataset(torch.cat(images), torch.full((len(files),), -1), None)


class _TorchvisionAdapter(ImageDataset):
    def __init__(self, dataset, size: int | None) -> None:
        self.dataset = dataset
        self.classes = [str(c) for c in getattr(dataset, "classes", [])] or None
        self.size_override = size
        image, _ = self[0]
        self.channels, self.size = int(image.shape[0]), tuple(image.shape[1:])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        from torchvision.transforms.functional import pil_to_tensor

        image, label = self.dataset[index]
        tensor = pil_to_tensor(image).float()[None] / 255.0
        if self.size_override:
            tensor = resize(tensor, self.size_override)
        return tensor[0], int(label)


def build_torchvision(split: str | None = None, variant: str = "", root: str = "data",
                      size: int | None = None) -> ImageDataset:
    """``torchvision:<Name>``: a torchvision dataset already on disk under ``root``.

    Never downloads. ``split`` is ``train`` or ``test`` (passed as ``train=`` or ``split=``).
    """
    import torchvision.datasets as tvd

    cls = getattr(tvd, variant, None)
    if not variant or not isinstance(cls, type):
        raise ValueError(f"torchvision has no dataset '{variant}' (e.g. torchvision:CIFAR10)")
    try:
        try:
            dataset = cls(root, train=(split != "test"), download=False)
        except TypeError:
            dataset = cls(root, split=split or "train", download=False)
    except RuntimeError as exc:
        raise ValueError(f"{variant} is not on disk under '{root}' ({exc}); kamal never "
                         "downloads data: place it there first") from exc
    return _TorchvisionAdapter(dataset, size)
