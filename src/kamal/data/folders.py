"""Datasets on disk: a folder of images (unlabelled, or labelled by class subfolders), and
torchvision datasets already downloaded. Images are decoded lazily, one per item (in the
DataLoader's workers), so memory does not grow with the number of images."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import Tensor

from .base import ImageDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
LABEL_MODES = ("none", "folders")


def fit_square(image: Tensor, size: int) -> Tensor:
    """``(C, H, W)`` in [0, 1] -> ``(C, size, size)``: the shorter side resized to ``size``
    (aspect kept, antialiased), then the centre cropped: nothing is squashed."""
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    new = (max(size, round(h * scale)), max(size, round(w * scale)))
    if (h, w) != new:
        image = torch.nn.functional.interpolate(image[None], size=new, mode="bilinear",
                                                align_corners=False, antialias=True)[0]
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return image[:, top:top + size, left:left + size].clamp(0, 1)


class ImageFolderDataset(ImageDataset):
    """Images under ``root``, read on demand. With ``labels="folders"`` the first-level
    subfolders are the classes (sorted names, as torchvision's ImageFolder)."""

    def __init__(self, root: Path, size: int, channels: int, labels: str) -> None:
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

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        with Image.open(self.files[index]) as file:
            image = pil_to_tensor(file.convert("L" if self.channels == 1 else "RGB"))
        return fit_square(image.float() / 255.0, self.size[0]), self.labels[index]


def build_image_folder(split: str | None = None, root: str = "", size: int = 32,
                       channels: int = 3, labels: str = "none") -> ImageFolderDataset:
    """Images under ``root`` (recursively), the shorter side resized to ``size`` and centre
    cropped. ``labels: folders`` takes class subfolders as labels; ``split`` names a
    subfolder of ``root`` (e.g. train/val) when it exists."""
    folder = Path(root)
    if not root or not folder.is_dir():
        raise ValueError(f"root '{root}' is not a folder; set data.<section>.root to a folder "
                         "of images")
    if split and (folder / split).is_dir():
        folder = folder / split
    return ImageFolderDataset(folder, size, channels, labels)


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
        tensor = pil_to_tensor(image).float() / 255.0
        if self.size_override:
            tensor = fit_square(tensor, self.size_override)
        return tensor, int(label)


def build_torchvision(split: str | None = None, variant: str = "", root: str = "data",
                      size: int | None = None) -> ImageDataset:
    """``torchvision:<Name>``: a torchvision dataset already on disk under ``root``.

    Never downloads. ``split`` is passed as ``train=`` or ``split=`` for datasets that take
    one; for folder datasets (ImageFolder) it names a subfolder of ``root`` when given.
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
    return _TorchvisionAdapter(dataset, size)
