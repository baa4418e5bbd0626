"""``kd``: multi-teacher knowledge distillation on the merged teacher logits (the baseline).

Hinton et al., "Distilling the Knowledge in a Neural Network" (2015), applied to several
teachers: their logits are merged into the student's label space (see
:mod:`kamal.merging`) and the student matches the merged distribution at temperature T.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from ..interfaces import Amalgamator, AmalgamatorConfig, Batch, Student
from ..merging import LogitMerger


class KDConfig(AmalgamatorConfig):
    """Hyperparameters of ``kd``."""

    name: Literal["kd"] = "kd"
    temperature: float = Field(
        1.0, gt=0, description="Softmax temperature T of the KL loss. A higher T flattens the "
        "teachers' relative weights in the merged distribution.")
    merge: Literal["standardize", "naive"] = Field(
        "standardize", description="How teacher logits are merged: 'standardize' weighs each "
        "teacher by its confidence z-scored on the transfer data (see kamal.merging); 'naive' "
        "concatenates raw logits as KamalEngine did.")
    weight: float = Field(1.0, gt=0, description="Weight of the KD loss.")


class KDAmalgamator(Amalgamator):
    """Multi-teacher KD: KL(merged teachers || student) per task, at temperature T."""

    name = "kd"
    Config = KDConfig
    config: KDConfig

    def setup(self, student: Student, transfer_images: Iterable[Tensor]) -> None:
        super().setup(student, transfer_images)
        self.merger = LogitMerger(self.teachers, student.tasks, self.config.merge)
        self.merger.calibrate(self.teachers, transfer_images, next(student.parameters()).device)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"merger": self.merger}

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        assert self.student is not None
        merged = self.merger(batch.teacher_outputs)
        return {f"kd/{task.name}": self.config.weight * task.distill_loss(
                    batch.student_outputs[task.name], merged[task.name], self.config.temperature)
                for task in self.student.tasks if task.name in merged}
