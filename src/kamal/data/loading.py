"""How the training loop's DataLoader reads a dataset: worker processes, pinned memory.

Decoding and resizing images (an image folder of JPEGs) is CPU work that worker processes do
in parallel with the step; images already in memory as one tensor (digits, scenes) gain
nothing from workers but their start-up cost, so ``auto`` gives them none.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import Dataset

#: The most worker processes ``auto`` starts: on a GPU, decoding JPEGs is what limits
#: (docs/performance.md).
MAX_AUTO_WORKERS = 16


def resolve_workers(requested: int | str, dataset: Dataset) -> int:
    """``requested`` as a count: ``auto`` is 0 for in-memory datasets, else one per CPU
    core but one (the main process runs the step), at least 1, at most
    :data:`MAX_AUTO_WORKERS`."""
    if requested != "auto":
        return int(requested)
    if getattr(dataset, "in_memory", False):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_AUTO_WORKERS, (cores or 1) - 1))


def loader_options(workers: int, device: torch.device, augmented: bool) -> dict[str, Any]:
    """DataLoader keywords: ``workers`` processes; pinned memory when batches go to CUDA
    (an asynchronous copy); persistent workers only without random augmentation (a worker
    seeds its random state once, when it starts: kept across epochs, a resumed run could not
    draw the same augmentations as an uninterrupted one)."""
    return {"num_workers": workers, "pin_memory": device.type == "cuda",
            "persistent_workers": workers > 0 and not augmented}
