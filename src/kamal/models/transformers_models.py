"""Teachers in transformers' layout (``config.json`` with ``model_type`` and
``architectures``, ``model.safetensors`` or sharded safetensors with an index,
``preprocessor_config.json``), loaded with the optional extra ``kamal-core[transformers]``.

Only the model classes transformers itself ships are used: a repo whose ``config.json`` has
``auto_map`` (custom code) or a ``model_type`` transformers does not know is refused, and
``trust_remote_code`` is never set. Image classifiers, semantic-segmentation and
depth-estimation heads become kamal tasks; the images are normalised with the repo's own
mean/std at its own size.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.transforms import ViewBatch, model_input
from ..errors import KamalError, ModelRepoError
from ..interfaces import InputSpec, Student, Task
from .base import register_normalisation
from .repo_values import Classes, check_input_spec, select_classes

EXTRA = "kamal-core[transformers]"
HEADS = {"ForImageClassification": "classification", "ForSemanticSegmentation": "segmentation",
         "ForDepthEstimation": "depth"}
# backbones without a head (ViTModel, Dinov2Model, CLIPVisionModel, ConvNextModel, ...)
BACKBONE_SUFFIXES = ("Model", "VisionModel")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise KamalError(f"this is a transformers model but transformers is not installed; "
                         f"install the optional extra: pip install '{EXTRA}'") from None
    return transformers


def is_transformers_repo(config: dict[str, Any] | None) -> bool:
    """transformers' layout: ``model_type`` and ``architectures``, no kamal ``tasks``."""
    keys = set(config or {})
    return {"model_type", "architectures"} <= keys and "tasks" not in keys


class TransformersTeacherNet(Student):
    """A transformers model as a kamal network: images in [0, 1] at the repo's size ->
    ``{task_name: output}``; ``features`` is the transformers model, so its modules
    (e.g. ``vit.layers.11``) are the tappable layers.

    Its outputs are tappable too, as identity layers added to the model: ``hidden_states.i``
    (every model) and, for backbones without a task head (``kind="features"``),
    ``last_hidden_state`` and ``pooled`` (the pooler output, else the class token). Token
    sequences of models with a patch grid come as maps ``(N, C, H/patch, W/patch)``
    (class and register tokens dropped); ``pooled`` is ``(N, C)``.
    """

    def __init__(self, model: nn.Module, kind: str, task: Task | None, spec: InputSpec,
                 class_indices: list[int] | None) -> None:
        super().__init__()
        self.model = model.eval()
        self.kind = kind
        self.tasks = [task] if task is not None else []
        self.input_spec = spec
        self.class_indices = class_indices
        self.feature_layers = [name for name, child in model.named_children()
                               if any(True for _ in child.parameters())]
        self.head_layer = next((name for name in ("classifier", "decode_head", "head")
                                if hasattr(model, name)), None)
        register_normalisation(self, spec)
        patch = getattr(getattr(model, "config", None), "patch_size", None)
        self.grid = ((spec.size[0] // patch, spec.size[1] // patch)
                     if isinstance(patch, int) and patch > 0 else None)
        self._add_output_layers()

    def _add_output_layers(self) -> None:
        """Identity layers whose outputs are the model's outputs (for FeatureTap), counted
        from one forward of a blank image."""
        spec = self.input_spec
        with torch.no_grad():
            out = self.model(pixel_values=torch.zeros(1, spec.channels, *spec.size),
                             output_hidden_states=True)
        names = {"hidden_states": len(getattr(out, "hidden_states", None) or ())}
        if self.kind == "features":
            names.update(last_hidden_state=1, pooled=1)
        self.outputs: list[str] = []
        for name, count in names.items():
            if not count or hasattr(self.model, name):  # never shadow the model's own names
                continue
            layer = nn.ModuleList(nn.Identity() for _ in range(count)) if name == "hidden_states" \
                else nn.Identity()
            self.model.add_module(name, layer)
            self.outputs.append(name)
            self.feature_layers += ([f"{name}.{i}" for i in range(count)]
                                    if name == "hidden_states" else [name])

    @property
    def features(self) -> nn.Module:
        return self.model

    def as_map(self, tokens: Tensor) -> Tensor:
        """``(N, L, C)`` tokens of a model with a patch grid as an ``(N, C, H, W)`` map (the
        leading class/register tokens dropped); anything else unchanged."""
        if self.grid is None or tokens.dim() != 3:
            return tokens
        cells = self.grid[0] * self.grid[1]
        extra = tokens.shape[1] - cells
        if not 0 <= extra <= 8:
            return tokens
        return tokens[:, extra:].transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)

    def forward(self, images: Tensor | ViewBatch) -> dict[str, Tensor]:
        images = model_input(self, images)
        out = self.model(pixel_values=(images - self.mean) / self.std,
                         output_hidden_states="hidden_states" in self.outputs)
        self._tap_outputs(out)
        size = images.shape[-2:]
        if self.kind == "features":
            return {}
        if self.kind == "classification":
            result = out.logits[:, self.class_indices]
        elif self.kind == "segmentation":  # logits come at a fraction of the input size
            result = F.interpolate(out.logits, size=size, mode="bilinear", align_corners=False)
            result = result[:, self.class_indices]
        else:
            depth = out.predicted_depth
            depth = depth[:, None] if depth.dim() == 3 else depth
            result = F.interpolate(depth, size=size, mode="bilinear", align_corners=False)
        return {self.tasks[0].name: result}

    def _tap_outputs(self, out: Any) -> None:
        """Pass the outputs through the identity layers, where FeatureTap sees them."""
        if "hidden_states" in self.outputs:
            for layer, hidden in zip(self.model.hidden_states, out.hidden_states, strict=True):
                layer(self.as_map(hidden))
        if "last_hidden_state" in self.outputs:
            last = out.last_hidden_state
            self.model.last_hidden_state(self.as_map(last))
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:  # the class token (ViT-like), else the mean of the map
                pooled = last[:, 0] if last.dim() == 3 else last.mean(dim=(2, 3))
            self.model.pooled(pooled.flatten(1))


def load_transformers_model(folder: Path, name: str, classes: Classes) -> Student:
    """The repo's model through transformers' own class for its ``architectures`` entry."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("auto_map"):
        raise ModelRepoError(f"{folder}/config.json has auto_map: the repo brings its own code, "
                             "which kamal never runs (trust_remote_code is never set)")
    transformers = _transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = str(config.get("model_type"))
    if model_type not in CONFIG_MAPPING:
        raise ModelRepoError(f"{folder}: model type '{model_type}' is not one transformers "
                             f"{transformers.__version__} ships; kamal does not load code from "
                             "the repo, so upgrade transformers if it is newer")
    architecture = str((config.get("architectures") or [""])[0])
    kind = next((k for suffix, k in HEADS.items() if architecture.endswith(suffix)), None)
    if kind is None and architecture.endswith(BACKBONE_SUFFIXES):
        kind = "features"
    cls = getattr(transformers, architecture, None)
    if kind is None or not isinstance(cls, type):
        heads = ", ".join(f"*{s}" for s in [*HEADS, *BACKBONE_SUFFIXES])
        raise ModelRepoError(f"{folder}: architecture '{architecture}' is not a transformers "
                             f"class kamal can use as a teacher ({heads})")
    model = _quietly(lambda: cls.from_pretrained(str(folder), local_files_only=True,
                                                 trust_remote_code=False, use_safetensors=True))
    spec = _input_spec(folder, config)
    if kind == "features":  # a backbone: no task, its outputs are tappable layers
        if classes is not None:
            raise ModelRepoError(f"{folder}: 'classes' does not apply to a backbone without a "
                                 "classification head")
        return TransformersTeacherNet(model, kind, None, spec, None)
    if kind == "depth":
        from ..tasks.dense import DepthTask

        return TransformersTeacherNet(model, kind, DepthTask(name), spec, None)
    labels = config.get("id2label") or {}
    count = int(config.get("num_labels") or len(labels))
    named = [str(labels.get(str(i), labels.get(i, i))) for i in range(count)]
    # transformers names unnamed labels LABEL_i; any other names were given on purpose
    guessed_labels = all(n == f"LABEL_{i}" for i, n in enumerate(named))
    indices, names, guessed = select_classes(folder, count, [] if guessed_labels else named,
                                             classes)
    from ..tasks.classification import ClassificationTask
    from ..tasks.dense import SegmentationTask

    task = (ClassificationTask if kind == "classification" else SegmentationTask)(name, names)
    task.guessed_names = guessed
    return TransformersTeacherNet(model, kind, task, spec, indices)


# PIL's resampling codes, as processors store ``resample``
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _input_spec(folder: Path, config: dict[str, Any]) -> InputSpec:
    """Size, eval transform and mean/std from ``preprocessor_config.json``: the pixels
    transformers' image processor (its default, torchvision backend) would give the model."""
    path = folder / "preprocessor_config.json"
    processor = json.loads(path.read_text()) if path.is_file() else {}
    channels = int(config.get("num_channels", 3))
    mean = processor.get("image_mean") or [0.5] * channels
    std = processor.get("image_std") or [0.5] * channels
    if processor.get("do_normalize") is False:
        mean, std = [0.0] * channels, [1.0] * channels
    resize, resize_to, size = _processor_geometry(folder, processor, config)
    interpolation = _RESAMPLE.get(processor.get("resample", 2), str(processor.get("resample")))
    return check_input_spec(folder, [channels, *size], mean, std, resize, resize_to,
                            interpolation, "tensor")


def _processor_geometry(folder: Path, processor: dict[str, Any], config: dict[str, Any]
                        ) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """(resize, resize_to, output size) of the processor's resize and centre crop."""
    def unsupported(what: str) -> ModelRepoError:
        return ModelRepoError(f"{folder}/preprocessor_config.json: {what}; kamal batches every "
                              "image at one size, so it cannot reproduce this processor")

    if processor.get("keep_aspect_ratio") or processor.get("do_pad"):
        raise unsupported("keep_aspect_ratio/do_pad make the size depend on each image")
    size = processor.get("size")
    if processor.get("do_resize", True) is False or size is None:
        side = int(config.get("image_size", 224))
        size = {"height": side, "width": side}
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if not isinstance(size, dict):
        raise unsupported(f"size {size!r} is not understood")
    if "shortest_edge" in size and "longest_edge" in size:
        raise unsupported("size with both shortest_edge and longest_edge varies per image")
    crop = processor.get("crop_size") if processor.get("do_center_crop") else None
    crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
    if "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        convnext = str(processor.get("image_processor_type", "")).startswith("ConvNext")
        crop_pct = processor.get("crop_pct", 224 / 256 if convnext else None)
        if crop_pct is not None and edge < 384:  # ConvNeXT's rule: resize, then crop
            resize, resize_to, out = "shorter", (int(edge / float(crop_pct)),), (edge, edge)
        elif crop_pct is not None:
            resize, resize_to, out = "squash", (edge, edge), (edge, edge)
        elif crop:
            resize, resize_to, out = "shorter", (edge,), (int(crop["height"]), int(crop["width"]))
        else:
            raise unsupported("size {shortest_edge} without a centre crop varies per image")
    else:
        resize_to = (int(size["height"]), int(size["width"]))
        out = (int(crop["height"]), int(crop["width"])) if crop else resize_to
        resize = "squash"
    multiple = int(processor.get("ensure_multiple_of") or 1)
    if any(side % multiple for side in out):
        raise unsupported(f"the size {out} is not a multiple of ensure_multiple_of={multiple}")
    return resize, resize_to, out


def _quietly(load: Callable[[], Any]) -> Any:
    """``load()`` without transformers' per-load progress bar (kamal loads a released
    teacher again when it next runs: the bar would print each time)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load()
    finally:
        if shown:
            hf_logging.enable_progress_bar()
