"""``sbm``: Student Becoming the Master (Ye et al., CVPR 2019), for dense teachers.

Teachers of different dense tasks (a scene-parsing teacher, a depth teacher, ...) are
amalgamated into one :class:`~kamal_plugin_sbm.student.BranchedSegNet` without labels:

1. ``amalgamate``: the supernet is trained on the transfer images, every task's branch
   point drawn at random for every step, so that every trunk/branch split learns to imitate
   the teachers (pixel-wise KL for segmentation, L1 or berHu for depth);
2. ``search`` (no training): for each task and each branch point, batch-norm statistics are
   re-estimated for that split and the distillation loss is measured on transfer images
   held out from training; each task takes the point that shares most of the decoder
   within ``share_tolerance`` of the lowest loss;
3. ``finetune``: the chosen network is trained further, then the unused blocks are dropped.

The trunk starts from a teacher (``init: teachers``, every private branch and head from its
own task's teacher) or from scratch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from kamal import (
    Amalgamator,
    AmalgamatorConfig,
    Batch,
    DepthTask,
    KamalError,
    KamalModel,
    SegNet,
    Student,
    Teacher,
    Trainer,
    ViewBatch,
    broadcast_object,
    is_main_process,
    merge_tasks,
    student_input_spec,
)

from .student import BLOCKS, BranchedSegNet

DENSE_KINDS = ("segmentation", "depth")
STUDENT_ARCHITECTURE = "sbm-segnet"


class SBMConfig(AmalgamatorConfig):
    """Hyperparameters of ``sbm``."""

    name: Literal["sbm"] = "sbm"
    init: Literal["teachers", "scratch"] = Field(
        "teachers", description="Start the shared trunk from a teacher (and each task's private "
        "branch and head from its own teacher), or from random weights. 'teachers' needs SegNet "
        "teachers of the student's width.")
    trunk_teacher: str | None = Field(
        None, description="Name of the teacher whose encoder-decoder initialises the shared "
        "trunk (init: teachers); default: the first teacher.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature T of the pixel-wise "
                               "KL loss for segmentation.")
    depth_loss: Literal["l1", "berhu"] = Field("l1", description="Distance between student and "
                                               "teacher depth maps: l1 or berhu (reverse Huber).")
    weights: dict[str, float] = Field(
        default_factory=dict, description="Loss weight per task kind or task name, e.g. "
        "{depth: 0.5}; 1.0 when absent.")
    gate_l1: float = Field(0.0, ge=0, description="L1 penalty on the mean channel gate that "
                           "each task reads, pushing it to use fewer shared channels.")
    finetune_fraction: float = Field(0.3, ge=0, lt=1, description="Share of train.epochs spent "
                                     "fine-tuning the chosen branching (the rest amalgamates "
                                     "with sampled branch points).")
    finetune_lr: float = Field(0.3, gt=0, le=1, description="Learning rate of fine-tuning as a "
                               "fraction of train.optimizer.lr.")
    holdout: float = Field(0.1, gt=0, lt=0.5, description="Fraction of the transfer images "
                           "held out of training to choose the branch points.")
    share_tolerance: float = Field(0.02, ge=0, description="A task takes the deepest shared "
                                   "branch point whose held-out loss is within this relative "
                                   "margin of the lowest.")
    branches: dict[str, int] = Field(
        default_factory=dict, description="Fix a task's branch point (0 = share the encoder "
        "only .. 3 = share the whole decoder) instead of searching it; by task name or kind.")
    calibration_images: int = Field(256, ge=1, description="Training images used to re-estimate "
                                    "batch-norm statistics for each candidate branch point.")
    demo_images: int = Field(6, ge=0, description="Held-out images shown in demo.png.")


class SBMAmalgamator(Amalgamator):
    """Student Becoming the Master: one branched multi-task student from dense teachers."""

    name = "sbm"
    Config = SBMConfig
    config: SBMConfig
    # teachers may read their own resolution: the engine brings their maps to the
    # student's size, and the branch search does the same
    mixed_views = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.search_losses: dict[str, dict[int, float]] = {}

    # --- checks and the student ----------------------------------------------------------

    @classmethod
    def check_teachers(cls, teachers: Iterable[Teacher]) -> None:
        seen: dict[str, str] = {}
        for teacher in teachers:
            for task in teacher.tasks:
                if task.kind not in DENSE_KINDS:
                    raise KamalError(
                        f"sbm amalgamates dense teachers (segmentation, depth); teacher "
                        f"'{teacher.name}' has a {task.kind} task '{task.name}'. For "
                        "classification teachers use kd, cfl or layerwise.")
                if task.kind in seen:
                    raise KamalError(
                        f"teachers '{seen[task.kind]}' and '{teacher.name}' both predict "
                        f"{task.kind}; sbm needs one teacher per task kind (its student has one "
                        "branch per task)")
                seen[task.kind] = teacher.name

    def build_student(self) -> Student:
        spec = self.student_spec
        if spec.architecture != STUDENT_ARCHITECTURE:
            raise KamalError(f"student.architecture: sbm trains its own branched student; set "
                             f"it to '{STUDENT_ARCHITECTURE}' (got '{spec.architecture}')")
        kwargs = dict(spec.architecture_kwargs)
        if "branches" in kwargs:
            raise KamalError("student.architecture_kwargs.branches: sbm chooses the branch "
                             "points itself; fix them with algorithm.branches instead")
        tasks = merge_tasks(self.teachers, spec.task_names)
        spec = spec.input_spec or student_input_spec(self.teachers)
        student = KamalModel(STUDENT_ARCHITECTURE, tasks, spec, kwargs)
        self._resolve_sources(student)
        if self.config.init == "teachers":
            self._init_from_teachers(student)
        return student

    def _resolve_sources(self, student: KamalModel) -> None:
        """Which teacher (index) and teacher task feed each student task."""
        self.sources: dict[str, tuple[int, Any]] = {}
        for task in student.tasks:
            for i, teacher in enumerate(self.teachers):
                for teacher_task in teacher.tasks:
                    if teacher_task.kind == task.kind:
                        self.sources[task.name] = (i, teacher_task)
        names = {t.name for t in student.tasks}
        kinds = {t.kind: t.name for t in student.tasks}
        self.fixed: dict[str, int] = {}
        for key, point in self.config.branches.items():
            name = key if key in names else kinds.get(key)
            if name is None:
                raise KamalError(f"algorithm.branches: '{key}' is neither a student task "
                                 f"({', '.join(sorted(names))}) nor a task kind")
            if not 0 <= point <= BLOCKS:
                raise KamalError(f"algorithm.branches.{key}: {point} is not a branch point "
                                 f"0..{BLOCKS}")
            self.fixed[name] = point

    def _teacher_segnet(self, teacher: Teacher, width: int) -> SegNet:
        net = teacher.model.features
        if not isinstance(net, SegNet):
            raise KamalError(f"algorithm.init: teachers needs SegNet teachers, but "
                             f"'{teacher.name}' is {type(net).__name__}; set algorithm.init: "
                             "scratch")
        if net.width != width:
            raise KamalError(f"algorithm.init: teacher '{teacher.name}' has width {net.width} "
                             f"but the student has {width}; set student.architecture_kwargs."
                             f"width: {net.width} or algorithm.init: scratch")
        return net

    def _init_from_teachers(self, student: KamalModel) -> None:
        net = _net(student)
        width = net.trunk.width
        names = [t.name for t in self.teachers]
        trunk_name = self.config.trunk_teacher or names[0]
        if trunk_name not in names:
            raise KamalError(f"algorithm.trunk_teacher: no teacher '{trunk_name}'; teachers "
                             f"are {', '.join(names)}")
        net.load_teacher_trunk(self._teacher_segnet(self.teachers[names.index(trunk_name)], width))
        for task_name, (i, teacher_task) in self.sources.items():
            net.load_teacher_branch(task_name, self._teacher_segnet(self.teachers[i], width),
                                    teacher_task.name)

    # --- training ----------------------------------------------------------------------

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        assert self.student is not None
        out = {}
        for task in self.student.tasks:
            teacher_out = self._teacher_output(task, batch.teacher_outputs)
            out[f"distill/{task.name}"] = self._weight(task) * self._distill(
                task, batch.student_outputs[task.name], teacher_out)
        if self.config.gate_l1 > 0:
            net = _net(self.student)
            gates = torch.cat(net.used_gates())  # only gates this step's branching read
            out["gates/l1"] = self.config.gate_l1 * gates.mean()
        return out

    def _teacher_output(self, task: Any, teacher_outputs: list[dict[str, Tensor]]) -> Tensor:
        i, teacher_task = self.sources[task.name]
        return task.embed(teacher_task, teacher_outputs[i][teacher_task.name])

    def _distill(self, task: Any, student: Tensor, teacher: Tensor) -> Tensor:
        if isinstance(task, DepthTask):
            return task.distill_loss(student, teacher, loss=self.config.depth_loss)
        return task.distill_loss(student, teacher, self.config.temperature)

    def _weight(self, task: Any) -> float:
        weights = self.config.weights
        return float(weights.get(task.name, weights.get(task.kind, 1.0)))

    def amalgamate(self, trainer: Trainer) -> None:
        assert self.student is not None
        net = _net(self.student)
        cfg = trainer.cfg
        finetune_epochs = round(cfg.epochs * self.config.finetune_fraction)
        if self.config.finetune_fraction > 0:
            finetune_epochs = max(1, finetune_epochs)
        amalgamate_epochs = max(1, cfg.epochs - finetune_epochs)
        train_index, held_index = self._split(trainer.num_samples, cfg.seed)
        held = trainer.images(held_index, seed=cfg.seed)
        calibration = trainer.images(train_index[:self.config.calibration_images], seed=cfg.seed + 1)
        trainer.hold_out(held_index)  # held-out images never train the student

        # 1. amalgamate with random branch points (fixed ones stay fixed)
        if self.fixed:
            net.override = dict(self.fixed)
        net.sampling = True
        trainer.fit(stage="amalgamate", epochs=amalgamate_epochs)
        net.sampling = False
        net.override = {}

        # 2. choose the branch points (kept in the checkpoint: a resumed run does not redo it).
        # In a distributed run each process holds out its own images: the main process
        # chooses and the others adopt its choice, so every copy of the student stays equal.
        if net.chosen() is None:
            choice = self._search(net, held, calibration, trainer.device) if is_main_process() else None
            net.choose(broadcast_object(choice))
        chosen = net.chosen()
        assert chosen is not None

        # 3. fine-tune what the chosen branching uses, then drop the rest
        if finetune_epochs:
            keys = net.pruned_keys(chosen)
            used = [p for n, p in net.named_parameters() if n in keys]
            trainer.fit(stage="finetune", epochs=finetune_epochs, parameters=used,
                        lr=cfg.optimizer.lr * self.config.finetune_lr)
        self._prune(chosen)
        if is_main_process():  # search losses exist only there
            self._write_outputs(trainer, held, chosen)

    def _split(self, count: int, seed: int) -> tuple[list[int], list[int]]:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + 4099))
        held = max(1, round(count * self.config.holdout))
        if count - held < 1:
            raise KamalError(f"the transfer data has {count} images; sbm holds out "
                             f"{held} to choose branch points and needs more to train")
        return sorted(order[held:].tolist()), sorted(order[:held].tolist())

    @torch.no_grad()
    def _search(self, net: BranchedSegNet, held: Tensor | ViewBatch,
                calibration: Tensor | ViewBatch,
                device: torch.device) -> dict[str, int]:
        """Each task's branch point by its distillation loss on held-out images."""
        assert self.student is not None
        student = self.student
        teacher_outputs = _batched([lambda x, t=t: t(x) for t in self.teachers], held, device)
        saved = {k: v.clone() for k, v in net.state_dict().items()}
        chosen: dict[str, int] = {}
        for task in student.tasks:
            if task.name in self.fixed:
                chosen[task.name] = self.fixed[task.name]
                continue
            losses: dict[int, float] = {}
            for point in range(BLOCKS + 1):
                with net.trying({task.name: point}):
                    _recalibrate_bn(student, calibration, device)
                    student.eval()
                    outputs = _batched([student], held, device)[0]
                    losses[point] = self._held_loss(task, outputs, teacher_outputs)
                net.load_state_dict(saved)
            best = min(losses.values())
            chosen[task.name] = max(b for b, v in losses.items()
                                    if v <= best * (1 + self.config.share_tolerance))
            self.search_losses[task.name] = losses
        return chosen

    def _held_loss(self, task: Any, outputs: dict[str, Tensor],
                   teacher_outputs: list[dict[str, Tensor]]) -> float:
        mine = outputs[task.name]
        teacher = task.resize_output(self._teacher_output(task, teacher_outputs), mine.shape[-2:])
        return float(self._distill(task, mine, teacher))

    def _prune(self, chosen: dict[str, int]) -> None:
        """Replace the supernet by the network of the chosen branching (same weights)."""
        assert isinstance(self.student, KamalModel)
        supernet = _net(self.student)
        kwargs = {**self.student.architecture_kwargs, "branches": chosen}
        pruned = KamalModel(STUDENT_ARCHITECTURE, self.student.tasks, self.student.input_spec,
                            kwargs)
        pruned.net.load_state_dict(supernet.pruned_state(chosen), strict=True)
        device = next(supernet.parameters()).device
        self.student.net = pruned.net.to(device)
        self.student.architecture_kwargs = kwargs

    def _write_outputs(self, trainer: Trainer, held: Tensor | ViewBatch,
                       chosen: dict[str, int]) -> None:
        from .demo import write_demo

        assert self.student is not None
        net = _net(self.student)
        gates = {}
        for name, b in chosen.items():
            gate = net.gate(name, b).detach()
            gates[name] = {"point": b, "channels": int(gate.numel()),
                           "open": int((gate > 0.5).sum()), "mean": round(float(gate.mean()), 4)}
        summary = {"branches": chosen, "search_losses": self.search_losses, "gates": gates,
                   "init": self.config.init}
        (trainer.output_dir / "sbm.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.config.demo_images:
            write_demo(trainer.output_dir / "demo.png", held[:self.config.demo_images],
                       self.teachers, self.student, self.sources, trainer.device,
                       log=trainer.log_figure)

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        if self.student is not None:
            net = _net(self.student)
            described["chosen_branches"] = net.chosen()
        return described


# --- helpers --------------------------------------------------------------------------


def _net(student: Student) -> BranchedSegNet:
    net = student.features
    if not isinstance(net, BranchedSegNet):
        raise KamalError(f"sbm needs an {STUDENT_ARCHITECTURE} student, got "
                         f"{type(net).__name__}")
    return net


def _batched(models: list[Any], images: Tensor | ViewBatch, device: torch.device,
             batch_size: int = 128) -> list[dict[str, Tensor]]:
    """Outputs of each model on ``images``, concatenated over batches (on the CPU)."""
    parts: list[list[dict[str, Tensor]]] = [[] for _ in models]
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        for out, model in zip(parts, models, strict=True):
            out.append({k: v.float().cpu() for k, v in model(x).items()})
    return [{k: torch.cat([p[k] for p in out]) for k in out[0]} for out in parts]


@torch.no_grad()
def _recalibrate_bn(model: nn.Module, images: Tensor | ViewBatch, device: torch.device,
                    batch_size: int = 64) -> None:
    """Re-estimate batch-norm statistics for the current branching (plain averages)."""
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    norms = [m for m in model.modules() if isinstance(m, kinds)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    for start in range(0, len(images), batch_size):
        model(images[start:start + batch_size].to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
