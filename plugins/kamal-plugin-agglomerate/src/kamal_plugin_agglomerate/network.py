"""The agglomerated student: a backbone, one adaptor per teacher target, and the teachers'
own heads transplanted onto the adaptors' outputs.

Registered as the architecture ``agglomerated``, so a saved student repo is rebuilt from
its ``config.json`` like any kamal model: the backbone is a registered architecture, and
each transplanted head is the named submodule of its teacher's (registered) architecture,
built from the teacher's recorded config and filled from the student's own safetensors.

Forward: the backbone runs; its tapped ``layer`` (map or ViT tokens) feeds the spatial
adaptors, its ``summary_layer`` (pooled, or the class token) the summary adaptors. Each
adaptor predicts its teacher's feature in the balanced space (see :mod:`.balance`); a head
reads the prediction mapped back to its teacher's space (and, for a map, resized to the
grid its teacher would have at this input size) and gives the teacher's task output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from kamal import Architecture, ClassificationTask, FeatureTap, InputSpec, KamalModel, Task, get_registry

from .adaptor import Adaptor, as_map, resize_map, summary_of
from .balance import FeatureNormalizer, channels_first, channels_last, normalised_width

SUMMARY, SPATIAL = "summary", "spatial"


def build_registered(architecture: str, architecture_kwargs: dict[str, Any], tasks: list[Task],
                     input_spec: dict[str, Any]) -> nn.Module:
    """The network (``KamalModel.net``) of a registered architecture, randomly initialised."""
    return KamalModel(architecture, tasks, InputSpec.from_dict(input_spec), architecture_kwargs).net


def build_backbone(architecture: str, architecture_kwargs: dict[str, Any],
                   channels: int) -> tuple[nn.Module, list[str]]:
    """A registered architecture as a backbone (its own head unused) and its feature layers."""
    model = KamalModel(architecture, [ClassificationTask("backbone", ["unused"])],
                       InputSpec(channels, (32, 32), (0.5,), (0.5,)), architecture_kwargs)
    return model.net, list(model.feature_layers)


def tasks_from_dicts(described: Sequence[dict[str, Any]]) -> list[Task]:
    """Tasks rebuilt from their ``to_dict`` form through the task registry."""
    registry = get_registry()
    return [registry.get("tasks", d["kind"]).from_dict(d) for d in described]


def patch_size(backbone: nn.Module) -> int | None:
    """The backbone's patch size when it is a ViT that says so (timm's ``patch_embed``)."""
    embed = getattr(getattr(backbone, "model", backbone), "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    if size is None:
        return None
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class AgglomeratedNet(nn.Module):
    """See the module docstring. ``targets[i]``: ``{"teacher", "kind" (summary|spatial),
    "channels", "balance", "stride"}``; ``heads[j]``: ``{"target", "module", "model"
    (the teacher's architecture, architecture_kwargs, tasks, input), "task"}``."""

    def __init__(self, tasks: Sequence[Task], in_channels: int, backbone: dict[str, Any],
                 targets: Sequence[dict[str, Any]], heads: Sequence[dict[str, Any]] = (),
                 adaptor_hidden: int = 256, adaptor_depth: int = 2) -> None:
        super().__init__()
        self.backbone_config = dict(backbone)
        self.layer = backbone["layer"]
        self.summary_layer = backbone.get("summary_layer") or self.layer
        self.backbone, _ = build_backbone(backbone["architecture"],
                                          backbone.get("architecture_kwargs", {}), in_channels)
        self.patch = patch_size(self.backbone)
        self.targets = [dict(t) for t in targets]
        widths = backbone["channels"]  # {"spatial": C, "summary": C} of the tapped layers
        self.adaptors = nn.ModuleList(
            Adaptor(int(widths[t["kind"]]), normalised_width(int(t["channels"]), t["balance"]),
                    adaptor_hidden, adaptor_depth) for t in self.targets)
        self.normalizers = nn.ModuleList(FeatureNormalizer(int(t["channels"]), t["balance"])
                                         for t in self.targets)
        self.head_configs = [dict(h) for h in heads]
        self.heads = nn.ModuleList(self._build_head(h) for h in self.head_configs)
        for head in self.heads:  # the teachers' heads stay as the teachers trained them
            head.requires_grad_(False)
        # what kamal inspect lists and algorithms may tap (the Architecture names none)
        self.feature_layers = [f"backbone.{self.layer}", *(f"adaptors.{i}" for i in
                                                           range(len(self.targets)))]
        names = [h["task"] for h in self.head_configs]
        missing = [t.name for t in tasks if t.name not in names]
        if missing:
            raise ValueError(f"no transplanted head gives task(s) {', '.join(missing)}")

    @staticmethod
    def _build_head(config: dict[str, Any]) -> nn.Module:
        model = config["model"]
        net = build_registered(model["architecture"], model.get("architecture_kwargs", {}),
                               tasks_from_dicts(model["tasks"]), model["input"])
        return net.get_submodule(config["module"])

    def predictions(self, images: Tensor) -> list[Tensor]:
        """Every adaptor's prediction (balanced space): (N, C) summaries, (N, C, h, w) maps at
        the student's own grid."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        layers = sorted({self.layer, self.summary_layer})
        with FeatureTap(self.backbone, layers, "the student's backbone") as tap:
            self.backbone(images)
        sources = {SPATIAL: as_map(tap.features[self.layer], size, self.patch),
                   SUMMARY: summary_of(tap.features[self.summary_layer], size, self.patch)}
        return [adaptor(sources[t["kind"]]) for adaptor, t in zip(self.adaptors, self.targets,
                                                                    strict=True)]

    def in_teacher_space(self, index: int, prediction: Tensor,
                         size: tuple[int, int] | None = None) -> Tensor:
        """Target ``index``'s prediction mapped back to its teacher's feature space; a map is
        resized to the grid its teacher would give for an input of ``size``."""
        target = self.targets[index]
        feature = channels_first(self.normalizers[index].inverse(channels_last(prediction)))
        if target["kind"] == SPATIAL and size is not None:
            stride = float(target["stride"])
            feature = resize_map(feature, (max(1, round(size[0] / stride)),
                                           max(1, round(size[1] / stride))))
        return feature

    def head_outputs(self, predictions: Sequence[Tensor],
                     size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """The transplanted heads' task outputs from adaptor ``predictions``."""
        return {config["task"]: head(self.in_teacher_space(config["target"],
                                                           predictions[config["target"]], size))
                for config, head in zip(self.head_configs, self.heads, strict=True)}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return self.head_outputs(self.predictions(images), size)


def build_agglomerated(tasks: Sequence[Task], in_channels: int = 3,
                       backbone: dict[str, Any] | None = None,
                       targets: Sequence[dict[str, Any]] = (), heads: Sequence[dict[str, Any]] = (),
                       adaptor_hidden: int = 256, adaptor_depth: int = 2) -> AgglomeratedNet:
    """Builder registered as ``agglomerated`` (its kwargs are written by the algorithm)."""
    if not backbone or not targets:
        raise ValueError("the agglomerated architecture is built by algorithm 'agglomerate' "
                         "(it needs its backbone and targets); train one with kamal amalgamate")
    return AgglomeratedNet(tasks, in_channels, backbone, targets, heads, adaptor_hidden,
                           adaptor_depth)


AGGLOMERATED = Architecture(
    build_agglomerated, (), multi_task=True,
    description="agglomerate's student: a backbone, one adaptor per teacher, and the "
                "teachers' own heads transplanted (built by algorithm agglomerate)")
