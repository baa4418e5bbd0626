"""The per-batch amalgamation step and the teacher-output cache that can feed it.

One step: the frozen teachers' outputs and tapped features (computed by the
:class:`~kamal.teachers.TeacherRunner`, or read from the :class:`~kamal.cache.TeacherCache`),
then the student's forward with its own taps, then the amalgamator's losses on the
resulting :class:`~kamal.interfaces.Batch`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from . import distributed
from .amalgamator import Amalgamator
from .cache import (
    STORED_DTYPES,
    CacheEntry,
    TeacherCache,
    choose_mode,
    entry_key,
    stored_bytes,
)
from .config import RunConfig
from .data.augment import draw_views
from .data.base import ImageDataset
from .data.loading import resolve_workers
from .data.transforms import DENSE_KINDS, ViewBatch, model_input
from .data.views import (
    IndexedView,
    StoredViewRows,
    StoredViewSamples,
    UnlabeledView,
    ViewPlan,
    base_dataset,
    image_batches,
)
from .engine import StepInfo
from .errors import ConfigError, KamalError
from .features import FeatureTap
from .interfaces import Batch, Student, Teacher
from .student_forward import StudentForward
from .teacher_loading import return_freed_memory
from .teachers import Switch, TeacherOutputs, TeacherRunner


@dataclass
class AmalgamationStep:
    """One training step of an amalgamation: frozen teachers, then the student, then losses.

    Loader items are images: a tensor, or one tensor per view of ``plan`` when the models
    read images differently (:class:`~kamal.data.views.ViewPlan`). With a
    :class:`~kamal.cache.TeacherCache`, batches are ``(indices, student images)`` and the
    teachers are not run at all: their outputs come from the cache. ``batch_teachers`` and
    ``teacher_channels_last`` (``train.`` fields of the same names) choose how the teachers
    run (:class:`~kamal.teachers.TeacherRunner`); ``compile_student`` and
    ``student_channels_last`` how the student does (:class:`~kamal.student_forward.StudentForward`).
    """

    teachers: list[Teacher]
    student: Student
    amalgamator: Amalgamator
    cache: TeacherCache | None = None
    batch_teachers: Switch = "auto"
    teacher_channels_last: Switch = "auto"
    plan: ViewPlan | None = None
    compile_student: bool = False
    student_channels_last: bool = False

    def __post_init__(self) -> None:
        request = self.amalgamator.feature_layers()
        self.teacher_layers = request.teachers or [[] for _ in self.teachers]
        self.student_layers = request.student
        self.plan = self.plan or ViewPlan.of(self.student.input_spec,
                                             [t.input_spec for t in self.teachers])
        self.runner = TeacherRunner(self.teachers, self.teacher_layers, self.batch_teachers,
                                    self.teacher_channels_last, self.student.input_spec.size)
        self.forward = StudentForward(self.student, self.compile_student,
                                      self.student_channels_last, bool(self.student_layers))

    def run_teachers(self, images: Tensor | ViewBatch) -> TeacherOutputs:
        """Outputs and requested features of every teacher for ``images`` (no grad); dense
        outputs at the student's size."""
        return self.runner(images)

    def batch(self, data: Any, info: StepInfo | None = None) -> Batch:
        """The :class:`~kamal.interfaces.Batch` for one loader item (images, or
        ``(indices, images)`` when the cache is on)."""
        assert self.plan is not None
        if self.cache is not None:
            indices, images = data
            teacher_outputs, teacher_features = self.cache.lookup(indices, images.device)
        else:
            views = self.plan.batch(data)
            teacher_outputs, teacher_features = self.run_teachers(views)
            images = model_input(self.student, views)
        info = info or StepInfo("main", 0, 0)
        images = self.amalgamator.student_images(images, info.step)
        with FeatureTap(self.student.features, self.student_layers, "student") as tap:
            student_outputs = self.forward(images)
        return Batch(images, teacher_outputs, student_outputs, teacher_features, tap.features,
                     epoch=info.epoch, step=info.step)

    def __call__(self, data: Any, info: StepInfo) -> dict[str, Tensor]:
        return self.amalgamator.losses(self.batch(data, info))


def build_batch(amalgamator: Amalgamator, images: Tensor | ViewBatch,
                info: StepInfo | None = None) -> Batch:
    """The :class:`~kamal.interfaces.Batch` the engine would give ``amalgamator.losses`` for
    ``images``: its teachers and its (set-up) student run with the layers it requests tapped.
    For tests and notebooks; the engine builds batches the same way."""
    if amalgamator.student is None:
        raise KamalError("build_batch: call amalgamator.setup(student, images) first")
    step = AmalgamationStep(amalgamator.teachers, amalgamator.student, amalgamator)
    if isinstance(images, ViewBatch):
        assert step.plan is not None
        images = tuple(images.tensors[view] for view in step.plan.views)
    return step.batch(images, info)


def build_teacher_cache(step: AmalgamationStep, transfer: ImageDataset, cfg: RunConfig,
                        out: Path, device: torch.device, local: Dataset) -> TeacherCache | None:
    """The teacher-output cache the config asks for (``auto``: by size and augmentation),
    with ``train.teacher_cache_views`` recorded augmentations per image when set.

    ``local`` is this process's shard of ``transfer``: each process caches only its own.
    """
    requested, per_image = cfg.train.teacher_cache, cfg.train.teacher_cache_views
    if requested == "off":
        return None
    if per_image and not transfer.records_augmentation:
        raise ConfigError(
            f"train.teacher_cache_views: {per_image} stores randomly augmented views, but "
            + ("the transfer data has no random augmentation; turn it on (e.g. "
               "data.transfer.augment: true) or set teacher_cache_views to 0"
               if not transfer.augmented else
               f"the transfer data ({type(transfer).__name__}) cannot record its augmentation "
               "(ImageDataset.draw_augmentation); set teacher_cache_views to 0"))
    assert step.plan is not None
    plan = step.plan
    probe = plan.batch(next(iter(DataLoader(UnlabeledView(local, plan.views), batch_size=8))))
    probe = probe.to(device)
    stored = STORED_DTYPES[cfg.train.teacher_cache_dtype]
    logits = [frozenset(t.name for t in teacher.tasks if t.kind == "classification")
              for teacher in step.teachers]
    # a teacher freed after its entry (it can be loaded again) runs converted in place
    frees = [cfg.train.release_teachers and teacher.loader is not None for teacher in step.teachers]
    runners = [TeacherRunner([teacher], [layers], "off", cfg.train.teacher_channels_last,
                             step.student.input_spec.size, in_place=free)
               for teacher, layers, free in zip(step.teachers, step.teacher_layers, frees,
                                                strict=True)]
    per_sample = 0.0
    for i, runner in enumerate(runners):  # one teacher at a time, as the fill
        (outputs,), (features,) = runner(probe)
        per_sample += stored_bytes(outputs, features, logits[i], cfg.train.teacher_cache_topk,
                                   stored) / len(probe)
        _put_away(step.teachers[i], runner, frees[i])
    estimate = int(per_sample * len(local) * max(1, per_image))  # type: ignore[arg-type]
    mode = choose_mode(requested, transfer.augmented and not per_image, estimate,
                       int(cfg.train.teacher_cache_budget_mb * 2**20))
    if mode == "off":
        return None
    folder, shard = out / "teacher_cache", ""
    if distributed.world_size() > 1:
        folder = folder / f"process{distributed.rank()}"
        shard = f"shard {distributed.rank()}/{distributed.world_size()} seed {cfg.train.seed}"
    views = (draw_views(base_dataset(local).draw_augmentation, len(local),  # type: ignore[arg-type]
                        per_image, cfg.train.seed + 7919 * (1 + distributed.rank()))
             if per_image else None)
    cache = TeacherCache(mode, folder, stored, views, cfg.train.teacher_cache_topk)
    data = transfer.fingerprint() + cfg.data.transfer.model_dump_json() + shard
    extra = (f"outputs at {tuple(step.student.input_spec.size)} as {stored}, "
             f"top {cfg.train.teacher_cache_topk}")
    entries = []
    for i, (teacher, layers) in enumerate(zip(step.teachers, step.teacher_layers, strict=True)):
        view = (plan.views[plan.teachers[i]],)
        rows = (StoredViewRows(local, view, views) if views is not None
                else UnlabeledView(local, view))
        entries.append(CacheEntry(teacher.name, entry_key(teacher, layers, data, views, extra),
                                  rows, _single_teacher(runners[i], device), logits[i],
                                  partial(_put_away, teacher, runners[i], frees[i])))
    cache.build(entries, cfg.train.batch_size, resolve_workers(cfg.data.workers, transfer))
    return cache


def _single_teacher(runner: TeacherRunner, device: torch.device):
    """One teacher's ``(outputs, features)`` on a batch of the images it reads."""
    def run(images: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        outputs, features = runner(images.to(device))
        return outputs[0], features[0]
    return run


def _put_away(teacher: Teacher, runner: TeacherRunner, free: bool) -> None:
    """Once ``teacher`` has run for the cache: the runner's copies dropped and, with
    ``free`` (``train.release_teachers``, and a loader to bring the weights back), its
    weights freed (the next use loads them again), so the fill holds one teacher at a time."""
    runner.reset()
    if free:
        teacher.release(lazy=True)
        return_freed_memory()


def training_data(local: Dataset, plan: ViewPlan, cache: TeacherCache | None) -> Dataset:
    """What the engine iterates: the images through every view (teachers run live), or
    ``(cache row, student image)`` pairs: one per image, or one of its stored views."""
    student = plan.views[plan.student:plan.student + 1]
    if cache is None:
        return UnlabeledView(local, plan.views)
    if cache.views is not None:
        return StoredViewSamples(local, student, cache.views)
    return IndexedView(local, student)


@contextmanager
def teachers_released(step: AmalgamationStep, release: bool) -> Iterator[None]:
    """While the student trains from a complete teacher cache, the teachers' weights are
    freed (with ``release``: ``train.release_teachers``); after it each loads them again
    when first used (their :attr:`~kamal.interfaces.Teacher.loader`), for the report and an
    algorithm's own work after training."""
    if not (release and step.cache is not None):
        yield
        return
    step.runner.reset()  # its channels-last copies hold weights too
    for teacher in step.teachers:
        teacher.release()  # not lazy: a teacher run during training is an error that says why
    return_freed_memory()
    yield  # an interrupted or failed stage ends the run: nothing left to load them for
    for teacher in step.teachers:
        teacher.release(lazy=True)


def features_before_setup(amalgamator: Amalgamator) -> bool | None:
    """Whether the algorithm taps teacher layers, asked before its ``setup`` (``None``: it
    cannot say yet, e.g. it resolves its layers in ``setup``)."""
    try:
        request = amalgamator.feature_layers()
    except Exception:  # noqa: BLE001 - an algorithm that needs setup first
        return None
    return any(request.teachers or [])


def calibration_batches(calibration: Dataset, plan: ViewPlan, batch_size: int,
                        device: torch.device, teachers: list[Teacher],
                        cache: TeacherCache | None = None) -> Iterator[Tensor | ViewBatch]:
    """The calibration images in batches (``plan``'s views, on ``device``). With a filled
    teacher cache over the same data, a teacher called on a yielded batch answers from the
    cache instead of running: the teachers ran over the transfer data once."""
    if cache is None:
        for batch in image_batches(calibration, batch_size, plan):
            yield batch.to(device)
        return
    rows = (list(calibration.indices) if isinstance(calibration, Subset)
            else list(range(len(calibration))))  # type: ignore[arg-type]
    start = 0
    for data in DataLoader(UnlabeledView(calibration, plan.views), batch_size=batch_size):
        images = plan.batch(data).to(device)
        count = len(images)
        outputs, _ = cache.lookup(torch.tensor(rows[start:start + count]), device)
        start += count
        with answering_from_cache(teachers, images, outputs, plan):
            yield images


@contextmanager
def answering_from_cache(teachers: list[Teacher], images: Tensor | ViewBatch,
                         outputs: list[dict[str, Tensor]], plan: ViewPlan) -> Iterator[None]:
    """While active, each teacher called on exactly ``images`` returns its cached outputs
    (not for a dense teacher at another size: the cache holds its maps at the student's)."""
    student_size = plan.views[plan.student].size
    answering = [t for t in teachers if t.input_spec.view.size == student_size
                 or not any(task.kind in DENSE_KINDS for task in t.tasks)]
    for teacher, out in zip(teachers, outputs, strict=True):
        if teacher in answering:
            teacher.answer(images, out)
    try:
        yield
    finally:
        for teacher in answering:
            teacher.answer(None, None)
