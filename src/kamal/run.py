"""Build and execute runs from validated configs: amalgamate, train, evaluate.

This is where config sections become objects: teachers (local or Hub model repos),
datasets, the amalgamator and its student, and the :class:`~kamal.engine.Trainer`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from . import distributed
from . import report as reporting
from .cache import TeacherCache, choose_mode, fingerprint
from .checkpoint import seed_everything
from .config import DataRef, RunConfig, TeacherRef, TrainRunConfig, load_config, validate
from .data.base import ImageDataset, build_dataset
from .engine import Objective, StepInfo, Trainer, resolve_device
from .errors import ConfigError, KamalError, RegistryError
from .evaluation import count_parameters, cpu_latency_ms, evaluate
from .features import FeatureTap
from .interfaces import Amalgamator, Batch, InputSpec, Student, StudentSpec, Task, Teacher
from .merging import LogitMerger
from .models.base import KamalModel, common_input_spec
from .models.timm_models import is_timm_repo, load_timm_model
from .plugins import get_registry
from .repo import WEIGHTS_FILE, load_model, load_teacher, save_model_repo, sha256_of
from .teachers import Switch, TeacherRunner

RUN_MARKERS = ("report.json", "checkpoints", "metrics.jsonl")


class UnlabeledView(Dataset):
    """The images of a dataset without its labels: amalgamation never reads labels."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tensor:
        return self.dataset[index][0]


def prepare_output(output: str | Path, resume: bool) -> Path:
    """Refuse to overwrite an existing run unless resuming it.

    Every process of a distributed run checks (so all stop with the same error) before the
    main process creates the folder.
    """
    out = Path(output)
    if resume:
        if not (out / "checkpoints" / "latest.safetensors").exists():
            raise KamalError(f"--resume: '{out}' has no checkpoints/latest.safetensors to resume")
    elif out.exists() and any((out / m).exists() for m in RUN_MARKERS):
        raise KamalError(f"output folder '{out}' already holds a run; use --resume to continue "
                         "it or choose another --output")
    distributed.barrier()
    if distributed.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
    return out


def resolve_teacher(ref: TeacherRef, base_dir: Path, index: int) -> Teacher:
    """Load a teacher from a local folder or the Hugging Face Hub."""
    key = f"teachers.{index}"
    try:
        if ref.hub is not None:
            from .hub import HubError, download_model_repo

            try:
                resolved = download_model_repo(ref.hub, ref.revision)
            except HubError as exc:
                raise KamalError(f"{key}.hub: {exc}") from None
            folder = resolved.local_dir
            source = {"hub": ref.hub, "revision": resolved.commit,
                      "requested_revision": ref.revision}
        else:
            folder = (base_dir / ref.path).resolve() if ref.path else base_dir
            source = {"path": str(folder)}
        if ref.format == "timm" or (ref.format is None and is_timm_repo(folder)):
            model = load_timm_model(folder, ref.display_name, ref.classes)
            return Teacher(ref.display_name, model,
                           {**source, "format": "timm", "sha256": sha256_of(folder / WEIGHTS_FILE)})
        return load_teacher(ref.display_name, folder, source)
    except KamalError as exc:
        message = str(exc)
        raise type(exc)(message if message.startswith(key) else f"{key}: {message}") from None


def _dataset(ref: DataRef, key: str) -> ImageDataset:
    try:
        return build_dataset(ref.dataset, ref.split, ref.options, key=key)
    except RegistryError as exc:
        raise ConfigError(f"{key}.dataset: {exc}") from None


def check_data_matches(dataset: ImageDataset, spec: InputSpec, key: str) -> None:
    """The images must have the channels and size the models expect."""
    got = (dataset.channels, *dataset.size)
    want = (spec.channels, *spec.size)
    if tuple(got) != tuple(want):
        raise ConfigError(f"{key}: images are {got[0]}x{got[1]}x{got[2]} but the models expect "
                          f"{want[0]}x{want[1]}x{want[2]}; set {key}.size (or use matching data)")


def _images(dataset: Dataset, batch_size: int = 256) -> Iterator[Tensor]:
    yield from DataLoader(UnlabeledView(dataset), batch_size=batch_size, shuffle=False)


class IndexedView(Dataset):
    """``(index, image)`` pairs: the index finds a sample's cached teacher outputs."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Tensor]:
        return index, self.dataset[index][0]


@dataclass
class AmalgamationStep:
    """One training step of an amalgamation: frozen teachers, then the student, then losses.

    With a :class:`~kamal.cache.TeacherCache`, batches are ``(indices, images)`` and the
    teachers are not run at all: their outputs come from the cache. ``batch_teachers`` and
    ``teacher_channels_last`` (``train.`` fields of the same names) choose how the teachers
    run (:class:`~kamal.teachers.TeacherRunner`).
    """

    teachers: list[Teacher]
    student: Student
    amalgamator: Amalgamator
    cache: TeacherCache | None = None
    batch_teachers: Switch = "auto"
    teacher_channels_last: Switch = "auto"

    def __post_init__(self) -> None:
        request = self.amalgamator.feature_layers()
        self.teacher_layers = request.teachers or [[] for _ in self.teachers]
        self.student_layers = request.student
        self.runner = TeacherRunner(self.teachers, self.teacher_layers, self.batch_teachers,
                                    self.teacher_channels_last)

    def run_teachers(self, images: Tensor) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
        """Outputs and requested features of every teacher for ``images`` (no grad)."""
        return self.runner(images)

    def __call__(self, data: Any, info: StepInfo) -> dict[str, Tensor]:
        if self.cache is not None:
            indices, images = data
            teacher_outputs, teacher_features = self.cache.lookup(indices, images.device)
        else:
            images = data
            teacher_outputs, teacher_features = self.run_teachers(images)
        with FeatureTap(self.student.features, self.student_layers, "student") as tap:
            student_outputs = self.student(images)
        batch = Batch(images, teacher_outputs, student_outputs, teacher_features, tap.features,
                      epoch=info.epoch, step=info.step)
        return self.amalgamator.losses(batch)


def _build_cache(step: AmalgamationStep, transfer: ImageDataset, cfg: RunConfig, out: Path,
                 device: torch.device, local: Dataset | None = None) -> TeacherCache | None:
    """The teacher-output cache the config asks for (``auto``: by size and augmentation).

    ``local`` is this process's shard in a distributed run: each process caches only it.
    """
    local = transfer if local is None else local
    requested = cfg.train.teacher_cache
    if requested == "off":
        return None
    probe = next(iter(DataLoader(UnlabeledView(local), batch_size=8))).to(device)
    outputs, features = step.run_teachers(probe)
    per_sample = sum(v.numel() * v.element_size() for d in (*outputs, *features)
                     for v in d.values()) / len(probe)
    estimate = int(per_sample * len(local))
    mode = choose_mode(requested, transfer.augmented, estimate,
                       int(cfg.train.teacher_cache_budget_mb * 2**20))
    if mode == "off":
        return None
    folder, shard = out / "teacher_cache", ""
    if distributed.world_size() > 1:
        folder = folder / f"process{distributed.rank()}"
        shard = f"shard {distributed.rank()}/{distributed.world_size()} seed {cfg.train.seed}"
    cache = TeacherCache(mode, folder)
    key = fingerprint(step.teachers, step.teacher_layers, local,
                      cfg.data.transfer.model_dump_json() + shard)
    cache.build(UnlabeledView(local), lambda x: step.run_teachers(x.to(device)),
                cfg.train.batch_size, key)
    return cache


def _load_amalgamator(cfg: RunConfig) -> tuple[type[Amalgamator], Any]:
    try:
        cls = get_registry().get("amalgamators", cfg.algorithm.name)
    except RegistryError as exc:
        raise ConfigError(f"algorithm.name: {exc}") from None
    algo_cfg = validate(cls.Config, cfg.algorithm.model_dump(), prefix="algorithm")
    return cls, algo_cfg


def _objective(student: Student) -> Objective | None:
    task = student.tasks[0]
    return Objective(task.name, task.primary_metric, task.higher_is_better)


def amalgamate(config_path: str | Path, output: str | Path | None = None,
               overrides: list[str] | None = None, resume: bool = False,
               progress: bool = True, interrupt_after_steps: int | None = None) -> dict[str, Any]:
    """Run ``kamal amalgamate``: returns the report (also written to ``report.json``).

    Under torchrun every process calls this; the main process returns the report, the
    others an empty dict. ``interrupt_after_steps`` simulates Ctrl-C after that many steps
    (for resume tests).
    """
    with distributed.session():
        return _amalgamate(config_path, output, overrides, resume, progress, interrupt_after_steps)


def _amalgamate(config_path: str | Path, output: str | Path | None, overrides: list[str] | None,
                resume: bool, progress: bool, interrupt_after_steps: int | None) -> dict[str, Any]:
    cfg, base_dir = load_config(RunConfig, config_path, overrides)
    cls, algo_cfg = _load_amalgamator(cfg)
    distributed.check_global_batch(cfg.train.batch_size)
    out = prepare_output(output or Path("runs") / Path(config_path).stem, resume)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)

    teachers = [resolve_teacher(ref, base_dir, i) for i, ref in enumerate(cfg.teachers)]
    cls.check_teachers(teachers)
    spec = common_input_spec(teachers)
    transfer = _dataset(cfg.data.transfer, "data.transfer")
    check_data_matches(transfer, spec, "data.transfer")
    eval_data = _dataset(cfg.data.eval, "data.eval") if cfg.data.eval else None
    if eval_data is not None:
        check_data_matches(eval_data, spec, "data.eval")

    amalgamator = cls(algo_cfg, teachers, StudentSpec(
        cfg.student.architecture, cfg.student.architecture_kwargs, cfg.student.task_names))
    student = amalgamator.build_student().to(device)
    for teacher in teachers:
        teacher.to(device)
    amalgamator.setup(student, _images(transfer))
    if distributed.is_main_process():
        _write_resolved_config(out, cfg, teachers, base_dir)
    step = AmalgamationStep(teachers, student, amalgamator, batch_teachers=cfg.train.batch_teachers,
                            teacher_channels_last=cfg.train.teacher_channels_last)
    local = distributed.shard(transfer, cfg.train.seed)
    step.cache = _build_cache(step, transfer, cfg, out, device, local)

    def evaluator() -> dict[str, dict[str, float]]:
        student.eval()
        return evaluate(student, student.tasks, eval_data, device)

    trainer = Trainer(
        modules={"student": student, **amalgamator.trainable_modules()},
        dataset=IndexedView(local) if step.cache else UnlabeledView(local), step_fn=step,
        cfg=cfg.train, output_dir=out, device=device,
        evaluator=evaluator if eval_data is not None else None, objective=_objective(student),
        resume=resume, progress=progress, interrupt_after_steps=interrupt_after_steps)
    amalgamator.amalgamate(trainer)
    if not distributed.is_main_process():
        return {}

    student.eval()
    report = reporting.amalgamation_report(
        algorithm=amalgamator, teachers=teachers, student=student, eval_data=eval_data,
        device=device, merge_mode=getattr(algo_cfg, "merge", "standardize"))
    report["best_checkpoint"] = trainer.best
    report["teacher_cache"] = ({"mode": step.cache.mode, "bytes": step.cache.nbytes}
                               if step.cache else {"mode": "off", "bytes": 0})
    report["teacher_execution"] = step.runner.describe()
    _finish(out, student, report, amalgamator, teachers)
    return report


def _write_resolved_config(out: Path, cfg: RunConfig, teachers: list[Teacher], base: Path) -> None:
    """``config.yaml`` of the run with teacher revisions pinned and paths absolute."""
    data = cfg.model_dump(exclude_none=True)
    for entry, teacher in zip(data["teachers"], teachers, strict=True):
        if "hub" in entry:
            entry["revision"] = teacher.source["revision"]
        else:
            entry["path"] = str((base / entry["path"]).resolve())
    (out / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _finish(out: Path, student: Student, report: dict[str, Any], amalgamator: Amalgamator,
            teachers: list[Teacher]) -> None:
    provenance = {"algorithm": amalgamator.name, "hyperparameters": amalgamator.describe(),
                  "teachers": [{"name": t.name, **t.source} for t in teachers]}
    card = reporting.model_card(report, provenance)
    save_model_repo(student, out / "student", card, extra_config={"amalgamation": provenance})
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    reporting.plot_curves(out)


# --- supervised training --------------------------------------------------------------


def train(config_path: str | Path, output: str | Path | None = None,
          overrides: list[str] | None = None, resume: bool = False,
          progress: bool = True, interrupt_after_steps: int | None = None) -> dict[str, Any]:
    """Run ``kamal train``: supervised training of one model for one task.

    The task kind is ``model.task_kind`` (default classification); its classes come from the
    training data, and its loss from :meth:`Task.supervised_loss`. Under torchrun the main
    process returns the report, the others an empty dict.
    """
    with distributed.session():
        return _train(config_path, output, overrides, resume, progress, interrupt_after_steps)


def _train(config_path: str | Path, output: str | Path | None, overrides: list[str] | None,
           resume: bool, progress: bool, interrupt_after_steps: int | None) -> dict[str, Any]:
    cfg, _ = load_config(TrainRunConfig, config_path, overrides)
    distributed.check_global_batch(cfg.train.batch_size)
    out = prepare_output(output or Path("runs") / Path(config_path).stem, resume)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    train_data = _dataset(cfg.data.train, "data.train")
    eval_data = _dataset(cfg.data.eval, "data.eval") if cfg.data.eval else None
    task = _train_task(cfg.model.task, cfg.model.task_kind, train_data)
    spec = InputSpec(train_data.channels, tuple(train_data.size), tuple(cfg.model.mean),
                     tuple(cfg.model.std))
    try:
        model = KamalModel(cfg.model.architecture, [task], spec, cfg.model.architecture_kwargs)
    except RegistryError as exc:
        raise ConfigError(f"model.architecture: {exc}") from None
    model.to(device)
    if eval_data is not None:
        check_data_matches(eval_data, spec, "data.eval")

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
        return evaluate(model, [task], eval_data, device)

    trainer = Trainer(modules={"student": model}, dataset=distributed.shard(train_data, cfg.train.seed),
                      step_fn=step, cfg=cfg.train,
                      output_dir=out, device=device,
                      evaluator=evaluator if eval_data is not None else None,
                      objective=_objective(model), resume=resume, progress=progress,
                      interrupt_after_steps=interrupt_after_steps)
    trainer.fit()
    if not distributed.is_main_process():
        return {}
    model.eval()
    report = {"model": reporting.model_entry(model, eval_data, device, "model")}
    card = reporting.model_card(report, {"trained_with": "kamal train",
                                         "config": cfg.model_dump()})
    save_model_repo(model, out / "model", card)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    reporting.plot_curves(out)
    return report


def _train_task(name: str, kind: str, data: ImageDataset) -> Task:
    """The task ``kamal train`` fits: ``kind`` from the registry, classes from the data."""
    try:
        task_cls = get_registry().get("tasks", kind)
    except RegistryError as exc:
        raise ConfigError(f"model.task_kind: {exc}") from None
    described: dict[str, Any] = {"name": name, "kind": kind}
    if data.classes:
        described["classes"] = list(data.classes)
    try:
        return task_cls.from_dict(described)
    except (KamalError, KeyError) as exc:
        if not data.classes:
            raise ConfigError(f"data.train: this dataset has no class labels; a {kind} model "
                              "needs labeled data") from None
        raise ConfigError(f"model.task_kind: cannot build a {kind} task: {exc}") from None


# --- evaluation -----------------------------------------------------------------------


def evaluate_repo(model_dir: str | Path, data: str, options: dict[str, Any] | None = None,
                  with_teachers: bool = False, device_name: str = "auto") -> dict[str, Any]:
    """Metrics of a model repo (or a run folder's student), optionally beside its teachers."""
    folder = Path(model_dir)
    if (folder / "student" / "config.json").exists():
        folder = folder / "student"
    elif (folder / "model" / "config.json").exists():
        folder = folder / "model"
    device = resolve_device(device_name)
    model = load_model(folder).to(device).eval()
    name, _, split = data.rpartition(":") if ":" in data else (data, "", "")
    if not name:
        name, split = data, ""
    dataset = build_dataset(name, split or None, options, key="--data")
    check_data_matches(dataset, model.input_spec, "--data")
    result: dict[str, Any] = {"model": reporting.model_entry(model, dataset, device, str(folder))}
    if with_teachers:
        config = json.loads((folder / "config.json").read_text())
        recorded = (config.get("amalgamation") or {}).get("teachers") or []
        if not recorded:
            raise KamalError(f"{folder} records no teachers (it was not made by kamal amalgamate)")
        teachers = []
        for i, entry in enumerate(recorded):
            ref = TeacherRef(name=entry["name"], path=entry.get("path"), hub=entry.get("hub"),
                             revision=entry.get("revision"))
            teachers.append(resolve_teacher(ref, Path.cwd(), i).to(device))
        result["teachers"] = [reporting.teacher_entry(t, dataset, device) for t in teachers]
        merger = LogitMerger(teachers, model.tasks)
        if merger.targets:  # classification tasks only; dense teachers are listed alone
            merger.calibrate(teachers, _images(dataset), device)
            result["ensemble"] = {"metrics": evaluate(lambda x: merger([t(x) for t in teachers]),
                                                      merger.targets, dataset, device)}
    return result


__all__ = ["amalgamate", "train", "evaluate_repo", "AmalgamationStep", "count_parameters",
           "cpu_latency_ms"]
