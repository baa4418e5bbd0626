"""Merging several teachers' classification logits into the student's label space.

Teachers trained separately are not calibrated to each other: one teacher's logits can be
several times larger than another's, and a naive concatenation then lets that teacher win
the joint softmax even on images it knows nothing about (on kamal's own digits teachers:
the "ensemble (naive)" column of the Quality section of docs/benchmarks.md, written by
benchmarks/quality.py).

``standardize`` (the default) treats the teachers as a mixture of experts and needs no
labels. Each teacher ``i`` gives class probabilities *given that the image is one of its
classes*, ``log_softmax(logits_i)``; how much the image belongs to teacher ``i`` is judged
by its confidence, the centred max logit, z-scored with the mean and spread measured on the
unlabeled transfer data (so every teacher's confidence is on the same scale). The merged
logit of class ``c`` of teacher ``i`` is ``log_softmax(logits_i)[c] + z_i``. ``energy``
is the same with the teacher's free energy as its score, ``logsumexp(logits_i)`` (Liu et
al., "Energy-based Out-of-distribution Detection", NeurIPS 2020: in-domain images get
higher scores than the max logit alone tells). ``naive`` concatenates raw logits, as
KamalEngine did. Classes that several teachers share are averaged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .interfaces import Task, Teacher
from .tasks.classification import ClassificationTask

MergeMode = Literal["standardize", "energy", "naive"]


class LogitMerger(nn.Module):
    """Maps ``teacher_outputs`` (one dict per teacher) to ``{merged_task: logits}``.

    Only classification tasks are merged; call :meth:`calibrate` once on unlabeled images
    before use when ``mode="standardize"``. The scales are buffers, so they are saved in
    checkpoints with the run.
    """

    def __init__(self, teachers: Sequence[Teacher], student_tasks: Sequence[Task],
                 mode: MergeMode = "standardize") -> None:
        super().__init__()
        self.mode = mode
        self.targets = [t for t in student_tasks if isinstance(t, ClassificationTask)]
        # (teacher index, teacher task) pairs feeding each merged task
        self.sources: dict[str, list[tuple[int, ClassificationTask]]] = {
            target.name: [(i, task) for i, teacher in enumerate(teachers) for task in teacher.tasks
                          if isinstance(task, ClassificationTask)]
            for target in self.targets}
        self.register_buffer("confidence_mean", torch.zeros(len(teachers)))
        self.register_buffer("confidence_std", torch.ones(len(teachers)))

    @torch.no_grad()
    def calibrate(self, teachers: Sequence[Teacher], images: Iterable[Tensor],
                  device: torch.device | None = None) -> None:
        """Measure each teacher's confidence statistics on unlabeled images.

        ``images`` is consumed in every mode, ``naive`` included (which needs no statistics
        and runs no teacher): callers such as cfl watch the iterator to keep leading batches.
        """
        if self.mode == "naive":
            for _ in images:
                pass
            return
        scores: list[list[Tensor]] = [[] for _ in teachers]
        for batch in images:
            batch = batch.to(device) if device is not None else batch
            for i, teacher in enumerate(teachers):
                outputs = teacher(batch)
                for task in teacher.tasks:
                    if isinstance(task, ClassificationTask):
                        scores[i].append(self.score(outputs[task.name]).double().cpu())
        for i, values in enumerate(scores):
            if values:
                joined = torch.cat(values)
                self.confidence_mean[i] = joined.mean()
                self.confidence_std[i] = joined.std().clamp_min(1e-6) if joined.numel() > 1 else 1.0

    def forward(self, teacher_outputs: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        merged = {}
        for target in self.targets:
            total, count = None, None
            for i, task in self.sources[target.name]:
                logits = teacher_outputs[i][task.name]
                if self.mode != "naive":
                    logits = torch.log_softmax(logits, dim=1) + self.membership(i, logits)[:, None]
                placed = target.embed(task, logits)
                known = torch.isfinite(placed)
                placed = torch.where(known, placed, torch.zeros_like(placed))
                total = placed if total is None else total + placed
                count = known.float() if count is None else count + known.float()
            assert total is not None and count is not None
            merged[target.name] = total / count.clamp_min(1.0)
        return merged


    def membership(self, teacher: int, logits: Tensor) -> Tensor:
        """The gate: how much each sample belongs to teacher ``teacher`` (its score z-scored
        with the transfer data's statistics), the term its log-probabilities are shifted by."""
        return (self.score(logits) - self.confidence_mean[teacher]) / self.confidence_std[teacher]

    def score(self, logits: Tensor) -> Tensor:
        """How much each sample belongs to the teacher giving ``logits``, before z-scoring:
        the centred max logit (``standardize``) or the free energy (``energy``)."""
        return torch.logsumexp(logits, dim=1) if self.mode == "energy" else confidence(logits)


def confidence(logits: Tensor) -> Tensor:
    """A teacher's confidence per sample: its max logit minus the mean logit."""
    return logits.max(dim=1).values - logits.mean(dim=1)


def oracle_merge(target: ClassificationTask, sources: Sequence[tuple[int, ClassificationTask]],
                 teacher_outputs: Sequence[dict[str, Tensor]], labels: Tensor) -> Tensor:
    """The ceiling of any gate: each image routed to the teacher(s) whose classes hold its
    true label (``labels``, in ``target``'s indices, -1 unknown), their log-probabilities
    averaged over the classes they know; other classes ``-inf``. Uses evaluation labels:
    for the report's ceiling only, never for training."""
    total, count = None, None
    rows = labels.clamp_min(0)[:, None]
    for i, task in sources:
        placed = target.embed(task, torch.log_softmax(teacher_outputs[i][task.name], dim=1))
        known = torch.isfinite(placed)
        owner = known.gather(1, rows) & (labels[:, None] >= 0)  # this teacher knows the label
        use = known & owner
        part = torch.where(use, placed, torch.zeros_like(placed))
        total = part if total is None else total + part
        count = use.float() if count is None else count + use.float()
    assert total is not None and count is not None
    return torch.where(count > 0, total / count.clamp_min(1.0), torch.full_like(total, float("-inf")))
