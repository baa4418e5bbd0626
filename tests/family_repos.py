"""Tiny random-weight model repos of each library family, saved with the library's own saver,
and the library's own answer for an image: its preprocessing and forward (the reference
kamal's teachers must reproduce). Shared by tests/test_hub_formats.py and the subprocess it
runs against the loopback Hub (so it imports neither pytest nor conftest)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

PETS = {0: "cat", 1: "dog", 2: "fox"}


def photo(width: int = 57, height: int = 43, seed: int = 0):
    """A non-square RGB image with smooth structure and fine noise (resampling shows)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / 5.0 + c) * np.cos(y / 7.0 - c) for c in range(3)], axis=-1)
    pixels = (base * 90 + 128 + rng.normal(0, 25, base.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


# --- builders: folder -> None (the repo, as the library saves it) ---------------------------


def _vit(folder: Path) -> None:
    """A ViT classifier, its weights sharded (several safetensors files and an index)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=3, id2label=PETS,
        label2id={v: k for k, v in PETS.items()})).save_pretrained(folder, max_shard_size="40KB")
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                      image_std=[0.25] * 3).save_pretrained(folder)


def _dinov2(folder: Path) -> None:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, image_size=32, patch_size=8)
                ).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                      do_center_crop=True, resample=3).save_pretrained(folder)


def _convnext(folder: Path) -> None:
    from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessor

    ConvNextForImageClassification(ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, id2label=PETS,
        label2id={v: k for k, v in PETS.items()})).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875,
                           resample=3).save_pretrained(folder)


def _segformer(folder: Path) -> None:
    from transformers import (
        SegformerConfig,
        SegformerForSemanticSegmentation,
        SegformerImageProcessor,
    )

    names = ["wall", "floor", "circle"]
    SegformerForSemanticSegmentation(SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
        decoder_hidden_size=16, num_labels=3, id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)})).save_pretrained(folder)
    SegformerImageProcessor(size={"height": 48, "width": 40}).save_pretrained(folder)


def _dpt(folder: Path) -> None:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    DPTForDepthEstimation(DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16)).save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


def _timm(name: str, **args) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        import timm
        from timm.models._hub import save_for_hf

        model = timm.create_model(name, pretrained=False, num_classes=3, **args).eval()
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32),
                                "crop_pct": 0.9, "interpolation": "bicubic"}
        save_for_hf(model, str(folder), model_config={"label_names": list(PETS.values()),
                                                      "model_args": {"num_classes": 3, **args}},
                    safe_serialization=True)
        (folder / "pytorch_model.bin").unlink(missing_ok=True)
    return build


def _torchvision(folder: Path) -> None:
    from safetensors.torch import save_file
    from torchvision import models

    net = models.resnet18(weights=None, num_classes=3)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "library": "torchvision", "architecture": "resnet18", "num_classes": 3,
        "label_names": list(PETS.values()), "input_size": [3, 32, 32], "resize_size": 36,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}))


# family -> (builder, the layers whose shapes a test checks for a 1-image batch)
FAMILIES: dict[str, tuple[Callable[[Path], None], dict[str, list[int]]]] = {
    "vit": (_vit, {"hidden_states.2": [1, 32, 4, 4], "vit.layers.1": [1, 17, 32]}),
    "dinov2": (_dinov2, {"last_hidden_state": [1, 32, 4, 4], "pooled": [1, 32],
                         "hidden_states.0": [1, 32, 4, 4]}),
    "convnext": (_convnext, {"hidden_states.2": [1, 16, 4, 4]}),
    "segformer": (_segformer, {"hidden_states.1": [1, 16, 6, 5]}),
    "dpt": (_dpt, {"hidden_states.4": [1, 32, 4, 4]}),
    "timm-resnet": (_timm("resnet10t"), {"model.layer4": [1, 512, 1, 1]}),
    "timm-vit": (_timm("vit_tiny_patch16_224", img_size=32, patch_size=8),
                 {"model.blocks": [1, 17, 192]}),
    "torchvision-resnet18": (_torchvision, {"model.layer4": [1, 512, 1, 1]}),
}


# --- the library's own answer -------------------------------------------------------------


@torch.no_grad()
def library_outputs(family: str, folder: Path, image) -> dict[str, Tensor]:
    """What the family's library gives for ``image``: ``{"output": ...}`` (logits, or dense
    maps at the preprocessed size) and, for backbones, ``pooled``."""
    if family.startswith("timm"):
        import timm
        from safetensors.torch import load_file

        config = json.loads((folder / "config.json").read_text())
        model = timm.create_model(config["architecture"], pretrained=False,
                                  **config["model_args"]).eval()
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        model.pretrained_cfg = config["pretrained_cfg"]
        pixels = timm.data.create_transform(**timm.data.resolve_data_config(model=model))(image)
        return {"output": model(pixels[None])}
    if family.startswith("torchvision"):
        from safetensors.torch import load_file
        from torchvision import models
        from torchvision.transforms._presets import ImageClassification

        net = models.resnet18(weights=None, num_classes=3).eval()
        net.load_state_dict(load_file(str(folder / "model.safetensors")))
        pixels = ImageClassification(crop_size=32, resize_size=36)(image)
        return {"output": net(pixels[None])}
    import transformers

    config = json.loads((folder / "config.json").read_text())
    model = getattr(transformers, config["architectures"][0]).from_pretrained(folder).eval()
    pixels = transformers.AutoImageProcessor.from_pretrained(folder)(
        image, return_tensors="pt")["pixel_values"]
    out = model(pixel_values=pixels)
    size = pixels.shape[-2:]
    if family == "dinov2":
        return {"pooled": out.pooler_output}
    if family == "segformer":
        return {"output": F.interpolate(out.logits, size=size, mode="bilinear",
                                        align_corners=False)}
    if family == "dpt":
        return {"output": F.interpolate(out.predicted_depth[:, None], size=size,
                                        mode="bilinear", align_corners=False)}
    return {"output": out.logits}
