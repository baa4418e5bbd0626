"""Train the example's teachers with their own libraries and save them as those libraries do.

    python examples/hub-formats/make_teachers.py [--out FOLDER] [--quick]

Four tiny teachers, each in its library's Hub layout, each at its own resolution and with its
own normalisation, trained on data kamal ships (no downloads):

* ``vit-digits-0-4``      transformers ViT classifier, digits 0-4, 32 px, squash, mean/std 0.5;
* ``timm-digits-5-9``     timm ``test_efficientnet`` classifier, digits 5-9, 24 px, crop_pct 0.9,
                          bicubic, mean 0.45 / std 0.22;
* ``segformer-scenes``    transformers SegFormer, scene parsing, 48 px;
* ``dpt-scenes``          transformers DPT, depth, 32 px, bicubic.

Saved with ``save_pretrained`` (model and image processor) and timm's ``save_for_hf``
(safetensors only). ``--quick`` trains two steps each (for tests); the shipped teachers were
made without it (several minutes on a CPU, mostly the two scene models). kd.yaml and sbm.yaml
in this folder amalgamate them; tests publish them to a loopback Hub and run the configs
through ``hub:`` references (tests/test_hub_formats.py).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kamal.data.digits import build_digits
from kamal.data.scenes import CLASSES, build_scenes

HERE = Path(__file__).resolve().parent


def train(model: nn.Module, loader: DataLoader, loss_of: Callable[[nn.Module, Tensor, object], Tensor],
          epochs: int, lr: float = 2e-3) -> None:
    """Adam with a cosine schedule over ``epochs`` of ``loader`` (``epochs=0``: two steps,
    for tests)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches: DataLoader | list[Any] = loader
    if epochs == 0:
        batches, epochs = [next(iter(loader))] * 2, 1
    steps = max(1, epochs * len(batches))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
    model.train()
    for _ in range(epochs):
        for images, targets in batches:
            loss = loss_of(model, images, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def normalised(images: Tensor, mean: float, std: float) -> Tensor:
    return (images - mean) / std


def vit_digits(out: Path, epochs: int) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    names = {i: str(i) for i in range(5)}
    model = ViTForImageClassification(ViTConfig(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96,
        image_size=32, patch_size=8, num_channels=1, num_labels=5, id2label=names,
        label2id={v: k for k, v in names.items()}))
    data = build_digits("train", classes=[0, 1, 2, 3, 4], size=32, augment=True)
    train(model, DataLoader(data, batch_size=32, shuffle=True),
          lambda m, x, y: F.cross_entropy(m(pixel_values=normalised(x, 0.5, 0.5)).logits, y),
          epochs, lr=5e-4)  # chosen on the transfer split (the test split stays unseen)
    model.save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5], image_std=[0.5],
                      do_convert_rgb=False).save_pretrained(out)


def timm_digits(out: Path, epochs: int) -> None:
    import timm
    from timm.models._hub import save_for_hf

    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=5, in_chans=1)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (1, 24, 24), "crop_pct": 0.9,
                            "interpolation": "bicubic", "mean": (0.45,), "std": (0.22,)}
    data = build_digits("train", classes=[5, 6, 7, 8, 9], size=24, augment=True)
    train(model, DataLoader(data, batch_size=32, shuffle=True),
          lambda m, x, y: F.cross_entropy(m(normalised(x, 0.45, 0.22)), y), epochs)
    save_for_hf(model, str(out), safe_serialization=True, model_config={
        "label_names": ["5", "6", "7", "8", "9"],
        "model_args": {"num_classes": 5, "in_chans": 1}})
    (out / "pytorch_model.bin").unlink(missing_ok=True)  # safetensors only


def segformer_scenes(out: Path, epochs: int) -> None:
    from transformers import (
        SegformerConfig,
        SegformerForSemanticSegmentation,
        SegformerImageProcessor,
    )

    model = SegformerForSemanticSegmentation(SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
        patch_sizes=[3, 3], strides=[2, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
        decoder_hidden_size=32, num_labels=len(CLASSES), id2label=dict(enumerate(CLASSES)),
        label2id={n: i for i, n in enumerate(CLASSES)}))
    data = build_scenes("train", size=48, augment=True)

    def loss(m: nn.Module, x: Tensor, y: dict[str, Tensor]) -> Tensor:
        logits = m(pixel_values=normalised(x, 0.5, 0.25)).logits
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, y["segmentation"].long(), ignore_index=-1)

    train(model, DataLoader(data, batch_size=32, shuffle=True), loss, epochs)
    model.save_pretrained(out)
    SegformerImageProcessor(size={"height": 48, "width": 48}, image_mean=[0.5] * 3,
                            image_std=[0.25] * 3).save_pretrained(out)


def dpt_scenes(out: Path, epochs: int) -> None:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    model = DPTForDepthEstimation(DPTConfig(
        hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96,
        image_size=32, patch_size=4, backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[16, 32, 48, 48], fusion_hidden_size=32,
        # maps at half DPT's usual sizes: the head works at 64 px, not 128 (3x cheaper; the
        # student reads 48 px anyway)
        reassemble_factors=[2, 1, 0.5, 0.25]))
    data = build_scenes("train", size=32, augment=True)

    def loss(m: nn.Module, x: Tensor, y: dict[str, Tensor]) -> Tensor:
        depth = m(pixel_values=normalised(x, 0.5, 0.5)).predicted_depth[:, None]
        depth = F.interpolate(depth, size=x.shape[-2:], mode="bilinear", align_corners=False)
        target = y["depth"].float()
        valid = target > 0
        return (depth - target).abs()[valid].mean()

    train(model, DataLoader(data, batch_size=32, shuffle=True), loss, epochs)
    model.save_pretrained(out)
    DPTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(out)


TEACHERS = {"vit-digits-0-4": (vit_digits, 100), "timm-digits-5-9": (timm_digits, 30),
            "segformer-scenes": (segformer_scenes, 25), "dpt-scenes": (dpt_scenes, 25)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "teachers")
    parser.add_argument("--quick", action="store_true", help="two steps each (for tests)")
    parser.add_argument("--only", choices=sorted(TEACHERS), action="append",
                        help="make only this teacher (repeatable)")
    args = parser.parse_args()
    for name, (make, epochs) in TEACHERS.items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        make(folder, 0 if args.quick else epochs)
        print(f"{name}: {folder}")


if __name__ == "__main__":
    main()
