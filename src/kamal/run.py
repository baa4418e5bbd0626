"""``kamal amalgamate``: a run config becomes a trained student and its report.

The path, one module per stage: config (:mod:`kamal.config`) → teachers
(:mod:`kamal.teacher_loading`) → data (:mod:`kamal.data.views`) → step and cache
(:mod:`kamal.step`) → engine (:mod:`kamal.engine`) → report (:mod:`kamal.report`). This
module only wires them together and writes the run's outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from . import distributed
from . import report as reporting
from .amalgamator import Amalgamator
from .checkpoint import seed_everything
from .config import RunConfig, load_config, validate
from .data.base import ImageDataset
from .data.views import IndexedView, UnlabeledView, check_data_matches, dataset_from_ref, image_batches
from .engine import Objective, Trainer, resolve_device
from .errors import ConfigError, RegistryError
from .evaluation import evaluate
from .interfaces import Student, StudentSpec, Teacher
from .loggers import RunLoggers
from .models.base import common_input_spec
from .plugins import get_registry
from .progress import set_enabled as show_progress
from .progress import track
from .repo import save_model_repo
from .run_folder import RESOLVED_CONFIG, check_resume_matches, prepare_output
from .step import AmalgamationStep, build_teacher_cache
from .teacher_loading import resolve_teacher


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
    cfg, base_dir = load_config(RunConfig, config_path, overrides)
    cls, algo_cfg = _load_amalgamator(cfg)
    loggers = RunLoggers(cfg.train.loggers, enabled=distributed.is_main_process())  # names checked now
    distributed.check_global_batch(cfg.train.batch_size)
    out = prepare_output(output or Path("runs") / Path(config_path).stem, resume)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)

    teachers = [resolve_teacher(ref, base_dir, i) for i, ref in enumerate(cfg.teachers)]
    cls.check_teachers(teachers)
    spec = common_input_spec(teachers)
    transfer = dataset_from_ref(cfg.data.transfer, "data.transfer")
    check_data_matches(transfer, spec, "data.transfer")
    eval_data = dataset_from_ref(cfg.data.eval, "data.eval") if cfg.data.eval else None
    if eval_data is not None:
        check_data_matches(eval_data, spec, "data.eval")

    amalgamator = cls(algo_cfg, teachers, StudentSpec(
        cfg.student.architecture, cfg.student.architecture_kwargs, cfg.student.task_names))
    student = amalgamator.build_student().to(device)
    for teacher in teachers:
        teacher.to(device)
    resolved = _resolved_config(cfg, teachers, base_dir)
    if resume:
        check_resume_matches(out, resolved)
    batches = -(-len(transfer) // 256)  # image_batches' batch size
    amalgamator.setup(student, track(image_batches(transfer), "calibrating on the transfer data",
                                     batches))
    if distributed.is_main_process():
        (out / RESOLVED_CONFIG).write_text(_cache_notes(teachers)
                                           + yaml.safe_dump(resolved, sort_keys=False))
    step = AmalgamationStep(teachers, student, amalgamator, batch_teachers=cfg.train.batch_teachers,
                            teacher_channels_last=cfg.train.teacher_channels_last)
    local = distributed.shard(transfer, cfg.train.seed)
    step.cache = build_teacher_cache(step, transfer, cfg, out, device, local)

    trainer = Trainer(
        modules={"student": student, **amalgamator.trainable_modules()},
        dataset=IndexedView(local) if step.cache else UnlabeledView(local), step_fn=step,
        cfg=cfg.train, output_dir=out, device=device,
        evaluator=_evaluator(student, eval_data, device), objective=Objective.of(student),
        resume=resume, progress=progress, interrupt_after_steps=interrupt_after_steps,
        loggers=loggers, run_config=resolved)
    try:
        amalgamator.amalgamate(trainer)
        if not distributed.is_main_process():
            return {}
        return _report(out, student, amalgamator, algo_cfg, teachers, eval_data, device, trainer,
                       step)
    finally:
        loggers.close()


def _report(out: Path, student: Student, amalgamator: Amalgamator, algo_cfg: Any,
            teachers: list[Teacher], eval_data: ImageDataset | None, device: torch.device,
            trainer: Trainer, step: AmalgamationStep) -> dict[str, Any]:
    student.eval()
    report = reporting.amalgamation_report(
        algorithm=amalgamator, teachers=teachers, student=student, eval_data=eval_data,
        device=device, merge_mode=getattr(algo_cfg, "merge", "standardize"))
    report["best_checkpoint"] = trainer.best
    report["teacher_cache"] = ({"mode": step.cache.mode, "bytes": step.cache.nbytes}
                               if step.cache else {"mode": "off", "bytes": 0})
    report["teacher_execution"] = step.runner.describe()
    _finish(out, student, report, amalgamator, teachers)
    trainer.loggers.report(report, out)
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
        return evaluate(student, student.tasks, eval_data, device)

    return evaluator


def _resolved_config(cfg: RunConfig, teachers: list[Teacher], base: Path) -> dict[str, Any]:
    """The run's config with teacher revisions pinned and paths absolute (``config.yaml``)."""
    data = cfg.model_dump(exclude_none=True)
    for entry, teacher in zip(data["teachers"], teachers, strict=True):
        if "hub" in entry:
            entry["revision"] = teacher.source["revision"]
        else:
            entry["path"] = str((base / entry["path"]).resolve())
    return data


def _cache_notes(teachers: list[Teacher]) -> str:
    """YAML comments for ``config.yaml`` naming teachers whose revision came from the local
    Hub cache (the Hub was unreachable); comments keep the file a valid, re-runnable config."""
    lines = [f"# teachers.{i}: revision {t.source['revision']} came from the local Hub cache "
             f"(the Hub was unreachable when resolving "
             f"'{t.source.get('requested_revision') or 'main'}')\n"
             for i, t in enumerate(teachers) if t.source.get("revision_from") == "cache"]
    return "".join(lines)


def _finish(out: Path, student: Student, report: dict[str, Any], amalgamator: Amalgamator,
            teachers: list[Teacher]) -> None:
    provenance = {"algorithm": amalgamator.name, "hyperparameters": amalgamator.describe(),
                  "teachers": [{"name": t.name, **t.source} for t in teachers]}
    card = reporting.model_card(report, provenance)
    save_model_repo(student, out / "student", card, extra_config={"amalgamation": provenance})
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    reporting.plot_curves(out)
