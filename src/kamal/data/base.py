"""The dataset contract: items are ``(image in [0, 1], label)``, label -1 when unknown."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..plugins import get_registry


class ImageDataset(Dataset):
    """Base for kamal datasets.

    ``classes`` names the label indices (``None`` for unlabeled data); ``channels`` and
    ``size`` describe the images; ``augmented`` says whether items are random (then
    teacher outputs cannot be cached); ``in_memory`` whether items are ready tensors (then
    DataLoader workers only add their start-up cost: ``data.workers: auto`` starts none).
    """

    classes: list[str] | None = None
    channels: int = 3
    size: tuple[int, int] = (32, 32)
    augmented: bool = False
    in_memory: bool = False

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def labelled(self) -> bool:
        """Whether items carry labels that metrics can be computed against."""
        return self.classes is not None

    def without_augmentation(self) -> ImageDataset:
        """The same images without random augmentation, what calibration reads (a dataset
        that cannot switch it off returns itself)."""
        return self


class TensorImageDataset(ImageDataset):
    """Images held in memory as one tensor, with optional random-shift augmentation."""

    in_memory = True

    def __init__(self, images: Tensor, labels: Tensor, classes: Sequence[str] | None,
                 augment_shift: int = 0) -> None:
        self.images = images.float().contiguous()
        self.labels = labels.long()
        self.classes = None if classes is None else [str(c) for c in classes]
        self.channels = int(images.shape[1])
        self.size = (int(images.shape[2]), int(images.shape[3]))
        self.augment_shift = augment_shift
        self.augmented = augment_shift > 0

    def without_augmentation(self) -> TensorImageDataset:
        plain = copy.copy(self)
        plain.augment_shift, plain.augmented = 0, False
        return plain

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.augment_shift:
            s = self.augment_shift
            dx, dy = torch.randint(-s, s + 1, (2,)).tolist()
            image = torch.roll(F.pad(image, (s, s, s, s)), (dy, dx), dims=(1, 2))[:, s:-s, s:-s]
        return image, int(self.labels[index])


def resize(images: Tensor, size: int | Sequence[int]) -> Tensor:
    """Bilinear resize of an ``(N, C, H, W)`` batch to ``size``."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == hw:
        return images
    return F.interpolate(images, size=hw, mode="bilinear", align_corners=False).clamp(0, 1)


def split_data_ref(text: str) -> tuple[str, str | None]:
    """``DATASET[:SPLIT]`` -> ``(dataset, split)``, where a dataset name may itself hold a
    colon: ``torchvision:ImageFolder`` is a family and its variant, ``digits:test`` a dataset
    and its split, ``torchvision:CIFAR10:test`` both."""
    family, _, rest = text.partition(":")
    if not rest:
        return text, None
    builder = get_registry().get("datasets", family)
    if "variant" in inspect.signature(builder).parameters:
        variant, _, split = rest.partition(":")
        return f"{family}:{variant}", split or None
    return family, rest


def build_dataset(name: str, split: str | None = None, options: dict[str, Any] | None = None,
                  key: str = "data") -> ImageDataset:
    """Build a registered dataset; ``"family:variant"`` names call ``family`` with ``variant``.

    ``key`` is the config path used in error messages.
    """
    options = dict(options or {})
    family, _, variant = name.partition(":")
    builder = get_registry().get("datasets", family)
    if variant:
        options["variant"] = variant
    params = inspect.signature(builder).parameters
    unknown = [k for k in options if k not in params]
    if unknown:
        allowed = [k for k in params if k not in ("split", "variant")]
        raise ConfigError(f"{key}.{unknown[0]}: dataset '{family}' has no option "
                          f"{unknown[0]!r}; its options are: {', '.join(allowed) or 'none'}")
    try:
        return builder(split=split, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: dataset '{name}' rejected {options or 'its options'}: {exc}") from exc
