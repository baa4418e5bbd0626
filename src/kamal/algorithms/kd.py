"""``kd``: multi-teacher knowledge distillation on the merged teacher logits (the baseline).

Hinton et al., "Distilling the Knowledge in a Neural Network" (2015), applied to several
teachers: their logits are merged into the student's label space (see
:mod:`kamal.merging`) and the student matches the merged distribution at temperature T.
The term itself (:class:`~kamal.distillation.KDTerm`) is shared with the other algorithms.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from torch import Tensor, nn

from ..amalgamator import Amalgamator
from ..data.transforms import ViewBatch
from ..distillation import KDTerm, KDTermConfig
from ..interfaces import Batch, Student


class KDConfig(KDTermConfig):
    """Hyperparameters of ``kd``: the shared KD term's."""

    name: Literal["kd"] = "kd"


class KDAmalgamator(Amalgamator):
    """Multi-teacher KD: KL(merged teachers || student) per task, at temperature T."""

    name = "kd"
    Config = KDConfig
    config: KDConfig
    mixed_views = True  # it compares outputs only; the runner brings dense ones to the student

    def setup(self, student: Student, transfer_images: Iterable[Tensor | ViewBatch]) -> None:
        super().setup(student, transfer_images)
        self.kd = KDTerm(self.config, self.teachers, student.tasks)
        self.kd.calibrate(self.teachers, transfer_images, next(student.parameters()).device)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"merger": self.kd.merger}

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        return self.kd(batch)
