"""``layerwise``: layer-wise knowledge amalgamation.

Shen, Wang, Song, Sun, Song, "Amalgamating Knowledge towards Comprehensive Classification",
AAAI 2019 (arXiv:1811.02796). At each tapped layer an :class:`~.blocks.AmalBlock` encodes
the teachers' concatenated maps into a compact code of the student's width (trained only
by reconstructing every teacher's map), and the student's map, through a 1x1 adaptation,
learns that code. KD on the merged teacher logits trains the classifier.

Two schedules: ``joint`` trains every layer and the logits at once (as KamalEngine did);
``progressive`` (the paper's) amalgamates one tapped layer at a time from the input upward,
each stage training only the student weights up to that layer, then fine-tunes the head.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from kamal import (
    Amalgamator,
    Batch,
    ClassificationTask,
    FeatureRequest,
    KamalError,
    KDTerm,
    KDTermConfig,
    Student,
    StudentSpec,
    Teacher,
)

from .blocks import AmalBlock
from .layers import check_alignment, default_layers, feeding_parameters

if TYPE_CHECKING:
    from kamal import Trainer

_PROBE_IMAGES = 4  # images of the dry forward that checks shapes and finds feeding weights


class LayerwiseConfig(KDTermConfig):
    """Hyperparameters of ``layerwise`` (with the shared KD term's ``temperature``, ``merge``
    and ``kd_weight``)."""

    name: Literal["layerwise"] = "layerwise"
    schedule: Literal["joint", "progressive"] = Field(
        "joint", description="'joint': all tapped layers and KD in one stage (KamalEngine). "
        "'progressive': one stage per tapped layer from the input upward, each training the "
        "student only up to that layer, then a KD stage for the head (the paper's).")
    layers: list[str] | None = Field(
        None, min_length=1, description="Layers to tap, shallow to deep, by module name in the "
        "student and every teacher. Default per architecture: small-cnn/small-vgg "
        "block1..block3, resnet layer1..layer4; otherwise the spatial feature layers.")
    amal_weight: float = Field(1.0, ge=0, description="Weight of the amalgamation loss (MSE "
                               "between the student's adapted map and the teachers' code).")
    recon_weight: float = Field(1.0, ge=0, description="Weight of the reconstruction loss "
                                "(MSE between decoded and real teacher maps, summed over "
                                "teachers); the only loss training the encoders/decoders.")
    layer_epochs: int | None = Field(
        None, ge=1, description="progressive: epochs of each per-layer stage. Default: "
        "train.epochs / (2 x number of layers), so the layers take half the budget.")
    head_epochs: int | None = Field(
        None, ge=1, description="progressive: epochs of the final stage. Default: what is left "
        "of train.epochs after the per-layer stages (the whole run costs train.epochs).")
    head_lr: float | None = Field(
        None, gt=0, description="progressive: learning rate of the final stage. Default: 10x "
        "train.optimizer.lr for finetune=head (a linear head on frozen features is a convex "
        "problem; on digits 1x reached 71%, 10x 86%), train.optimizer.lr for finetune=all.")
    finetune: Literal["head", "all"] = Field(
        "head", description="progressive, final stage: 'head' trains only the weights after the "
        "last tapped layer with KD (the paper's); 'all' trains the whole student with every "
        "loss, which lets the student outgrow the teachers' ensemble.")

    @field_validator("layers")
    @classmethod
    def _distinct(cls, layers: list[str] | None) -> list[str] | None:
        if layers is not None and len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct, got {layers}")
        return layers


class LayerwiseAmalgamator(Amalgamator):
    """Layer-wise amalgamation: auto-encoded teacher features per layer + KD on the logits."""

    name = "layerwise"
    Config = LayerwiseConfig
    config: LayerwiseConfig

    def __init__(self, config: LayerwiseConfig, teachers: list[Teacher],
                 student_spec: StudentSpec) -> None:
        super().__init__(config, teachers, student_spec)
        self.layers: list[str] = list(config.layers or [])
        self.blocks = nn.ModuleDict()
        # what losses() computes; amalgamate() narrows it per progressive stage
        self.amal_layers: list[str] = []
        self.recon_layers: list[str] = []
        self.use_kd = True

    @classmethod
    def check_teachers(cls, teachers: Sequence[Teacher]) -> None:
        if not any(isinstance(task, ClassificationTask) for t in teachers for task in t.tasks):
            raise KamalError("layerwise distils the teachers' merged classification logits, but "
                             f"none of {', '.join(t.name for t in teachers)} has a "
                             "classification task; choose an algorithm for their task kinds "
                             "(kamal list-plugins)")

    # --- setup ----------------------------------------------------------------------------

    def setup(self, student: Student, transfer_images: Iterable[Tensor]) -> None:
        super().setup(student, transfer_images)
        device = next(student.parameters()).device
        images = iter(transfer_images)
        first = next(images, None)
        if first is None:
            raise KamalError("layerwise: the transfer data is empty")
        probe = first[:_PROBE_IMAGES].to(device)
        if not self.layers:
            self.layers = default_layers(student, probe)
        student_ch, teacher_ch = check_alignment(student, self.teachers, self.layers, probe)
        self.blocks = nn.ModuleDict({_key(layer): AmalBlock(student_ch[layer], teacher_ch[layer])
                                     for layer in self.layers}).to(device)
        self.feeding = feeding_parameters(student, self.layers, probe)
        self.kd = KDTerm(self.config, self.teachers, student.tasks)
        self.kd.calibrate(self.teachers, itertools.chain([first], images), device)
        self.amal_layers, self.recon_layers = list(self.layers), list(self.layers)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"amal": self.blocks, "merger": self.kd.merger}

    def feature_layers(self) -> FeatureRequest:
        if not self.layers:  # chosen in setup from the student's shapes: not known yet
            raise KamalError("layerwise: the layers are chosen in setup; ask after it")
        return FeatureRequest(teachers=[list(self.layers) for _ in self.teachers],
                              student=list(self.layers))

    def describe(self) -> dict[str, Any]:
        return {**self.config.model_dump(), "layers": list(self.layers)}

    # --- losses ---------------------------------------------------------------------------

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        assert self.student is not None
        cfg = self.config
        out: dict[str, Tensor] = {}
        for layer in self.layers:
            block = self.blocks[_key(layer)]
            if layer not in self.amal_layers and layer not in self.recon_layers:
                continue
            teacher_maps = [f[layer] for f in batch.teacher_features]
            code = block.encode(teacher_maps)
            if layer in self.amal_layers:
                # the code is a target: only reconstruction shapes the encoder
                out[f"amal/{layer}"] = cfg.amal_weight * F.mse_loss(
                    block.adapt(batch.student_features[layer]), code.detach())
            if layer in self.recon_layers:
                out[f"recon/{layer}"] = cfg.recon_weight * sum(
                    F.mse_loss(d, t) for d, t in zip(block.decode(code), teacher_maps,
                                                     strict=True))
        if self.use_kd:
            out.update(self.kd(batch))
        return out

    # --- schedules ------------------------------------------------------------------------

    def amalgamate(self, trainer: Trainer) -> None:
        if self.config.schedule == "joint":
            self.amal_layers, self.recon_layers = list(self.layers), list(self.layers)
            self.use_kd = True
            trainer.fit(stage="joint")
            return
        for stage in self.progressive_stages(trainer.cfg.epochs, trainer.cfg.optimizer.lr):
            self.amal_layers, self.recon_layers = stage["amal"], stage["recon"]
            self.use_kd = stage["kd"]
            trainer.fit(stage=stage["name"], epochs=stage["epochs"],
                        parameters=stage["parameters"], lr=stage["lr"])

    def progressive_stages(self, total_epochs: int, base_lr: float) -> list[dict[str, Any]]:
        """The progressive plan, one dict per stage: ``name``, ``epochs``, ``lr``, the layers
        with an ``amal`` and a ``recon`` loss, ``kd`` on/off and the trained ``parameters``.

        Stage ``layer:<L>`` trains the student weights feeding ``L`` (everything up to it) with
        the amalgamation losses of the layers up to ``L``. The auto-encoders learn the teachers'
        codes from the first stage on (reconstruction needs no student), so the code a stage
        amalgamates is already settled when it starts. The last stage trains the head with KD.
        """
        assert self.student is not None
        cfg = self.config
        per_layer = cfg.layer_epochs or max(1, total_epochs // (2 * len(self.layers)))
        final_epochs = cfg.head_epochs or max(1, total_epochs - per_layer * len(self.layers))
        coders = [p for block in self.blocks.values()
                  for p in (*block.encoder.parameters(), *block.decoder.parameters())]
        stages = []
        for depth, layer in enumerate(self.layers, start=1):
            upto = self.layers[:depth]
            adapters = [p for name in upto for p in self.blocks[_key(name)].adapter.parameters()]
            stages.append({"name": f"layer:{layer}", "epochs": per_layer,
                           "lr": None, "amal": upto, "recon": list(self.layers), "kd": False,
                           "parameters": _unique([*self.feeding[layer], *adapters, *coders])})
        if cfg.finetune == "all":
            final = {"amal": list(self.layers), "recon": list(self.layers),
                     "parameters": [*self.student.parameters(), *self.blocks.parameters()]}
        else:
            below = {id(p) for params in self.feeding.values() for p in params}
            head = [p for p in self.student.parameters() if id(p) not in below]
            if not head:
                raise KamalError("layerwise: the student has no weights after the last tapped "
                                 f"layer '{self.layers[-1]}', so finetune=head has nothing to "
                                 "train; tap fewer layers or set algorithm.finetune=all")
            final = {"amal": [], "recon": [], "parameters": head}
        lr = cfg.head_lr or (10 * base_lr if cfg.finetune == "head" else None)
        stages.append({"name": f"finetune:{cfg.finetune}", "epochs": final_epochs, "lr": lr,
                       "kd": True, **final})
        return stages


def _key(layer: str) -> str:
    """ModuleDict keys cannot contain dots (``layer1.0``)."""
    return layer.replace(".", "_").replace(":", "_")


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())
