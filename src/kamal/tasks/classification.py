"""Classification: KL distillation at a temperature, top-1/top-5 accuracy, class-union merge."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import KamalError, ModelRepoError
from ..interfaces import Meter, Task


def pick_target(task: Task, targets: Any) -> Any:
    """The entry of a (batched) dict target that belongs to ``task``: by name, then by kind."""
    if not isinstance(targets, Mapping):
        return targets
    for key in (task.name, task.kind):
        if key in targets:
            return targets[key]
    raise KamalError(f"the data has no '{task.kind}' targets for task '{task.name}' (its "
                     f"targets are: {', '.join(map(str, targets)) or 'none'}); evaluate it on "
                     f"data with {task.kind} labels")


class AccuracyMeter(Meter):
    """Top-1 and top-5 accuracy over samples whose target is in the task (target >= 0)."""

    def __init__(self, num_classes: int) -> None:
        self.k = min(5, num_classes)
        self.correct1 = 0
        self.correctk = 0
        self.count = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        keep = target >= 0
        output, target = output[keep], target[keep]
        if target.numel() == 0:
            return
        topk = output.topk(self.k, dim=1).indices
        hits = topk == target[:, None]
        self.correct1 += int(hits[:, 0].sum())
        self.correctk += int(hits.any(dim=1).sum())
        self.count += int(target.numel())

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            return {}
        return {"top1": self.correct1 / self.count, f"top{self.k}": self.correctk / self.count,
                "samples": float(self.count)}


class NamedClassesTask(Task):
    """A task whose outputs are scores of distinct, named ``classes`` (one channel each, dim 1).

    Shared by classification and segmentation: teachers' tasks merge by the union of their
    class names, and a teacher's outputs are placed at the merged task's channels.
    """

    classes: list[str]  # one name per output channel, in channel order
    # True when the names were made up from output indices ("0", "1", ...) because the repo
    # had none: such names say nothing, so they must never be merged with another teacher's
    guessed_names: bool = False

    def __init__(self, name: str, classes: Sequence[str]) -> None:
        super().__init__(name)
        self.classes = [str(c) for c in classes]
        if not self.classes:
            raise ModelRepoError(f"{self.kind} task '{name}' has no classes")
        if len(set(self.classes)) != len(self.classes):
            raise ModelRepoError(f"{self.kind} task '{name}' repeats class names")

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if "classes" not in data:
            raise ModelRepoError(f"{cls.kind} task {data.get('name')!r} needs 'classes'")
        return cls(data["name"], data["classes"])

    @classmethod
    def merge(cls, tasks: Sequence[Task], name: str) -> Self:
        """Union of class names, in order of first appearance."""
        classes: list[str] = []
        for task in tasks:
            if not isinstance(task, cls):
                raise KamalError(f"cannot merge {task.kind} task '{task.name}' into {cls.kind}")
            classes += [c for c in task.classes if c not in classes]
        return cls(name, classes)

    def positions(self, teacher_task: NamedClassesTask) -> list[int]:
        """Index in this task of each of ``teacher_task``'s classes."""
        index = {c: i for i, c in enumerate(self.classes)}
        try:
            return [index[c] for c in teacher_task.classes]
        except KeyError as exc:
            raise ModelRepoError(f"class {exc} of task '{teacher_task.name}' is not in "
                                 f"task '{self.name}'") from None

    def embed(self, teacher_task: Task, output: Tensor) -> Tensor:
        """Teacher outputs (N, C_teacher, ...) placed at the merged channels; the classes the
        teacher does not know are ``-inf``."""
        if not isinstance(teacher_task, type(self)):
            raise KamalError(f"cannot embed {teacher_task.kind} outputs into {self.kind}")
        out = output.new_full((output.shape[0], self.num_outputs, *output.shape[2:]),
                              float("-inf"))
        out[:, self.positions(teacher_task)] = output
        return out

    def label_lookup(self, dataset_classes: Sequence[str], missing: int = -1) -> Tensor:
        """Dataset label index -> this task's index (``missing`` for classes it lacks), with
        one trailing ``missing`` entry for out-of-range labels."""
        index = {c: i for i, c in enumerate(self.classes)}
        return torch.tensor([index.get(str(c), missing) for c in dataset_classes] + [missing])


class ClassificationTask(NamedClassesTask):
    """Predict one of ``classes`` (named, so teachers with overlapping classes can merge)."""

    kind = "classification"
    primary_metric = "top1"

    def distill_loss(self, student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
        """Hinton's KL(teacher || student) at ``temperature``, scaled by T^2."""
        t = temperature
        return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                        reduction="batchmean", log_target=True) * (t * t)

    def supervised_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy over samples whose target is in the task (target >= 0)."""
        return F.cross_entropy(output, target, ignore_index=-1)

    def new_meter(self) -> AccuracyMeter:
        return AccuracyMeter(self.num_outputs)

    def map_targets(self, dataset_classes: Sequence[str] | None, targets: Any) -> Tensor:
        """Dataset label indices -> this task's indices; classes outside the task become -1.

        Dict targets (a dataset with several kinds of label) give their ``classification``
        entry."""
        targets = torch.as_tensor(pick_target(self, targets))
        if dataset_classes is None:
            return targets
        # -1 (unlabeled) maps to the trailing -1
        return self.label_lookup(dataset_classes)[targets.clamp(min=-1)]
