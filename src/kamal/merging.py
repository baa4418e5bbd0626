"""Merging several teachers' classification logits into the student's label space.

Each teacher knows only its own classes and cannot say "this image is not one of mine", so
merging is *gating*: per image, how much each teacher's answer counts. Every merge reads
the teachers as a mixture of experts — teacher ``i`` gives class probabilities given that
the image is one of its classes, ``log_softmax(logits_i)`` — and differs in the gate:

- ``naive``: none; raw logits concatenated, as KamalEngine did (the louder teacher wins).
- ``standardize``: the teacher's centred max logit, z-scored with its statistics on the
  unlabeled transfer data, added to its log-probabilities. One pass.
- ``energy``: the same with its free energy, ``logsumexp(logits_i)`` (Liu et al.,
  "Energy-based Out-of-distribution Detection", NeurIPS 2020).
- ``learned`` (the default of the KD term): a gate fitted on the transfer data to how
  steady each teacher's prediction is over shifted copies of each image, refined by where
  the image lies among the classes in all the teachers' features (:mod:`kamal.gating`);
  the merge is the mixture ``sum_i g_i p_i(c)``. Nine passes.
- ``feature-density``: the same gate fitted to owners from the class-conditional Gaussian
  mixture in the teachers' joint features alone, every teacher trusted alike at the start
  (Lee et al., NeurIPS 2018, over the union of the teachers' classes). Nine passes too.
- ``auto``: whichever of ``standardize``, ``energy`` and ``learned`` gives merged targets
  that agree most across shifted copies of held-out transfer images.

Classes are matched by name; a class several teachers know is averaged over them (fixed
gates) or summed as a mixture (learned). docs/concepts.md explains each merge with the
measured figures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .data.transforms import ViewBatch
from .gating import LearnedGate, TeacherReadings, read_teachers
from .interfaces import Task, Teacher
from .tasks.classification import ClassificationTask

MergeMode = Literal["standardize", "energy", "learned", "feature-density", "auto", "naive"]
#: The merges that fit a :class:`~kamal.gating.LearnedGate` (nine teacher passes).
GATED: tuple[MergeMode, ...] = ("learned", "feature-density")
#: The merges ``auto`` chooses from, in order of preference on a tie.
AUTO_CANDIDATES: tuple[MergeMode, ...] = ("standardize", "energy", "learned")


class LogitMerger(nn.Module):
    """Maps ``teacher_outputs`` (one dict per teacher) to ``{merged_task: logits}``.

    Only classification tasks are merged; call :meth:`calibrate` once on unlabeled images
    before use (every mode but ``naive`` measures something there). What it measures is held
    in buffers, so it is saved in checkpoints with the run; nothing in it is trained by the
    run's optimizer.
    """

    def __init__(self, teachers: Sequence[Teacher], student_tasks: Sequence[Task],
                 mode: MergeMode = "standardize") -> None:
        super().__init__()
        self.mode = mode
        self.targets = [t for t in student_tasks if isinstance(t, ClassificationTask)]
        # every (teacher index, teacher task) pair that is classification, in teacher order
        self.classified = [(i, task) for i, teacher in enumerate(teachers) for task in teacher.tasks
                           if isinstance(task, ClassificationTask)]
        # (teacher index, teacher task) pairs feeding each merged task
        self.sources: dict[str, list[tuple[int, ClassificationTask]]] = {
            target.name: list(self.classified) for target in self.targets}
        self.register_buffer("confidence_mean", torch.zeros(len(teachers)))
        self.register_buffer("confidence_std", torch.ones(len(teachers)))
        self.register_buffer("energy_mean", torch.zeros(len(teachers)))
        self.register_buffer("energy_std", torch.ones(len(teachers)))
        self.register_buffer("logit_scale", torch.ones(len(teachers)))
        self.register_buffer("choice", torch.tensor(0))  # auto's pick in AUTO_CANDIDATES
        self.gate = (LearnedGate(sum(len(task.classes) + 1 for _, task in self.classified),
                                 max(1, len(teachers))) if mode in (*GATED, "auto") else None)
        #: what ``auto`` measured per candidate (view agreement on held-out images)
        self.agreement: dict[str, float] = {}

    @property
    def active(self) -> MergeMode:
        """The merge in use: ``mode``, or the one ``auto`` picked at calibration."""
        return AUTO_CANDIDATES[int(self.choice)] if self.mode == "auto" else self.mode

    @torch.no_grad()
    def calibrate(self, teachers: Sequence[Teacher], images: Iterable[Tensor | ViewBatch],
                  device: torch.device | None = None) -> None:
        """Measure each teacher's score statistics on unlabeled images (and, for ``learned``
        and ``auto``, fit the gate to the teachers' consistency across shifted views).

        ``images`` is consumed in every mode, ``naive`` included (which needs no statistics
        and runs no teacher): callers such as cfl watch the iterator to keep leading batches.
        """
        if self.mode == "naive":
            for _ in images:
                pass
            return
        shifts = self.mode in (*GATED, "auto")
        readings = read_teachers(teachers, self.classified, images, device, shifts)
        if not readings.logits:
            return
        for (i, _), values in zip(self.classified, readings.logits, strict=True):
            for score, mean, std in ((confidence, self.confidence_mean, self.confidence_std),
                                     (_energy, self.energy_mean, self.energy_std)):
                measured = score(values).double()
                mean[i] = measured.mean()
                std[i] = measured.std().clamp_min(1e-6) if len(measured) > 1 else 1.0
        if shifts:
            self.fit_gate(readings)

    def fit_gate(self, readings: TeacherReadings, owners: Tensor | None = None) -> None:
        """Fit the learned gate to the readings' owners, on the images and their shifts, with
        each teacher's logits rescaled to the teachers' common spread; for ``auto``, first
        pick the merge whose targets agree most across the shifts on the half of the images
        the gate was not fitted on. ``owners`` replaces the readings' own (for experiments:
        ``benchmarks/gating.py``)."""
        assert self.gate is not None
        spread = {i: float(values.std(1).mean().clamp_min(1e-6))
                  for (i, _), values in zip(self.classified, readings.logits, strict=True)}
        reference = torch.tensor(list(spread.values())).log().mean().exp()
        for i, value in spread.items():
            self.logit_scale[i] = reference / value
        # owners read the teachers' own probabilities: how sharp a teacher is on its own is
        # evidence (rescaled to a common spread first, they mislead: see benchmarks/gating.py)
        if owners is None:
            owners = readings.owners(self.classified, steadiness=self.mode != "feature-density")
        device = self.gate.w1.device
        views = [readings.logits, *readings.shifted]
        if self.mode == "auto":
            fitted = torch.arange(len(owners)) % 2 == 0
            self.gate.fit(torch.cat([self.gate_inputs([x[fitted] for x in view])
                                     for view in views]).to(device),
                          owners[fitted].repeat(len(views), 1).to(device))
            held = [[x[~fitted].to(device) for x in view] for view in views]
            for index, candidate in enumerate(AUTO_CANDIDATES):
                self.choice.fill_(index)
                self.agreement[candidate] = self._view_agreement(held)
            # a single calibration image leaves none held out: nothing measured, the first wins
            best = max((v for v in self.agreement.values() if math.isfinite(v)), default=math.nan)
            self.choice.fill_(next((i for i, c in enumerate(AUTO_CANDIDATES)
                                    if self.agreement[c] >= best - 1e-9), 0))
            if self.active != "learned":
                return
        self.gate.fit(torch.cat([self.gate_inputs(view) for view in views]).to(device),
                      owners.repeat(len(views), 1).to(device))

    def _view_agreement(self, views: list[list[Tensor]]) -> float:
        """How much the merged targets of the original images (``views[0]``) agree with
        those of each shifted view: the mean of ``sum_c p(c) q(c)``, label-free."""
        def merged(pairs: list[Tensor]) -> list[Tensor]:
            outputs: list[dict[str, Tensor]] = [{} for _ in range(len(self.confidence_mean))]
            for (i, task), value in zip(self.classified, pairs, strict=True):
                outputs[i][task.name] = value
            return [torch.softmax(m, 1) for m in self(outputs).values()]
        original = merged(views[0])
        total = [sum(float((p * q).sum(1).mean()) for p, q in zip(original, merged(view), strict=True))
                 for view in views[1:]]
        return sum(total) / (len(total) * max(1, len(original)))

    def forward(self, teacher_outputs: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        mode = self.active
        gate = None
        if mode in GATED:
            assert self.gate is not None
            gate = self.gate(self.gate_inputs([teacher_outputs[i][task.name]
                                                for i, task in self.classified]))
        merged = {}
        for target in self.targets:
            parts: list[Tensor] = []
            for i, task in self.sources[target.name]:
                logits = teacher_outputs[i][task.name]
                if gate is not None:
                    logits = (torch.log_softmax(logits.float() * self.logit_scale[i], dim=1)
                              + gate[:, i, None])
                elif mode != "naive":
                    logits = torch.log_softmax(logits, dim=1) + self.membership(i, logits)[:, None]
                parts.append(target.embed(task, logits))
            merged[target.name] = _combine(parts, mixture=gate is not None)
        return merged

    def gate_inputs(self, logits: Sequence[Tensor]) -> Tensor:
        """The learned gate's input: each teacher task's log-probabilities and free energy,
        its logits rescaled to the teachers' common spread."""
        scaled = [value.float() * self.logit_scale[i].to(value.device)
                  for (i, _), value in zip(self.classified, logits, strict=True)]
        return torch.cat([part for value in scaled
                          for part in (torch.log_softmax(value, 1), _energy(value)[:, None])], 1)

    def membership(self, teacher: int, logits: Tensor) -> Tensor:
        """The fixed gates: how much each sample belongs to teacher ``teacher`` (its score
        z-scored with the transfer data's statistics), the term its log-probabilities are
        shifted by."""
        if self.active == "energy":
            return (_energy(logits) - self.energy_mean[teacher]) / self.energy_std[teacher]
        return (confidence(logits) - self.confidence_mean[teacher]) / self.confidence_std[teacher]

    def score(self, logits: Tensor) -> Tensor:
        """How much each sample belongs to the teacher giving ``logits``, before z-scoring:
        the centred max logit (``standardize``) or the free energy (``energy``)."""
        return _energy(logits) if self.active == "energy" else confidence(logits)


def _combine(parts: Sequence[Tensor], mixture: bool) -> Tensor:
    """Merge the embedded per-source logits (``-inf`` where a source lacks a class): the
    mixture ``logsumexp`` for gates that are probabilities, else the average over sources."""
    stacked = torch.stack(list(parts))
    known = torch.isfinite(stacked)
    if mixture:
        return torch.logsumexp(stacked, dim=0)
    total = torch.where(known, stacked, torch.zeros_like(stacked)).sum(0)
    return total / known.float().sum(0).clamp_min(1.0)




def _energy(logits: Tensor) -> Tensor:
    return torch.logsumexp(logits, dim=1)


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
