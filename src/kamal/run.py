"""``kamal amalgamate``: a run config becomes a trained student and its report.

The path, one module per stage: config (:mod:`kamal.config`) → teachers
(:mod:`kamal.teacher_loading`) → data (:mod:`kamal.data.views`) → step and cache
(:mod:`kamal.step`) → engine (:mod:`kamal.engine`) → report (:mod:`kamal.report`). This
module only wires them together and writes the run's outputs.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from . import distributed
from . import report as reporting
from .amalgamator import Amalgamator, algorithms_with, check_backbone_teachers
from .checkpoint import seed_everything
from .config import RunConfig, load_config, validate
from .data.base import ImageDataset
from .data.loading import loader_options, resolve_workers
from .data.transforms import ViewBatch
from .data.views import (
    ViewPlan,
    calibration_sample,
    check_data_matches,
    check_label_names,
    check_views,
    dataset_from_ref,
    require_labels,
)
from .engine import Objective, Trainer, check_precision, resolve_device
from .errors import ConfigError, KamalError, RegistryError
from .evaluation import evaluate
from .interfaces import Student, StudentSpec, Teacher
from .loggers import RunLoggers
from .models.base import check_class_names, merged_only, student_input_spec
from .plugins import get_registry
from .progress import set_enabled as show_progress
from .progress import track
from .repo import save_model_repo
from .run_folder import (
    RESOLVED_CONFIG,
    check_resume_matches,
    config_notes,
    prepare_output,
    resolved_config,
)
from .step import (
    AmalgamationStep,
    build_teacher_cache,
    calibration_batches,
    features_before_setup,
    teachers_released,
    training_data,
)
from .teacher_loading import load_teachers


def amalgamate(config_path: str | Path, output: str | Path | None = None,
               overrides: list[str] | None = None, resume: bool = False,
               progress: bool = True, interrupt_after_steps: int | None = None) -> dict[str, Any]:
    """Run ``kamal amalgamate``: returns the report (also written to ``report.json``).

    Under torchrun every process calls this; the main process returns the report, the
    others an empty dict. ``interrupt_after_steps`` simulates Ctrl-C after that many steps
    (for resume tests).
    """
    with distributed.session():
        show_progress(progress and distributed.is_main_process())
        return _amalgamate(config_path, output, overrides, resume, progress, interrupt_after_steps)


def _amalgamate(config_path: str | Path, output: str | Path | None, overrides: list[str] | None,
                resume: bool, progress: bool, interrupt_after_steps: int | None) -> dict[str, Any]:
    started = time.perf_counter()
    cfg, base_dir = load_config(RunConfig, config_path, overrides)
    cls, algo_cfg = _load_amalgamator(cfg)
    loggers = RunLoggers(cfg.train.loggers, enabled=distributed.is_main_process())  # names checked now
    distributed.check_global_batch(cfg.train.batch_size)
    out = prepare_output(output or Path("runs") / Path(config_path).stem, resume)
    device = resolve_device(cfg.train.device)
    check_precision(cfg.train.precision, device)  # before any teacher runs
    seed_everything(cfg.train.seed)

    # one teacher's weights in memory at a time until they run (train.release_teachers)
    teachers = load_teachers(cfg.teachers, base_dir, lazy=cfg.train.release_teachers
                             and cfg.train.teacher_cache != "off")
    check_backbone_teachers(cls, teachers)
    cls.check_teachers(teachers)
    check_class_names(teachers)
    transfer = dataset_from_ref(cfg.data.transfer, "data.transfer")
    spec = student_input_spec(teachers, cfg.student.input.model_dump())
    check_data_matches(transfer, spec, "data.transfer")
    eval_data = dataset_from_ref(cfg.data.eval, "data.eval") if cfg.data.eval else None
    if eval_data is not None:
        check_data_matches(eval_data, spec, "data.eval")
        require_labels(eval_data, "data.eval")
        for teacher in teachers:
            check_label_names(eval_data, teacher.tasks, f"teacher '{teacher.name}'", "data.eval",
                              every_class=False)

    amalgamator = cls(algo_cfg, teachers, StudentSpec(
        cfg.student.architecture, cfg.student.architecture_kwargs, cfg.student.task_names, spec))
    student = amalgamator.build_student().to(device)
    if cfg.train.student_channels_last:
        student.to(memory_format=torch.channels_last)  # 4-d weights only
    plan = ViewPlan.of(student.input_spec, [t.input_spec for t in teachers])
    check_views(plan, teachers, cls.name, cls.mixed_views, lambda: algorithms_with("mixed_views"))
    if eval_data is not None:  # a merged task must know every class; a teacher's own task not
        check_label_names(eval_data, merged_only(student.tasks, teachers), "the student",
                          "data.eval", every_class=True)
    for teacher in teachers:
        teacher.to(device)
    resolved = resolved_config(cfg, teachers, student, base_dir)
    if resume:
        check_resume_matches(out, resolved)
    # calibration reads the images as they are: a merge measured on randomly shifted or
    # cropped copies judges the teachers on views they were not trained for
    calibration = calibration_sample(transfer.without_augmentation(),
                                     cfg.train.calibration_images, cfg.train.seed)
    if len(calibration) < len(transfer) and progress and distributed.is_main_process():
        print(f"kamal: setup reads {len(calibration)} of {len(transfer)} transfer images "
              "(train.calibration_images)", file=sys.stderr)
    local = distributed.shard(transfer, cfg.train.seed)

    def new_step() -> AmalgamationStep:
        return AmalgamationStep(teachers, student, amalgamator, plan=plan,
                                batch_teachers=cfg.train.batch_teachers,
                                teacher_channels_last=cfg.train.teacher_channels_last,
                                compile_student=cfg.train.compile,
                                student_channels_last=cfg.train.student_channels_last)

    # One pass: an algorithm that taps no teacher layer can have the cache filled first and
    # calibrate on it (the teachers run over the transfer data once); else setup comes first
    # (its layers are known after it) and calibration runs the teachers on its sample. A
    # distributed run's cache holds only this process's shard: calibration runs them.
    # (Augmented data is never cached: then nothing is probed early, so the random state the
    # training starts from is the same as without this path.)
    early = (new_step() if features_before_setup(amalgamator) is False
             and distributed.world_size() == 1 and cfg.train.teacher_cache != "off"
             and not transfer.augmented else None)
    cache = build_teacher_cache(early, transfer, cfg, out, device, local) if early else None
    # batches of the training size: teachers at full resolution must fit the device here too
    batches = -(-len(calibration) // cfg.train.batch_size)
    amalgamator.setup(student, track(
        calibration_batches(calibration, plan, cfg.train.batch_size, device, teachers, cache),
        "calibrating on the transfer data", batches))
    if distributed.is_main_process():
        (out / RESOLVED_CONFIG).write_text(config_notes(teachers)
                                           + yaml.safe_dump(resolved, sort_keys=False))
    step = new_step()
    if early is not None and step.teacher_layers == early.teacher_layers:
        step.runner, step.cache = early.runner, cache  # the runner that filled the cache
    else:
        step.cache = build_teacher_cache(step, transfer, cfg, out, device, local)

    trainer = Trainer(
        modules={"student": student, **amalgamator.trainable_modules()},
        dataset=training_data(local, plan, step.cache), step_fn=step,
        cfg=cfg.train, output_dir=out, device=device,
        evaluator=_evaluator(student, eval_data, device), objective=Objective.of(student),
        resume=resume, progress=progress, interrupt_after_steps=interrupt_after_steps,
        loggers=loggers, run_config=resolved,
        loading=loader_options(resolve_workers(cfg.data.workers, transfer), device,
                               transfer.augmented),
        during_fit=lambda: teachers_released(step, cfg.train.release_teachers))
    try:
        amalgamator.amalgamate(trainer)
        if not distributed.is_main_process():
            return {}
        return _finish(out, student, amalgamator, algo_cfg, teachers, eval_data,
                       lambda: calibration_batches(calibration, plan, trainer.cfg.batch_size,
                                                   device, teachers, cache and step.cache),
                       trainer, step, started)
    finally:
        loggers.close()


def _finish(out: Path, student: Student, amalgamator: Amalgamator, algo_cfg: Any,
            teachers: list[Teacher], eval_data: ImageDataset | None,
            calibration: Callable[[], Iterable[Tensor | ViewBatch]],
            trainer: Trainer, step: AmalgamationStep, started: float) -> dict[str, Any]:
    """The report, the student repo, report.json, the curves and the loggers' report: all
    written, or an error naming the step that failed (the checkpoint stays for --resume)."""
    step_name = "evaluating the student and the teachers for the report"
    try:
        student.eval()
        report = reporting.amalgamation_report(
            algorithm=amalgamator, teachers=teachers, student=student, eval_data=eval_data,
            device=trainer.device, calibration=calibration,
            merge_mode=getattr(algo_cfg, "merge", "standardize"))
        report["best_checkpoint"] = trainer.best
        report["teacher_cache"] = ({"mode": step.cache.mode, "bytes": step.cache.nbytes}
                                   if step.cache else {"mode": "off", "bytes": 0})
        report["teacher_execution"] = step.runner.describe()
        report["student_execution"] = {"compiled": step.forward.compiled,
                                       "channels_last": step.forward.channels_last}
        report["timing"] = {"seconds_to_first_step": None if trainer.first_step_time is None
                            else round(trainer.first_step_time - started, 3)}
        provenance = {"algorithm": amalgamator.name, "hyperparameters": amalgamator.describe(),
                      "teachers": [{"name": t.name, **t.source} for t in teachers]}
        step_name = "saving the student model repo"
        save_model_repo(student, out / "student", reporting.model_card(report, provenance),
                        extra_config={"amalgamation": provenance})
        step_name = "writing report.json"
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        step_name = "plotting the training curves"
        reporting.plot_curves(out)
    except Exception as exc:
        raise KamalError(
            f"training finished ({trainer.latest_path} holds the final state) but {step_name} "
            f"failed: {type(exc).__name__}: {exc}. Fix that, then run the same command with "
            "--resume: it writes the outputs without training again") from exc
    trainer.loggers.report(report, out)  # a failing logger is reported and skipped, never fatal
    return report


def _load_amalgamator(cfg: RunConfig) -> tuple[type[Amalgamator], Any]:
    try:
        cls = get_registry().get("amalgamators", cfg.algorithm.name)
    except RegistryError as exc:
        raise ConfigError(f"algorithm.name: {exc}") from exc  # --debug shows the plugin's error
    algo_cfg = validate(cls.Config, cfg.algorithm.model_dump(), prefix="algorithm")
    return cls, algo_cfg


def _evaluator(student: Student, eval_data: ImageDataset | None, device: torch.device):
    if eval_data is None:
        return None

    def evaluator() -> dict[str, dict[str, float]]:
        student.eval()
        return evaluate(student, student.tasks, eval_data, device,
                        views=[student.input_spec.view])

    return evaluator
