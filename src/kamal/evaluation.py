"""Metrics of models on labeled data, parameter counts and CPU latency."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .data.base import ImageDataset
from .data.transforms import ImageView, ViewBatch
from .data.views import LabelledView
from .interfaces import Task

Predict = Callable[[Any], dict[str, Tensor]]


@torch.no_grad()
def evaluate(predict: Predict, tasks: Sequence[Task], dataset: ImageDataset,
             device: torch.device, batch_size: int = 256,
             views: Sequence[ImageView] | None = None,
             with_targets: bool = False) -> dict[str, dict[str, float]]:
    """``{task: metrics}`` of ``predict`` on ``dataset`` (labels mapped into each task).

    With ``views``, ``predict`` reads the images through them: one view gives a tensor,
    several a :class:`~kamal.data.transforms.ViewBatch` (models pick their own view).
    Dense outputs are compared with the labels at the labels' size. ``with_targets`` calls
    ``predict(images, targets)`` (a reference that may read the labels, as the report's
    oracle gate does).
    """
    meters = {task.name: task.new_meter() for task in tasks}
    several = views is not None and len(views) > 1
    for images, targets in DataLoader(LabelledView(dataset, views), batch_size=batch_size,
                                      shuffle=False):
        if several:
            assert views is not None
            images = ViewBatch(dict(zip(views, images, strict=True)))
        images = images.to(device)
        outputs = predict(images, targets) if with_targets else predict(images)
        for task in tasks:
            mapped = task.map_targets(dataset.classes, targets)
            meters[task.name].update(outputs[task.name].float().cpu(), mapped)
    return {name: meter.compute() for name, meter in meters.items()}


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def cpu_latency_ms(module: torch.nn.Module, channels: int, size: Sequence[int],
                   repeats: int = 20) -> float:
    """Median CPU time of one image through ``module``, in milliseconds."""
    model = copy.deepcopy(module).cpu().eval()
    x = torch.rand(1, channels, *size)
    for _ in range(3):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 4)
