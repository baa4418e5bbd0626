"""scikit-learn's 8x8 handwritten digits (1,797 images, shipped with scikit-learn).

Fixed stratified splits (seeded, so identical everywhere): ``train`` 40% (for teachers and
supervised references), ``transfer`` 30% (unlabeled data for amalgamation), ``test`` 30%;
``all`` is everything. ``classes`` selects a subset, e.g. ``[0, 1, 2, 3, 4]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .base import TensorImageDataset, resize

SPLITS = ("train", "transfer", "test", "all")
_SPLIT_SEED = 20190101


def _split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    train, rest = train_test_split(index, train_size=0.4, stratify=labels, random_state=_SPLIT_SEED)
    transfer, test = train_test_split(rest, train_size=0.5, stratify=labels[rest],
                                      random_state=_SPLIT_SEED)
    return {"train": np.sort(train), "transfer": np.sort(transfer), "test": np.sort(test),
            "all": index}


def build_digits(split: str | None = "all", classes: Sequence[int | str] | None = None,
                 size: int = 8, augment: bool = False) -> TensorImageDataset:
    """The digits split ``split``, optionally restricted to ``classes`` and resized to ``size``.

    ``augment`` adds random shifts of up to 1 pixel per 8 pixels of size.
    """
    from sklearn.datasets import load_digits

    split = split or "all"
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}', choose one of {', '.join(SPLITS)}")
    if size < 4:
        raise ValueError(f"size must be at least 4, got {size}")
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    index = _split_indices(labels)[split]
    names = [str(c) for c in range(10)] if classes is None else [str(c) for c in classes]
    bad = [c for c in names if c not in {str(d) for d in range(10)}]
    if bad or len(set(names)) != len(names) or not names:
        raise ValueError(f"classes must be distinct digits 0-9, got {list(classes or [])}")
    wanted = [int(c) for c in names]
    index = index[np.isin(labels[index], wanted)]
    images = torch.from_numpy(digits.images[index].astype(np.float32) / 16.0)[:, None]
    remap = {d: i for i, d in enumerate(wanted)}
    targets = torch.tensor([remap[int(y)] for y in labels[index]], dtype=torch.long)
    return TensorImageDataset(resize(images, size), targets, names,
                              augment_shift=max(1, size // 8) if augment else 0)
