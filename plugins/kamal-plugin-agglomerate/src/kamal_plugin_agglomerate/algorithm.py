"""``agglomerate``: one student backbone distilled from many teachers' features.

Per teacher, its summary vector and/or feature map (the *targets*) are predicted from the
student's backbone by an adaptor head, in a space where the teachers are balanced (PHI-S by
default). Losses as in AM-RADIO: cosine on summaries; 0.9 cosine + 0.1 smooth-L1 per
position on maps, the student's map resized bilinearly to the teacher's grid. The student
trains at several input sizes in turn while each teacher reads its own view. Where a
teacher's head follows its tapped layer as one module, the head is transplanted onto the
student's adaptor (mapped back to the teacher's space), so the saved student does every
such teacher's task.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kamal import (
    Amalgamator,
    Batch,
    ConfigError,
    FeatureRequest,
    FeatureTap,
    InputSpec,
    KamalError,
    KamalModel,
    Student,
    StudentSpec,
    ViewBatch,
    get_registry,
    is_main_process,
    student_input_spec,
)

from .adaptor import as_map, resize_map, summary_of
from .balance import channels_first, channels_last
from .config import AgglomerateConfig
from .heads import HeadSearch, find_head
from .network import SPATIAL, SUMMARY, AgglomeratedNet, build_backbone, patch_size

if TYPE_CHECKING:
    from kamal import Teacher, Trainer

REPORT_NAME = "agglomerate.json"
_PROBE = 2          # images in the shape probe of build_student
_SHARE_IMAGES = 64  # images the gradient shares are measured on
_KEPT_IMAGES = 256  # setup images kept for the start-of-run figures (and the fallback sweep)


def default_layers(teacher: Teacher) -> dict[str, str | None]:
    """The layers distilled from ``teacher`` when the config names none (module docstring
    of :mod:`.config`)."""
    modules = dict(teacher.model.features.named_modules())
    if "pooled" in modules and "last_hidden_state" in modules:  # a transformers model
        return {SUMMARY: "pooled", SPATIAL: "last_hidden_state"}
    head = getattr(teacher.model, "head_layer", None)
    if head and any(task.kind == "classification" for task in teacher.tasks):
        return {SUMMARY: f"{head}:in", SPATIAL: None}
    layers = list(getattr(teacher.model, "feature_layers", None) or [])
    return {SUMMARY: None, SPATIAL: layers[-1] if layers else None}


def teacher_target(feature: Tensor, kind: str, size: tuple[int, int], patch: int | None) -> Tensor:
    """A teacher's tapped feature as a target: (N, C) for a summary, (N, C, h, w) for a map."""
    return summary_of(feature, size, patch) if kind == SUMMARY else as_map(feature, size, patch)


class AgglomerateAmalgamator(Amalgamator):
    """Agglomerative feature distillation with adaptor heads and head transplant."""

    name = "agglomerate"
    mixed_views = True          # every teacher reads its own view; maps are resized here
    backbone_teachers = True    # features are all it needs
    Config = AgglomerateConfig
    config: AgglomerateConfig

    def __init__(self, config: AgglomerateConfig, teachers: list[Teacher],
                 student_spec: StudentSpec) -> None:
        super().__init__(config, teachers, student_spec)
        given = config.teacher_layers
        if given is not None and len(given) != len(teachers):
            raise ConfigError(f"algorithm.teacher_layers has {len(given)} entries for "
                              f"{len(teachers)} teachers; give one per teacher")
        # targets: (teacher index, kind, layer), in teacher order
        self.targets: list[tuple[int, str, str]] = []
        for i, teacher in enumerate(teachers):
            layers = given[i].model_dump() if given is not None else default_layers(teacher)
            found = [(i, kind, layers[kind]) for kind in (SUMMARY, SPATIAL) if layers[kind]]
            if not found:
                raise ConfigError(
                    f"teachers.{i}: '{teacher.name}' has no tappable feature layer kamal can "
                    "choose; name one with algorithm.teacher_layers: [{summary: <layer>} or "
                    "{spatial: <layer>}, ...] (kamal inspect lists its layers)")
            self.targets.extend(found)
        self.head_reasons: dict[str, str] = {}
        self.shares: dict[str, dict[str, float]] = {}
        self.sweep: dict[str, dict[str, float]] = {}
        self.steps_trained = 0
        self.measured_on = ""

    # --- the student ------------------------------------------------------------------

    def build_student(self) -> Student:
        """Backbone + adaptors + the teachers' separable heads, sized by a probe."""
        spec = self.student_spec
        input_spec = spec.input_spec or student_input_spec(self.teachers)
        generator = torch.Generator().manual_seed(0)  # the probe leaves the run's RNG alone
        targets, heads, tasks = [], [], []
        reasons: dict[int, str] = {}
        modules: list[torch.nn.Module] = []  # the teachers' heads, to copy into the student
        for index, (i, _, _) in enumerate(self.targets):
            target, found = self._probe_target(index, generator)
            targets.append(target)
            if found.config is None:
                reasons[i] = found.reason
                continue
            heads.append({**found.config, "target": index})
            modules.append(found.module)
            tasks.extend(t for t in self.teachers[i].tasks if t.name == found.config["task"])
        with_head = {self.targets[h["target"]][0] for h in heads}
        self.head_reasons = {self.teachers[i].name: why for i, why in reasons.items()
                             if i not in with_head}
        for name, why in self.head_reasons.items():
            warnings.warn(f"agglomerate: teacher '{name}' keeps no head in the student ({why}); "
                          "the report gives its feature similarity only", stacklevel=2)
        names = [t.name for t in tasks]
        if len(set(names)) < len(names):
            raise ConfigError(f"the teachers' transplanted heads share task names ({names}); "
                              "teachers distilled by agglomerate need distinct task names")
        kwargs = {"backbone": self._backbone_config(input_spec), "targets": targets,
                  "heads": heads, "adaptor_hidden": self.config.adaptor_hidden,
                  "adaptor_depth": self.config.adaptor_depth}
        student = KamalModel("agglomerated", tasks, input_spec, kwargs)
        for head, teachers_head in zip(student.features.heads, modules, strict=True):
            head.load_state_dict(teachers_head.state_dict())
        if self.config.init:
            self._init_backbone(student.features)
        return student

    def _probe_target(self, index: int, generator: torch.Generator) -> tuple[dict[str, Any],
                                                                             HeadSearch]:
        """Target ``index``'s entry of the student's ``targets`` (its width and stride, from
        random images at its teacher's size) and the search for the head that follows it."""
        i, kind, layer = self.targets[index]
        teacher = self.teachers[i]
        size = tuple(teacher.input_spec.size)
        images = torch.rand(_PROBE, teacher.input_spec.channels, *size, generator=generator)
        with torch.no_grad(), FeatureTap(teacher.model.features, [layer],
                                         f"teacher '{teacher.name}'") as tap:
            teacher(images)
        feature = tap.features[layer]
        if not isinstance(feature, Tensor) or feature.dim() not in (2, 3, 4):
            raise ConfigError(f"teachers.{i}: layer '{layer}' of '{teacher.name}' gives "
                              f"{_shape(feature)}, not a feature vector, map or tokens; "
                              "choose another layer in algorithm.teacher_layers")
        if kind == SPATIAL and feature.dim() == 2:
            raise ConfigError(f"teachers.{i}: layer '{layer}' of '{teacher.name}' gives one "
                              "vector per image; distil it as its summary, not spatial")
        target = teacher_target(feature, kind, size, patch_size(teacher.model.features))
        entry = {"teacher": teacher.name, "kind": kind, "layer": layer,
                 "channels": int(target.shape[1]), "balance": self.config.balance,
                 "stride": (size[0] / target.shape[-2]) if kind == SPATIAL else None}
        if feature.shape != target.shape:  # pooled or folded: the head reads something else
            return entry, HeadSearch(reason=f"its layer '{layer}' is reshaped before "
                                            "distillation")
        return entry, find_head(teacher, layer, images)

    def _init_backbone(self, net: AgglomeratedNet) -> None:
        """Copy ``init``'s teacher weights into the backbone (equal names and shapes)."""
        names = [t.name for t in self.teachers]
        if self.config.init not in names:
            raise ConfigError(f"algorithm.init: no teacher named '{self.config.init}'; the "
                              f"teachers are: {', '.join(names)}")
        teacher = self.teachers[names.index(self.config.init)]
        spec, model = self.student_spec, teacher.model
        if (getattr(model, "architecture", None) != spec.architecture
                or getattr(model, "architecture_kwargs", None) != spec.architecture_kwargs):
            raise ConfigError(f"algorithm.init: teacher '{teacher.name}' is not a "
                              f"'{spec.architecture}' with options {spec.architecture_kwargs}, "
                              "so its weights do not fit the student's backbone")
        source = model.features.state_dict()
        state = net.backbone.state_dict()
        copied = {k: v for k, v in source.items() if k in state and state[k].shape == v.shape}
        net.backbone.load_state_dict({**state, **copied})

    def _backbone_config(self, input_spec: InputSpec) -> dict[str, Any]:
        """The backbone's architecture, tapped layers and their widths (by a probe)."""
        spec = self.student_spec
        registry = get_registry()
        try:
            registry.get("architectures", spec.architecture)
        except KamalError as exc:
            raise ConfigError(f"student.architecture: {exc}") from None
        probe, layers = build_backbone(spec.architecture, spec.architecture_kwargs,
                                       input_spec.channels)
        probe.eval()
        size = tuple(input_spec.size)
        images = torch.rand(_PROBE, input_spec.channels, *size,
                            generator=torch.Generator().manual_seed(1))
        maps = [name for name, shape in _layer_shapes(probe, layers, images).items()
                if len(shape) in (3, 4)]
        layer = self.config.backbone or (maps[-1] if maps else None)
        if layer is None:
            raise ConfigError(f"student.architecture '{spec.architecture}' names no feature layer "
                              "giving a map; set algorithm.backbone to one of its layers")
        summary_layer = self.config.summary_layer or layer
        with torch.no_grad(), FeatureTap(probe, sorted({layer, summary_layer}),
                                         "the student's backbone") as tap:
            probe(images)
        patch = patch_size(probe)
        try:
            spatial = as_map(tap.features[layer], size, patch)
            summary = summary_of(tap.features[summary_layer], size, patch)
        except ValueError as exc:
            raise ConfigError(f"algorithm.backbone '{layer}': {exc}") from None
        self._check_sizes(patch)
        return {"architecture": spec.architecture, "architecture_kwargs": spec.architecture_kwargs,
                "layer": layer, "summary_layer": summary_layer,
                "channels": {SPATIAL: int(spatial.shape[1]), SUMMARY: int(summary.shape[1])}}

    def _check_sizes(self, patch: int | None) -> None:
        for field in ("student_sizes", "sweep_sizes"):
            bad = [s for s in getattr(self.config, field) or [] if patch and s % patch]
            if bad:
                raise ConfigError(f"algorithm.{field}: {bad} not divisible by the student's ViT "
                                  f"patch size {patch}; use multiples of {patch}")

    # --- setup and training ------------------------------------------------------------

    def setup(self, student: Student, transfer_images: Iterable[Tensor]) -> None:
        super().setup(student, transfer_images)
        net = self.net
        device = next(student.parameters()).device
        kept: list[Tensor | ViewBatch] = []  # a few images for the start-of-run figures
        moments = [_Moments(t["channels"]) for t in net.targets]
        count = 0
        for batch in transfer_images:  # train.calibration_images bounds them
            batch = batch.to(device)
            for moment, target in zip(moments, self._teacher_targets(batch), strict=True):
                moment.update(channels_last(target).reshape(-1, target.shape[1]))
            if count < _KEPT_IMAGES:
                kept.append(batch.to("cpu"))
                count += len(batch)
        if not kept:
            raise KamalError("agglomerate needs transfer images to balance its teachers")
        for normalizer, moment in zip(net.normalizers, moments, strict=True):
            normalizer.fit_moments(moment.count, moment.total, moment.outer)
        self.kept = (ViewBatch.cat(kept) if isinstance(kept[0], ViewBatch)
                     else torch.cat(kept))[:_KEPT_IMAGES]
        self._check_student_sizes(device)
        self.shares["start"] = self.gradient_shares(self.kept[:_SHARE_IMAGES].to(device))

    @property
    def net(self) -> AgglomeratedNet:
        assert self.student is not None, "call setup first"
        net = self.student.features
        assert isinstance(net, AgglomeratedNet)
        return net

    def _check_student_sizes(self, device: torch.device) -> None:
        """Run the student once at each training size: a size it cannot read fails here,
        with the size named, not mid-training."""
        images = self._student_view(self.kept[:1]).to(device)
        was_training = self.student.training
        self.student.eval()
        try:
            for size in self.config.student_sizes or []:
                try:
                    with torch.no_grad():
                        self.student(_resized(images, size))
                except (RuntimeError, ValueError, AssertionError) as exc:
                    raise ConfigError(f"algorithm.student_sizes: the student cannot read "
                                      f"{size}x{size} images ({str(exc).splitlines()[0]})") from None
        finally:
            self.student.train(was_training)

    def feature_layers(self) -> FeatureRequest:
        layers: list[list[str]] = [[] for _ in self.teachers]
        for i, _, layer in self.targets:
            if layer not in layers[i]:
                layers[i].append(layer)
        return FeatureRequest(teachers=layers,
                              student=[f"adaptors.{k}" for k in range(len(self.targets))])

    def student_images(self, images: Tensor, step: int) -> Tensor:
        sizes = self.config.student_sizes
        return _resized(images, sizes[step % len(sizes)]) if sizes else images

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        kept = self._kept_teachers(batch.step)
        losses: dict[str, Tensor] = {}
        for k, (i, kind, layer) in enumerate(self.targets):
            name = f"{self.teachers[i].name}/{kind}"
            if i not in kept:
                continue
            target = self._normalised(k, batch.teacher_features[i][layer])
            losses[name] = self._loss(k, batch.student_features[f"adaptors.{k}"], target)
        if self.config.output_weight > 0:
            losses.update(self._output_losses(batch, kept))
        return losses

    def _output_losses(self, batch: Batch, kept: set[int]) -> dict[str, Tensor]:
        """Each transplanted head's output against its teacher's, by the task's own
        distillation loss (the heads are frozen: the gradient reaches adaptors and backbone)."""
        losses = {}
        for config in self.net.head_configs:
            i = self.targets[config["target"]][0]
            if i not in kept:
                continue
            task = next(t for t in self.teachers[i].tasks if t.name == config["task"])
            teacher = batch.teacher_outputs[i][task.name]
            student = batch.student_outputs[task.name]
            if teacher.dim() == 4:
                student = task.resize_output(student, teacher.shape[-2:])
            losses[f"{self.teachers[i].name}/output"] = (
                self.config.output_weight * task.distill_loss(student, teacher))
        return losses

    def amalgamate(self, trainer: Trainer) -> None:
        """Train on all but the held-out images; then measure the gradient shares again and
        the resolution sweep on the held-out ones, and draw demo.png."""
        held = self._hold_out(trainer)
        trainer.fit()
        self.steps_trained = trainer.global_step
        device = next(self.net.parameters()).device
        images = held if held is not None else self.kept
        self.measured_on = ("held-out transfer images" if held is not None
                            else "transfer images the student trained on")
        self.shares["end"] = self.gradient_shares(images[:_SHARE_IMAGES].to(device))
        self.sweep = self.resolution_sweep(images.to(device))
        if is_main_process():
            out = Path(trainer.output_dir)
            (out / REPORT_NAME).write_text(json.dumps(self.measurements(), indent=2) + "\n")
            if self.config.demo_images:
                from .demo import write_demo

                write_demo(out / "demo.png", images[:self.config.demo_images], self.teachers,
                           self.student, device, log=trainer.log_figure)

    def _hold_out(self, trainer: Trainer) -> Tensor | ViewBatch | None:
        """Hold ``holdout_images`` transfer images out of training (drawn from the seed, so a
        resumed run holds out the same); None when there are too few, or when the training
        samples do not carry the teachers' views (a teacher cache keeps the student's only)."""
        count, seed = trainer.num_samples, trainer.cfg.seed
        n = self.config.holdout_images
        if n == 0 or count < 4 * n:
            return None
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + 7919))
        index = sorted(order[:n].tolist())
        held = trainer.images(index, seed=seed)
        if isinstance(held, ViewBatch) != isinstance(self.kept, ViewBatch):
            return None
        trainer.hold_out(index)
        return held

    def measurements(self) -> dict[str, Any]:
        return {"gradient_share": self.shares, "resolution_sweep": self.sweep,
                "measured_on": self.measured_on,
                "teacher_drop": self._drop_counts(),
                "features_only": self.head_reasons}

    # --- measurements -------------------------------------------------------------------

    def gradient_shares(self, images: Tensor | ViewBatch) -> dict[str, float]:
        """Each teacher's share of the gradient norm on the student's backbone weights (what
        the optimiser sees), on ``images``; the student is in eval mode, nothing updated."""
        targets = [self._normalised(k, t) for k, t in enumerate(self._teacher_targets(images))]
        net = self.net
        weights = [p for p in net.backbone.parameters() if p.requires_grad]
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.enable_grad():
                predictions = net.predictions(self._normalised_input(images))
                losses: dict[str, Tensor] = {}
                for k, (i, _, _) in enumerate(self.targets):
                    name = self.teachers[i].name
                    losses[name] = losses.get(name, 0) + self._loss(k, predictions[k], targets[k])
                norms = {}
                for name, loss in losses.items():
                    grads = torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
                    norms[name] = sum(float(g.pow(2).sum()) for g in grads if g is not None) ** 0.5
        finally:
            self.student.train(was_training)
        total = sum(norms.values()) or 1.0
        return {name: round(v / total, 4) for name, v in norms.items()}

    @torch.no_grad()
    def resolution_sweep(self, images: Tensor | ViewBatch) -> dict[str, dict[str, float]]:
        """Per target, the student's relative feature error (balanced space) at each size."""
        size = tuple(self.student.input_spec.size)
        sizes = self.config.sweep_sizes or self.config.student_sizes or [
            _even(0.75 * size[0]), size[0], _even(1.25 * size[0])]
        targets = [self._normalised(k, t) for k, t in enumerate(self._teacher_targets(images))]
        was_training = self.student.training
        self.student.eval()
        try:
            sweep: dict[str, dict[str, float]] = {}
            for s in sorted(set(sizes)):
                predictions = self.net.predictions(_resized(self._normalised_input(images), s))
                for k, (i, kind, _) in enumerate(self.targets):
                    error = _relative_error(predictions[k], targets[k])
                    sweep.setdefault(f"{self.teachers[i].name}/{kind}", {})[str(s)] = round(error, 5)
        finally:
            self.student.train(was_training)
        return sweep

    # --- helpers ------------------------------------------------------------------------

    def _teacher_targets(self, images: Tensor | ViewBatch) -> list[Tensor]:
        """Every target of every teacher on ``images`` (teachers' own views; no grad)."""
        out: list[Tensor] = []
        for i, teacher in enumerate(self.teachers):
            layers = [layer for j, _, layer in self.targets if j == i]
            with torch.no_grad(), FeatureTap(teacher.model.features, layers,
                                             f"teacher '{teacher.name}'") as tap:
                teacher(images)
            size = tuple(teacher.input_spec.size)
            patch = patch_size(teacher.model.features)
            out.extend(teacher_target(tap.features[layer], kind, size, patch)
                       for j, kind, layer in self.targets if j == i)
        return out

    def _normalised(self, k: int, feature: Tensor) -> Tensor:
        i, kind, _ = self.targets[k]
        teacher = self.teachers[i]
        target = teacher_target(feature, kind, tuple(teacher.input_spec.size),
                                patch_size(teacher.model.features))
        return channels_first(self.net.normalizers[k](channels_last(target.float())))

    def _normalised_input(self, images: Tensor | ViewBatch) -> Tensor:
        """The student's view of ``images``, normalised as the student normalises."""
        x = self._student_view(images)
        return (x - self.student.mean) / self.student.std

    def _student_view(self, images: Tensor | ViewBatch) -> Tensor:
        return images.for_model(self.student) if isinstance(images, ViewBatch) else images

    def _loss(self, k: int, prediction: Tensor, target: Tensor) -> Tensor:
        cfg = self.config
        if self.targets[k][1] == SUMMARY:
            return cfg.summary_weight * (1 - F.cosine_similarity(prediction, target, dim=1)).mean()
        prediction = resize_map(prediction, tuple(target.shape[-2:]))
        loss = prediction.new_zeros(())
        if cfg.spatial_cosine:
            loss = loss + cfg.spatial_cosine * (1 - F.cosine_similarity(prediction, target,
                                                                        dim=1)).mean()
        if cfg.spatial_smooth_l1:
            loss = loss + cfg.spatial_smooth_l1 * F.smooth_l1_loss(prediction, target)
        if cfg.spatial_mse:
            loss = loss + cfg.spatial_mse * F.mse_loss(prediction, target)
        return cfg.spatial_weight * loss

    def _kept_teachers(self, step: int) -> set[int]:
        """Teachers whose losses count at ``step`` (UNIC's teacher dropping): drawn from the
        step number alone, so a resumed run drops the same ones."""
        everyone = set(range(len(self.teachers)))
        p = self.config.teacher_drop
        if p == 0:
            return everyone
        seed = int.from_bytes(hashlib.sha256(f"drop {step}".encode()).digest()[:8], "little")
        draws = torch.rand(len(self.teachers), generator=torch.Generator().manual_seed(seed))
        return {i for i in everyone if float(draws[i]) >= p} or {int(draws.argmax())}

    def _drop_counts(self) -> dict[str, Any]:
        """How often each teacher's losses were skipped over the steps trained (recomputed
        from the step numbers, so a resumed run counts the same)."""
        dropped = dict.fromkeys((t.name for t in self.teachers), 0)
        if self.config.teacher_drop > 0:
            for step in range(self.steps_trained):
                kept = self._kept_teachers(step)
                for i, teacher in enumerate(self.teachers):
                    dropped[teacher.name] += i not in kept
        return {"probability": self.config.teacher_drop, "steps": self.steps_trained,
                "dropped": dropped}


class _Moments:
    """Running count, sum and sum of outer products of feature vectors (float64)."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.total = torch.zeros(channels, dtype=torch.float64)
        self.outer = torch.zeros(channels, channels, dtype=torch.float64)

    def update(self, vectors: Tensor) -> None:
        x = vectors.detach().to("cpu", torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.T @ x


def _resized(images: Tensor, size: int) -> Tensor:
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < images.shape[-1])


def _relative_error(prediction: Tensor, target: Tensor) -> float:
    if prediction.dim() == 4:
        prediction = resize_map(prediction, tuple(target.shape[-2:]))
    return float((prediction - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12))


def _even(value: float) -> int:
    return max(8, int(round(value / 8)) * 8)


def _shape(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def _layer_shapes(net: torch.nn.Module, names: Sequence[str],
                  images: Tensor) -> dict[str, tuple[int, ...]]:
    """Output shape of each of the layers ``names`` (in their order)."""
    with torch.no_grad(), FeatureTap(net, list(names), "the student's backbone") as tap:
        net(images)
    return {n: tuple(tap.features[n].shape) for n in names if isinstance(tap.features.get(n), Tensor)}
