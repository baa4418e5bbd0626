"""``cfl``: Common Feature Learning (Luo et al., IJCAI 2019, arXiv:1906.10546).

The student learns from heterogeneous teachers in two ways at once: its logits follow the
teachers' merged logits (KD at temperature T), and its feature, mapped into a common space
shared with every teacher's feature, must be distributed like each of them there (MMD).
Per-teacher decoders must reconstruct each teacher's feature from its common feature, so
the common space keeps the teachers' knowledge instead of collapsing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from kamal import (
    Amalgamator,
    Batch,
    FeatureRequest,
    FeatureTap,
    KamalError,
    KDTerm,
    Student,
    ViewBatch,
)

from .blocks import CommonFeatureBlock, as_features, build_block
from .config import HEAD, CFLConfig
from .losses import mmd_rbf_to_each, reconstruction_loss

if TYPE_CHECKING:
    from kamal import Teacher, Trainer

PLOT_NAME = "cfl_tsne.png"
_CALIBRATION_IMAGES = 1024  # enough for per-channel statistics of the teachers' features


def resolve_layer(model: nn.Module, layer: str, owner: str) -> str:
    """Replace ``<head>`` in ``layer`` by ``model``'s classification head name."""
    if not layer.startswith(HEAD):
        return layer
    head = getattr(model, "head_layer", None)
    if not head:
        known = ", ".join(getattr(model, "feature_layers", []) or []) or "see the architecture"
        raise KamalError(f"{owner}'s architecture names no classification head, so algorithm."
                         f"layer '{layer}' cannot be resolved; set algorithm.layer (or "
                         f"algorithm.teacher_layers) to one of its layers: {known}")
    return head + layer[len(HEAD):]


class CFLAmalgamator(Amalgamator):
    """Common Feature Learning: KD on merged logits + MMD in a common feature space.

    Works with teachers of different architectures and feature widths; the common-feature
    block (FC for pooled vectors, conv for feature maps) is trained with the student by the
    engine's optimizer, and its state is checkpointed with the run.
    """

    name = "cfl"
    # teachers may read their own resolution: the block pools or resizes every feature map
    # to the student's before comparing, and the KD term compares outputs only
    mixed_views = True
    Config = CFLConfig
    config: CFLConfig

    @classmethod
    def check_teachers(cls, teachers: Sequence[Teacher]) -> None:
        """Every teacher needs a classification task: the KD term distils merged logits."""
        for teacher in teachers:
            if not any(task.kind == "classification" for task in teacher.tasks):
                kinds = ", ".join(sorted({task.kind for task in teacher.tasks}))
                raise KamalError(f"cfl distils classification logits, but teacher "
                                 f"'{teacher.name}' has only {kinds} tasks; use an algorithm "
                                 "for its task kind (kamal list-plugins)")

    def setup(self, student: Student, transfer_images: Iterable[Tensor]) -> None:
        super().setup(student, transfer_images)
        cfg = self.config
        device = next(student.parameters()).device
        # one pass over the (possibly one-shot) iterator: the merger sees every image, the
        # leading batches are kept to size and calibrate the block and for the t-SNE plot
        images: list[Tensor] = []
        self.kd = KDTerm(cfg, self.teachers, student.tasks)
        self.kd.calibrate(self.teachers, _keeping(transfer_images, images, max(
            _CALIBRATION_IMAGES, cfg.tsne_samples)), device)
        if not images:
            raise KamalError("cfl needs transfer images to size and calibrate its blocks")
        self.student_layer = resolve_layer(student, cfg.layer, "the student")
        names = cfg.teacher_layers or [cfg.layer] * len(self.teachers)
        if len(names) != len(self.teachers):
            raise KamalError(f"algorithm.teacher_layers has {len(names)} entries for "
                             f"{len(self.teachers)} teachers; give one layer per teacher")
        self.teacher_layers = [resolve_layer(t.model, n, f"teacher '{t.name}'")
                               for t, n in zip(self.teachers, names, strict=True)]
        student_feature, teacher_features = self._features(images[:1], device)
        channels = student_feature.shape[1]
        hidden = max(cfg.min_hidden, round(cfg.hidden_ratio * channels))
        self.block: CommonFeatureBlock = build_block(
            student_feature.shape, [f.shape for f in teacher_features], hidden).to(device)
        if cfg.standardize_features:
            self.block.calibrate(self._features(_first(images, _CALIBRATION_IMAGES), device,
                                                student_too=False, prepared=True)[1])
        joined = ViewBatch.cat(images) if isinstance(images[0], ViewBatch) else torch.cat(images)
        self.plot_images = joined[:cfg.tsne_samples].to("cpu")

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"merger": self.kd.merger, "cfl": self.block}

    def feature_layers(self) -> FeatureRequest:
        return FeatureRequest(teachers=[[layer] for layer in self.teacher_layers],
                              student=[self.student_layer])

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        assert self.student is not None
        cfg = self.config
        losses = self.kd(batch)
        common = self.block(self._student_feature(batch.student_features),
                            [as_features(f[layer], f"teacher '{t.name}'", layer)
                             for f, t, layer in zip(batch.teacher_features, self.teachers,
                                                    self.teacher_layers, strict=True)])
        mmd = mmd_rbf_to_each(common.student, common.teachers, cfg.sigmas, cfg.normalize,
                              cfg.kernel_reduction).sum()
        losses["mmd"] = self._capped(cfg.mmd_weight * mmd, dict(losses), batch)
        losses["recon"] = cfg.recon_weight * reconstruction_loss(common.reconstructions,
                                                                 common.targets)
        return losses

    def amalgamate(self, trainer: Trainer) -> None:
        """Train, then plot the common features of the teachers and the student (t-SNE)."""
        trainer.fit()
        if self.config.tsne_samples > 0:
            from .tsne import plot_common_features

            plot_common_features(self, self.plot_images, Path(trainer.output_dir) / PLOT_NAME,
                                 trainer.log_figure)

    # --- helpers --------------------------------------------------------------------

    def _capped(self, mmd: Tensor, kd_losses: dict[str, Tensor], batch: Batch) -> Tensor:
        """``mmd`` scaled so that its gradient at the student's feature is at most
        ``feature_grad_ratio`` times the KD terms' gradient there (never scaled up). The
        two gradients are measured every ``feature_grad_every`` steps; the scale between is
        the block's ``mmd_scale`` buffer, checkpointed with it (a resumed run keeps it)."""
        ratio = self.config.feature_grad_ratio
        feature = batch.student_features[self.student_layer]
        if (ratio is None or self.config.kd_weight == 0 or not kd_losses
                or not mmd.requires_grad or not feature.requires_grad):
            return mmd
        scale = self.block.mmd_scale
        if batch.step % self.config.feature_grad_every == 0:
            kd = sum(kd_losses.values())
            g_kd, g_mmd = (torch.autograd.grad(loss, feature, retain_graph=True,
                                               allow_unused=True)[0] for loss in (kd, mmd))
            if g_kd is None or g_mmd is None:
                return mmd
            scale.copy_((ratio * g_kd.norm() / g_mmd.norm().clamp_min(1e-12)).clamp(max=1.0))
        return mmd * scale.detach().clone()

    def _student_feature(self, features: dict[str, Tensor]) -> Tensor:
        return as_features(features[self.student_layer], "the student", self.student_layer)

    @torch.no_grad()
    def _features(self, images: list[Tensor] | list[ViewBatch], device: torch.device,
                  student_too: bool = True, prepared: bool = False) -> tuple[Tensor, list[Tensor]]:
        """The tapped layer of the student (in eval mode) and of each teacher on ``images``.

        With ``prepared``, teachers' features go through the block's ``prepare`` batch by
        batch (pooled or resized to the student's size) before being concatenated.
        """
        assert self.student is not None
        teacher_parts: list[list[Tensor]] = [[] for _ in self.teachers]
        student_parts: list[Tensor] = []
        was_training = self.student.training
        self.student.eval()
        try:
            for batch in images:
                batch = batch.to(device)
                for i, (teacher, layer) in enumerate(zip(self.teachers, self.teacher_layers,
                                                         strict=True)):
                    with FeatureTap(teacher.model.features, [layer], teacher.name) as tap:
                        teacher(batch)
                    feature = as_features(tap.features[layer], f"teacher '{teacher.name}'", layer)
                    teacher_parts[i].append(self.block.prepare(feature) if prepared else feature)
                if student_too:
                    with FeatureTap(self.student.features, [self.student_layer], "student") as tap:
                        self.student(batch)
                    student_parts.append(self._student_feature(tap.features))
        finally:
            self.student.train(was_training)
        student = torch.cat(student_parts) if student_parts else torch.empty(0)
        return student, [torch.cat(parts) for parts in teacher_parts]


def _keeping(batches: Iterable[Tensor], kept: list[Tensor], count: int) -> Iterator[Tensor]:
    """Yield ``batches``, appending the leading ones (about ``count`` images) to ``kept``."""
    total = 0
    for batch in batches:
        if total < count:
            kept.append(batch)
            total += len(batch)
        yield batch


def _first(batches: list[Tensor], count: int) -> list[Tensor]:
    """The leading batches holding about ``count`` images."""
    kept, total = [], 0
    for batch in batches:
        if total >= count:
            break
        kept.append(batch)
        total += len(batch)
    return kept
