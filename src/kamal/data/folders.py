"""Datasets on disk: a folder of images (unlabelled, or labelled by class subfolders), and
torchvision datasets already downloaded. Images are decoded lazily, one per item (in the
DataLoader's workers), so memory does not grow with the number of images."""

from __future__ import annotations

import copy
import hashlib
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .augment import RandomCropFlip
from .base import ImageDataset
from .transforms import ImageView

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
LABEL_MODES = ("none", "folders")


class _CropFlipSource(ImageDataset):
    """A dataset of decoded images whose reads may be randomly cropped and flipped
    (``augmentation``; ``None``: as stored), the draws recordable for stored views."""

    augmentation: RandomCropFlip | None = None

    def stored(self, index: int) -> tuple[Any, int]:
        """Sample ``index`` as stored: the decoded image (a PIL image) and its label."""
        raise NotImplementedError

    def without_augmentation(self) -> _CropFlipSource:
        plain = copy.copy(self)
        plain.augmentation, plain.augmented = None, False
        return plain

    def source(self, index: int) -> tuple[Any, int]:
        """The decoded image (before any model's view; randomly cropped and flipped when
        augmented) and its label."""
        if self.augmentation is not None:
            return self.augmented_source(index, self.augmentation.draw())
        return self.stored(index)

    def draw_augmentation(self, generator: torch.Generator | None = None) -> Tensor:
        if self.augmentation is None:
            raise NotImplementedError(f"this {type(self).__name__} is not augmented")
        return self.augmentation.draw(generator)

    def augmented_source(self, index: int, params: Tensor) -> tuple[Any, int]:
        if self.augmentation is None:
            raise NotImplementedError(f"this {type(self).__name__} is not augmented")
        image, label = self.stored(index)
        return self.augmentation.apply(image, params), label


class ImageFolderDataset(_CropFlipSource):
    """Images under ``root``, read on demand. With ``labels="folders"`` the first-level
    subfolders are the classes (sorted names, as torchvision's ImageFolder). With
    ``augmentation``, each read is a random crop (and flip) of the decoded image, which every
    model then reads through its own view."""

    def __init__(self, root: Path, size: int, channels: int, labels: str,
                 augmentation: RandomCropFlip | None = None) -> None:
        if labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {', '.join(LABEL_MODES)}, got '{labels}'")
        self.root, self.channels, self.size = root, channels, (size, size)
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under '{root}'")
        if labels == "folders":
            self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
            outside = [f for f in self.files if f.parent == root]
            if not self.classes or outside:
                raise ValueError(f"labels: folders needs every image of '{root}' inside a class "
                                 f"subfolder ({len(outside)} images are not)")
            index = {name: i for i, name in enumerate(self.classes)}
            self.labels = [index[f.relative_to(root).parts[0]] for f in self.files]
        else:
            self.labels = [-1] * len(self.files)

        # the data's own view: the shorter side to ``size``, then the centre crop
        self.view = ImageView(channels, self.size)
        self.augmentation = augmentation
        self.augmented = augmentation is not None

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        """Each file's path (below the root), size and modification time."""
        digest = hashlib.sha256()
        for file in self.files:
            stat = file.stat()
            digest.update(f"{file.relative_to(self.root)}|{stat.st_size}|{stat.st_mtime_ns}\n"
                          .encode())
        return digest.hexdigest()

    def decoded(self, index: int) -> Any:
        """The decoded image as stored (a PIL image)."""
        from PIL import Image

        with Image.open(self.files[index]) as file:
            return file.convert("L" if self.channels == 1 else "RGB")

    def stored(self, index: int) -> tuple[Any, int]:
        return self.decoded(index), self.labels[index]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.source(index)
        return self.view(image), label


def build_image_folder(split: str | None = None, root: str = "", size: int = 32,
                       channels: int = 3, labels: str = "none", augment: bool = False,
                       min_area: float = 0.25) -> ImageFolderDataset:
    """Images under ``root`` (recursively), the shorter side resized to ``size`` and centre
    cropped. ``labels: folders`` takes class subfolders as labels; ``split`` names a
    subfolder of ``root`` (e.g. train/val) when it exists. ``augment`` reads each image as a
    random crop of ``min_area`` to all of its area (aspect 3/4 to 4/3) and flips half of them
    (torchvision's RandomResizedCrop and RandomHorizontalFlip, drawn as recordable numbers)."""
    folder = Path(root)
    if not root or not folder.is_dir():
        raise ValueError(f"root '{root}' is not a folder; set data.<section>.root to a folder "
                         "of images")
    if split and (folder / split).is_dir():
        folder = folder / split
    return ImageFolderDataset(folder, size, channels, labels,
                              RandomCropFlip(min_area) if augment else None)


class _TorchvisionAdapter(_CropFlipSource):
    def __init__(self, dataset, size: int | None,
                 augmentation: RandomCropFlip | None = None) -> None:
        self.dataset = dataset
        self.classes = [str(c) for c in getattr(dataset, "classes", [])] or None
        self.size_override = size
        image, _ = self[0]
        self.channels, self.size = int(image.shape[0]), tuple(image.shape[1:])
        if augmentation is not None:  # random crops differ in size: viewed as a square
            self.size = (min(self.size),) * 2
        self.augmentation, self.augmented = augmentation, augmentation is not None

    def __len__(self) -> int:
        return len(self.dataset)

    def stored(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        return image, int(label)

    def __getitem__(self, index: int):
        from torchvision.transforms.functional import pil_to_tensor

        image, label = self.source(index)
        if self.size_override or self.augmentation is not None:
            side = self.size_override or self.size[0]
            return ImageView(len(image.getbands()), (side, side))(image), label
        return pil_to_tensor(image).float() / 255.0, label


def build_torchvision(split: str | None = None, variant: str = "", root: str = "data",
                      size: int | None = None, augment: bool = False,
                      min_area: float = 0.25) -> ImageDataset:
    """``torchvision:<Name>``: a torchvision dataset already on disk under ``root``.

    Never downloads. ``split`` is passed as ``train=`` or ``split=`` for datasets that take
    one; for folder datasets (ImageFolder) it names a subfolder of ``root`` when given.
    ``augment`` and ``min_area`` as the image folder's (random crop and flip, recordable).
    """
    import torchvision.datasets as tvd

    cls = getattr(tvd, variant, None)
    if not variant or not isinstance(cls, type):
        raise ValueError(f"torchvision has no dataset '{variant}' (e.g. torchvision:CIFAR10)")
    params = inspect.signature(cls).parameters
    kwargs: dict[str, object] = {"download": False} if "download" in params else {}
    if "train" in params:
        kwargs["train"] = split != "test"
    elif "split" in params:
        kwargs["split"] = split or "train"
    elif split:
        root = str(Path(root) / split)
    try:
        dataset = cls(root, **kwargs)
    except (RuntimeError, FileNotFoundError) as exc:
        raise ValueError(f"{variant} is not on disk under '{root}' ({exc}); kamal never "
                         "downloads data: place it there first") from exc
    return _TorchvisionAdapter(dataset, size, RandomCropFlip(min_area) if augment else None)
