"""The knowledge-distillation term shared by every logit-distilling algorithm.

``kd`` is this term alone; ``cfl``, ``layerwise``, ``recombination`` and a freshly
scaffolded plugin add their own terms to it. Their configs derive from
:class:`KDTermConfig`, so the same three keys (``temperature``, ``merge``, ``kd_weight``)
mean the same thing in each, and a config written for one runs with another by changing
``algorithm.name``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from pydantic import Field
from torch import Tensor

from .amalgamator import AmalgamatorConfig
from .interfaces import Batch, Task, Teacher
from .merging import LogitMerger, MergeMode


class KDTermConfig(AmalgamatorConfig):
    """Fields of the shared KD term; an algorithm's config subclasses this to get them."""

    temperature: float = Field(
        1.0, gt=0, description="Softmax temperature T of the KD term. A higher T flattens the "
        "teachers' relative weights in the merged distribution.")
    merge: MergeMode = Field(
        "learned", description="How teacher logits are merged into the KD target (see "
        "kamal.merging): 'learned' gates them with a small network fitted on the transfer data "
        "to which teacher each image belongs, judged by how steady each teacher's prediction "
        "is over nine shifted copies and where the image lies among the classes in all "
        "the teachers' features (calibration reads each image nine times); 'feature-density' "
        "fits the same gate to where the image lies among the classes alone; "
        "'standardize' weighs each teacher by its confidence and 'energy' by its free energy, "
        "z-scored on the transfer data (one pass); 'auto' picks among those three by how "
        "steady the merged targets are over the shifted copies of held-out transfer images; "
        "'naive' concatenates raw logits as KamalEngine did.")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the KD term (0 switches it off).")


class KDTerm:
    """KL(merged teachers || student) at temperature T, per student classification task.

    ``merger`` (a :class:`~kamal.merging.LogitMerger`) holds the calibration; return it from
    ``trainable_modules`` under the name ``"merger"`` so it is checkpointed with the run.
    """

    def __init__(self, config: KDTermConfig, teachers: Sequence[Teacher],
                 student_tasks: Sequence[Task]) -> None:
        self.config = config
        self.tasks = list(student_tasks)
        self.merger = LogitMerger(teachers, student_tasks, config.merge)

    def calibrate(self, teachers: Sequence[Teacher], images: Iterable[Tensor],
                  device: torch.device | None = None) -> None:
        """Measure the merge's calibration on unlabeled images (consumes ``images``)."""
        if device is not None:
            self.merger.to(device)
        self.merger.calibrate(teachers, images, device)

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        """``{"kd/<task>": weighted loss}`` for every merged classification task."""
        merged = self.merger(batch.teacher_outputs)
        return {f"kd/{task.name}": self.config.kd_weight * task.distill_loss(
                    batch.student_outputs[task.name], merged[task.name], self.config.temperature)
                for task in self.tasks if task.name in merged}
