"""Images paired with dense targets (segmentation masks, depth maps), in memory or on disk.

Items are ``(image, targets)``: ``image`` a (3, H, W) float tensor in [0, 1], ``targets`` a
dict with ``"segmentation"`` (H, W) long class indices (-1 = ignore) and/or ``"depth"``
(1, H, W) float depth (<= 0 = no measurement), and optionally ``"classification"``, one
class index per image. The default DataLoader collates the dict,
and each dense task picks its own entry.

:class:`PairedTransform` crops and flips an image and its targets identically.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ImageDataset, tensor_digest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
DEPTH_SUFFIXES = (".png", ".npy")


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(hw) != 2 or min(hw) < 8:
        raise ValueError(f"size must be an int or [height, width] of at least 8, got {size}")
    return hw  # type: ignore[return-value]


def resize_image(image: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of one (C, H, W) image."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=tuple(size), mode="bilinear",
                         align_corners=False)[0].clamp(0, 1)


def resize_nearest(target: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest resize of a mask (H, W) or depth map (1, H, W): never blends labels or depths."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    squeeze = target.dim() == 2
    x = target[None, None] if squeeze else target[None]
    out = F.interpolate(x.float(), size=tuple(size), mode="nearest-exact")[0]
    out = out[0] if squeeze else out
    return out.to(target.dtype)


class PairedTransform:
    """Random horizontal flip and random crop (resized back), identical for image and targets.

    The crop keeps a random window of ``scale`` (a fraction of each side, drawn from
    ``[min_scale, 1]``) and resizes it to the original size: bilinear for the image,
    nearest for masks and depth (so no label or depth is ever interpolated). Depth values
    are unchanged: a crop is a longer focal length, not a closer camera. Randomness comes
    from torch's global generator, which kamal seeds and checkpoints.
    """

    def __init__(self, min_scale: float = 0.85, flip: bool = True) -> None:
        if not 0 < min_scale <= 1:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        self.min_scale = min_scale
        self.flip = flip

    def draw(self, size: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        """``(flip, top, left, crop height, crop width)`` for images of ``size``."""
        h, w = size
        flip = bool(torch.rand((), generator=generator) < 0.5) if self.flip else False
        top, left, ch, cw = 0, 0, h, w
        if self.min_scale < 1:
            scale = float(self.min_scale + (1 - self.min_scale) * torch.rand((), generator=generator))
            ch, cw = max(1, math.floor(h * scale)), max(1, math.floor(w * scale))
            top = int(torch.randint(0, h - ch + 1, (), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (), generator=generator))
        return torch.tensor([float(flip), top, left, ch, cw], dtype=torch.float64)

    def apply(self, image: Tensor, targets: dict[str, Tensor],
              params: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The flip and crop ``params`` (:meth:`draw`) applied to an image and its targets."""
        flip, top, left, ch, cw = (int(v) for v in params.tolist())
        h, w = image.shape[-2:]
        if flip:
            image = image.flip(-1)
            targets = {k: v.flip(-1) for k, v in targets.items()}
        if self.min_scale < 1:
            image = resize_image(image[..., top:top + ch, left:left + cw], (h, w))
            targets = {k: resize_nearest(v[..., top:top + ch, left:left + cw], (h, w))
                       for k, v in targets.items()}
        return image, targets

    def __call__(self, image: Tensor,
                 targets: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return self.apply(image, targets, self.draw(image.shape[-2:]))


class PairedDataset(ImageDataset):
    """Images with dense targets held in memory (images as uint8 to keep memory small).

    ``images`` (N, 3, H, W) uint8 or float in [0, 1]; ``masks`` (N, H, W) integer class
    indices (-1 ignore) or None; ``depths`` (N, 1, H, W) float or None; ``classes`` names the
    mask indices; ``labels`` (N,), optional, one index into ``classes`` per image (-1: none),
    given as the ``classification`` target (unchanged by the paired crops and flips).
    """

    in_memory = True

    labelled = True  # dense targets (masks and/or depth) even without class names

    def __init__(self, images: Tensor, masks: Tensor | None, depths: Tensor | None,
                 classes: Sequence[str] | None, transform: PairedTransform | None = None,
                 labels: Tensor | None = None) -> None:
        if masks is None and depths is None:
            raise ValueError("a paired dataset needs masks, depth maps or both")
        if images.dtype != torch.uint8:
            images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        self.images = images.contiguous()
        self.masks = None if masks is None else masks.to(torch.int16).contiguous()
        self.depths = None if depths is None else depths.float().contiguous()
        self.labels = None if labels is None else labels.long().contiguous()
        self.classes = None if classes is None else [str(c) for c in classes]
        self.channels = int(images.shape[1])
        self.size = (int(images.shape[2]), int(images.shape[3]))
        self.transform = transform
        self.augmented = transform is not None
        self._digest = ""

    def without_augmentation(self) -> PairedDataset:
        plain = copy.copy(self)
        plain.transform, plain.augmented = None, False
        return plain

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def fingerprint(self) -> str:
        if not self._digest:  # the images do not change: hash them once
            self._digest = tensor_digest(self.images)
        return self._digest

    def draw_augmentation(self, generator: torch.Generator | None = None) -> Tensor:
        if self.transform is None:
            raise NotImplementedError("this paired dataset is not augmented")
        return self.transform.draw(self.size, generator)

    def augmented_source(self, index: int,
                         params: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.transform is None:
            raise NotImplementedError("this paired dataset is not augmented")
        return self._item(index, lambda image, targets: self.transform.apply(  # type: ignore[union-attr]
            image, targets, params))

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self._item(index, self.transform)

    def _item(self, index: int, transform: Callable[[Tensor, dict[str, Tensor]], tuple[
            Tensor, dict[str, Tensor]]] | None) -> tuple[Tensor, dict[str, Tensor]]:
        image = self.images[index].float() / 255.0
        targets: dict[str, Tensor] = {}
        if self.masks is not None:
            targets["segmentation"] = self.masks[index].long()
        if self.depths is not None:
            targets["depth"] = self.depths[index]
        if transform is not None:
            image, targets = transform(image, targets)
        if self.labels is not None:
            targets["classification"] = self.labels[index]
        return image, targets


# --- folders on disk --------------------------------------------------------------------


def _find(folder: Path, stem: str, suffixes: Sequence[str]) -> Path | None:
    for suffix in suffixes:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def _read_rgb(path: Path) -> Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def _read_mask(path: Path, ignore_index: int) -> Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        if img.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"mask {path} is {img.mode}; masks must be single-channel PNGs of "
                             "class indices (not colour-coded)")
        array = np.asarray(img, dtype=np.int64)
    mask = torch.from_numpy(array.copy())
    return torch.where(mask == ignore_index, -1, mask)


def _read_depth(path: Path, depth_scale: float) -> Tensor:
    import numpy as np

    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False).astype(np.float32)
    else:
        from PIL import Image

        with Image.open(path) as img:
            array = np.asarray(img, dtype=np.float32) / depth_scale
    if array.ndim != 2:
        raise ValueError(f"depth map {path} has shape {array.shape}; expected (H, W)")
    return torch.from_numpy(array.copy())[None]


def build_paired_folder(split: str | None = None, root: str = "", size: int | list[int] = 64,
                        classes: list[str] | None = None, ignore_index: int = 255,
                        depth_scale: float = 1000.0, augment: bool = False) -> PairedDataset:
    """Paired data on disk, e.g. NYUv2 exported to files.

    Layout (``root/<split>/`` when ``split`` is given, else ``root/``)::

        images/<name>.png|jpg   RGB images
        masks/<name>.png        class indices (``ignore_index`` = void)   [optional]
        depth/<name>.png|npy    16-bit PNG in units of 1/depth_scale, or float .npy [optional]
        classes.txt             one class name per line (or pass ``classes``)

    Everything is resized to ``size`` (image bilinear, masks and depth nearest).
    """
    base = Path(root)
    if not root or not base.is_dir():
        raise ValueError(f"root '{root}' is not a folder; set data.<section>.root to a folder "
                         "with images/ and masks/ and/or depth/")
    folder = base / split if split else base
    if not (folder / "images").is_dir():
        hint = f" (no split folder '{split}' with images/)" if split else ""
        raise ValueError(f"'{folder}' has no images/ folder{hint}")
    hw = _size(size)
    files = sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{folder / 'images'}'")
    has_masks, has_depth = (folder / "masks").is_dir(), (folder / "depth").is_dir()
    if not (has_masks or has_depth):
        raise ValueError(f"'{folder}' has neither masks/ nor depth/: nothing to learn or evaluate")
    images, masks, depths = [], [], []
    for file in files:
        images.append(resize_image(_read_rgb(file), hw))
        for present, sub, suffixes, out in ((has_masks, "masks", (".png",), masks),
                                            (has_depth, "depth", DEPTH_SUFFIXES, depths)):
            if not present:
                continue
            path = _find(folder / sub, file.stem, suffixes)
            if path is None:
                raise ValueError(f"image {file.name} has no {sub}/{file.stem}"
                                 f"{'|'.join(suffixes)}")
            target = (_read_mask(path, ignore_index) if sub == "masks"
                      else _read_depth(path, depth_scale))
            out.append(resize_nearest(target, hw))
    mask_tensor = torch.stack(masks) if has_masks else None
    names: list[str] | None = None
    if has_masks:
        if classes is not None:
            names = [str(c) for c in classes]
        elif (listing := _find(folder, "classes", (".txt",)) or _find(base, "classes", (".txt",))):
            names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        else:
            names = [str(i) for i in range(int(mask_tensor.max()) + 1)]  # type: ignore[union-attr]
        top = int(mask_tensor.max())  # type: ignore[union-attr]
        if top >= len(names):
            raise ValueError(f"masks hold class index {top} but only {len(names)} classes are "
                             "named; fix classes / classes.txt or set ignore_index")
    return PairedDataset(torch.stack(images), mask_tensor,
                         torch.stack(depths) if has_depth else None, names,
                         PairedTransform() if augment else None)
