"""Dense tasks: per-pixel ``segmentation`` (named classes) and ``depth`` regression.

Targets of a dense dataset are dicts keyed by task kind, e.g.
``{"segmentation": mask (H, W) long, "depth": (1, H, W) float}``; each task picks its own
entry in :meth:`~kamal.Task.map_targets`. Mask value ``-1`` means "ignore this pixel" (void,
or a class the task does not know); a depth target ``<= 0`` or not finite means "no
measurement" (the holes of a Kinect depth map).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import KamalError, ModelRepoError
from ..interfaces import Meter, Task
from .classification import NamedClassesTask, pick_target

IGNORE = -1
DepthLoss = Literal["l1", "berhu"]


def _match_size(output: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of a prediction map to the target's (H, W) when they differ."""
    if tuple(output.shape[-2:]) == tuple(size):
        return output
    return F.interpolate(output, size=tuple(size), mode="bilinear", align_corners=False)


# --- segmentation ---------------------------------------------------------------------


def pixel_kl(student: Tensor, teacher: Tensor, temperature: float = 1.0,
             mask: Tensor | None = None) -> Tensor:
    """Mean over pixels of KL(teacher || student) on channel dim 1, scaled by T^2.

    Teacher logits of ``-inf`` (classes the teacher does not know) contribute nothing.
    ``mask`` (N, H, W) bool keeps only the pixels where it is True.
    """
    t = temperature
    log_p = F.log_softmax(teacher / t, dim=1)
    log_q = F.log_softmax(student / t, dim=1)
    p = log_p.exp()
    per_pixel = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=1)
    if mask is not None:
        per_pixel = per_pixel[mask]
        if per_pixel.numel() == 0:
            return student.sum() * 0.0
    return per_pixel.mean() * (t * t)


class SegmentationMeter(Meter):
    """Confusion matrix over non-ignored pixels: mIoU (classes that occur) and pixel accuracy."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, output: Tensor, target: Tensor) -> None:
        target = target.long()
        pred = _match_size(output, target.shape[-2:]).argmax(dim=1)
        keep = (target >= 0) & (target < self.num_classes)
        index = target[keep] * self.num_classes + pred[keep]
        self.confusion += torch.bincount(index, minlength=self.num_classes ** 2).view(
            self.num_classes, self.num_classes)

    def compute(self) -> dict[str, float]:
        total = int(self.confusion.sum())
        if total == 0:
            return {}
        hits = self.confusion.diag().double()
        union = self.confusion.sum(0).double() + self.confusion.sum(1).double() - hits
        present = union > 0  # classes neither in the targets nor predicted do not count
        iou = hits[present] / union[present]
        return {"miou": float(iou.mean()), "pixel_acc": float(hits.sum() / total),
                "pixels": float(total)}


class SegmentationTask(NamedClassesTask):
    """Per-pixel classification into named ``classes``; outputs are (N, classes, H, W) logits."""

    kind = "segmentation"
    primary_metric = "miou"

    def distill_loss(self, student: Tensor, teacher: Tensor, temperature: float = 1.0,
                     mask: Tensor | None = None) -> Tensor:
        """Pixel-wise KL(teacher || student) at ``temperature``, scaled by T^2."""
        return pixel_kl(student, teacher, temperature, mask)

    def supervised_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy over pixels whose target is not ignored (-1)."""
        target = target.long()
        if not bool((target >= 0).any()):
            return output.sum() * 0.0
        return F.cross_entropy(_match_size(output, target.shape[-2:]), target,
                               ignore_index=IGNORE)

    def resize_output(self, output: Tensor, size: Sequence[int]) -> Tensor:
        """Bilinear resize of the map to ``size`` (logits and depths blend smoothly)."""
        return _match_size(output, size)

    def new_meter(self) -> SegmentationMeter:
        return SegmentationMeter(self.num_outputs)

    def map_targets(self, dataset_classes: Sequence[str] | None, targets: Any) -> Tensor:
        """The dataset's masks in this task's class indices; unknown classes and void -> -1."""
        masks = torch.as_tensor(pick_target(self, targets)).long()
        if dataset_classes is None:
            return masks
        lookup = self.label_lookup(dataset_classes, IGNORE)
        n = len(dataset_classes)
        return lookup[torch.where((masks < 0) | (masks >= n), n, masks)]


# --- depth ----------------------------------------------------------------------------


def valid_depth(target: Tensor) -> Tensor:
    """Pixels with a depth measurement: finite and positive."""
    return torch.isfinite(target) & (target > 0)


def berhu(diff: Tensor, threshold: float = 0.2) -> Tensor:
    """Reverse Huber (Laina et al. 2016): L1 below ``c``, scaled L2 above, ``c = 0.2 max|d|``."""
    abs_diff = diff.abs()
    c = (threshold * abs_diff.max()).detach().clamp_min(1e-6)
    return torch.where(abs_diff <= c, abs_diff, (abs_diff ** 2 + c ** 2) / (2 * c))


def depth_loss(prediction: Tensor, target: Tensor, kind: DepthLoss = "l1",
               mask: Tensor | None = None) -> Tensor:
    """Mean L1 or berHu between depth maps over the pixels in ``mask`` (all when None)."""
    diff = prediction - target
    if mask is not None:
        diff = diff[mask]
        if diff.numel() == 0:
            return prediction.sum() * 0.0
    if kind == "l1":
        return diff.abs().mean()
    if kind == "berhu":
        return berhu(diff).mean()
    raise KamalError(f"unknown depth loss '{kind}'; use l1 or berhu")


class DepthMeter(Meter):
    """RMSE, AbsRel and delta<1.25 over all pixels with a depth measurement."""

    def __init__(self) -> None:
        self.squared = 0.0
        self.relative = 0.0
        self.delta1 = 0.0
        self.count = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        target = target.float()
        if target.dim() == output.dim() - 1:
            target = target.unsqueeze(1)
        pred = _match_size(output, target.shape[-2:]).double()
        keep = valid_depth(target)
        pred, target = pred[keep], target[keep].double()
        if target.numel() == 0:
            return
        clamped = pred.clamp_min(1e-3)  # ratios need a positive prediction
        self.squared += float(((pred - target) ** 2).sum())
        self.relative += float(((pred - target).abs() / target).sum())
        self.delta1 += float((torch.maximum(clamped / target, target / clamped) < 1.25).sum())
        self.count += int(target.numel())

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            return {}
        n = self.count
        return {"rmse": (self.squared / n) ** 0.5, "abs_rel": self.relative / n,
                "delta1": self.delta1 / n, "pixels": float(n)}


class DepthTask(Task):
    """Per-pixel depth regression; outputs are (N, 1, H, W) depth maps in the data's unit.

    ``loss`` is the distance used for distillation and supervised training: ``l1`` or
    ``berhu`` (reverse Huber).
    """

    kind = "depth"
    primary_metric = "rmse"
    higher_is_better = False

    def __init__(self, name: str, loss: DepthLoss = "l1") -> None:
        super().__init__(name)
        if loss not in ("l1", "berhu"):
            raise ModelRepoError(f"depth task '{name}': unknown loss '{loss}'; use l1 or berhu")
        self.loss: DepthLoss = loss

    @property
    def num_outputs(self) -> int:
        return 1

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "loss": self.loss}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DepthTask:
        return cls(data["name"], data.get("loss", "l1"))

    def distill_loss(self, student: Tensor, teacher: Tensor, temperature: float = 1.0,
                     mask: Tensor | None = None, loss: DepthLoss | None = None) -> Tensor:
        """L1 (or berHu) between the student's and the teacher's depth; T is not used."""
        keep = None if mask is None else mask.unsqueeze(1).expand_as(student)
        return depth_loss(student, teacher, loss or self.loss, keep)

    def supervised_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The task's loss over pixels with a depth measurement."""
        target = target.float()
        if target.dim() == output.dim() - 1:
            target = target.unsqueeze(1)
        output = _match_size(output, target.shape[-2:])
        return depth_loss(output, target, self.loss, valid_depth(target))

    def resize_output(self, output: Tensor, size: Sequence[int]) -> Tensor:
        """Bilinear resize of the map to ``size`` (logits and depths blend smoothly)."""
        return _match_size(output, size)

    def new_meter(self) -> DepthMeter:
        return DepthMeter()

    @classmethod
    def merge(cls, tasks: Sequence[Task], name: str) -> DepthTask:
        """One depth output; teachers' depth maps are averaged by whoever combines them."""
        for task in tasks:
            if not isinstance(task, DepthTask):
                raise KamalError(f"cannot merge {task.kind} task '{task.name}' into depth")
        return cls(name, tasks[0].loss)  # type: ignore[attr-defined]

    def embed(self, teacher_task: Task, output: Tensor) -> Tensor:
        """Depth needs no re-indexing: the teacher's map as is."""
        if not isinstance(teacher_task, DepthTask):
            raise KamalError(f"cannot embed {teacher_task.kind} outputs into depth")
        return output

    def map_targets(self, dataset_classes: Sequence[str] | None, targets: Any) -> Tensor:
        """The dataset's depth maps as (N, 1, H, W) floats (holes stay <= 0)."""
        depth = torch.as_tensor(pick_target(self, targets)).float()
        return depth.unsqueeze(1) if depth.dim() == 3 else depth
