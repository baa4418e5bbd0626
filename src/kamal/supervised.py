"""``kamal train``: supervised training of one model for one task (teachers, references)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from . import distributed
from . import report as reporting
from .checkpoint import seed_everything
from .config import TrainRunConfig, load_config
from .data.base import ImageDataset
from .data.loading import loader_options, resolve_workers
from .data.views import check_data_matches, check_label_names, dataset_from_ref, require_labels
from .engine import Objective, StepInfo, Trainer, check_precision, resolve_device
from .errors import ConfigError, KamalError, RegistryError
from .evaluation import evaluate
from .interfaces import InputSpec, Task
from .loggers import RunLoggers
from .models.base import KamalModel
from .plugins import get_registry
from .progress import set_enabled as show_progress
from .repo import save_model_repo
from .run_folder import prepare_output


def train(config_path: str | Path, output: str | Path | None = None,
          overrides: list[str] | None = None, resume: bool = False,
          progress: bool = True, interrupt_after_steps: int | None = None) -> dict[str, Any]:
    """Run ``kamal train``: supervised training of one model for one task.

    The task kind is ``model.task_kind`` (default classification); its classes come from the
    training data, and its loss from :meth:`Task.supervised_loss`. Under torchrun the main
    process returns the report, the others an empty dict. ``interrupt_after_steps``
    simulates Ctrl-C after that many steps (for resume tests).
    """
    with distributed.session():
        show_progress(progress and distributed.is_main_process())
        return _train(config_path, output, overrides, resume, progress, interrupt_after_steps)


def _train(config_path: str | Path, output: str | Path | None, overrides: list[str] | None,
           resume: bool, progress: bool, interrupt_after_steps: int | None) -> dict[str, Any]:
    cfg, _ = load_config(TrainRunConfig, config_path, overrides)
    loggers = RunLoggers(cfg.train.loggers, enabled=distributed.is_main_process())
    distributed.check_global_batch(cfg.train.batch_size)
    out = prepare_output(output or Path("runs") / Path(config_path).stem, resume)
    device = resolve_device(cfg.train.device)
    check_precision(cfg.train.precision, device)  # before any teacher runs
    seed_everything(cfg.train.seed)
    train_data = dataset_from_ref(cfg.data.train, "data.train")
    eval_data = dataset_from_ref(cfg.data.eval, "data.eval") if cfg.data.eval else None
    task = _train_task(cfg.model.task, cfg.model.task_kind, train_data, cfg.model.classes)
    spec = InputSpec(train_data.channels, tuple(train_data.size), tuple(cfg.model.mean),
                     tuple(cfg.model.std))
    try:
        model = KamalModel(cfg.model.architecture, [task], spec, cfg.model.architecture_kwargs)
    except RegistryError as exc:
        raise ConfigError(f"model.architecture: {exc}") from None
    model.to(device)
    if eval_data is not None:
        check_data_matches(eval_data, spec, "data.eval")
        require_labels(eval_data, "data.eval")
        check_label_names(eval_data, [task], "the model", "data.eval", every_class=False)

    loss_name = "ce" if task.kind == "classification" else task.kind

    def step(batch: tuple[Tensor, Any], info: StepInfo) -> dict[str, Tensor]:
        images, targets = batch
        output = model(images)[task.name]
        # map on the CPU (as evaluation does), then move: the trainer leaves dict targets there
        cpu = targets.cpu() if isinstance(targets, Tensor) else targets
        target = task.map_targets(train_data.classes, cpu).to(output.device)
        return {loss_name: task.supervised_loss(output, target)}

    def evaluator() -> dict[str, dict[str, float]]:
        model.eval()
        return evaluate(model, [task], eval_data, device, views=[spec.view])

    trainer = Trainer(modules={"student": model}, dataset=distributed.shard(train_data, cfg.train.seed),
                      step_fn=step, cfg=cfg.train, output_dir=out, device=device,
                      evaluator=evaluator if eval_data is not None else None,
                      objective=Objective.of(model), resume=resume, progress=progress,
                      interrupt_after_steps=interrupt_after_steps, loggers=loggers,
                      run_config=cfg.model_dump(exclude_none=True),
                      loading=loader_options(resolve_workers(cfg.data.workers, train_data), device,
                                             train_data.augmented))
    try:
        trainer.fit()
        if not distributed.is_main_process():
            return {}
        return _report(out, model, eval_data, device, cfg, loggers)
    finally:
        loggers.close()


def _report(out: Path, model: KamalModel, eval_data: ImageDataset | None, device: Any,
            cfg: TrainRunConfig, loggers: RunLoggers) -> dict[str, Any]:
    model.eval()
    report = {"model": reporting.model_entry(model, eval_data, device, "model")}
    card = reporting.model_card(report, {"trained_with": "kamal train",
                                         "config": cfg.model_dump()})
    save_model_repo(model, out / "model", card)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    reporting.plot_curves(out)
    loggers.report(report, out)
    return report


def _train_task(name: str, kind: str, data: ImageDataset,
                classes: list[str] | None = None) -> Task:
    """The task ``kamal train`` fits: ``kind`` from the registry, classes from the data
    (``classes``: a subset of them)."""
    try:
        task_cls = get_registry().get("tasks", kind)
    except RegistryError as exc:
        raise ConfigError(f"model.task_kind: {exc}") from None
    described: dict[str, Any] = {"name": name, "kind": kind}
    if data.classes:
        described["classes"] = list(data.classes)
    if classes is not None:
        unknown = [c for c in classes if c not in (data.classes or [])]
        if unknown or not classes:
            raise ConfigError(f"model.classes: {unknown or 'empty'} not among the training "
                              f"data's classes ({', '.join(data.classes or []) or 'none'})")
        described["classes"] = list(classes)
    try:
        return task_cls.from_dict(described)
    except (KamalError, KeyError) as exc:
        if not data.classes:
            raise ConfigError(f"data.train: this dataset has no class labels; a {kind} model "
                              "needs labeled data") from None
        raise ConfigError(f"model.task_kind: cannot build a {kind} task: {exc}") from None
