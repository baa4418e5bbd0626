"""Every bundled algorithm meets every teacher family's features — CNN maps, ViT tokens with
and without a class token, pooled vectors — and either works or fails with a one-line
message naming the teacher (and, for a feature it cannot use, the layer and the shape)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES

import kamal
from kamal import KamalError, StudentSpec, build_batch, get_registry, load_teacher
from kamal.config import TeacherRef
from kamal.teacher_loading import resolve_teacher

timm = pytest.importorskip("timm")

FAMILIES = {  # timm model name and options: a CNN, a ViT with a class token, one without
    "resnet": ("resnet18", {}),
    "vit": ("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4}),
    "vit-no-cls": ("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4,
                                            "class_token": False, "global_pool": "avg"}),
}
STUDENT = StudentSpec("small-cnn", {"width": 8}, {"classification": "digits"})


@pytest.fixture(scope="module")
def timm_teachers(tmp_path_factory) -> dict[str, Path]:
    from timm.models._hub import save_for_hf

    folders = {}
    for family, (name, options) in FAMILIES.items():
        model = timm.create_model(name, pretrained=False, num_classes=5, in_chans=1, **options)
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (1, 16, 16),
                                "mean": (0.5,), "std": (0.5,)}
        folder = tmp_path_factory.mktemp(family)
        save_for_hf(model.eval(), str(folder), safe_serialization=True,
                    model_config={"label_names": ["5", "6", "7", "8", "9"]})
        (folder / "pytorch_model.bin").unlink(missing_ok=True)
        folders[family] = folder
    return folders


def _deepest_block(teacher: kamal.Teacher) -> str:
    """A spatial/token layer of the teacher: the last block of its deepest stage."""
    names = [n for n, _ in teacher.model.features.named_modules()]
    blocks = [n for n in names if n.startswith(("model.blocks.", "model.layer4."))
              and n.count(".") == 2]
    return blocks[-1]


CASES = [("kd", {}), ("cfl", {"layer": "<head>:in"}), ("cfl", "tokens"), ("layerwise", {}),
         ("recombination", {}), ("sbm", {})]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("algorithm, options", CASES)
def test_algorithm_meets_teacher_family(timm_teachers, family, algorithm, options):
    teachers = [load_teacher("digits-0-4", EXAMPLES / "digits" / "teachers" / "digits-0-4"),
                resolve_teacher(TeacherRef(name=family, path=str(timm_teachers[family])), Path(), 1)]
    if options == "tokens":
        options = {"layer": "block3", "teacher_layers": ["block3", _deepest_block(teachers[1])],
                   "tsne_samples": 0}
    elif algorithm == "cfl":
        options = {**options, "tsne_samples": 0}
    cls = get_registry().get("amalgamators", algorithm)
    images = torch.rand(16, 1, 16, 16)
    try:
        cls.check_teachers(teachers)
        algo = cls(cls.Config(name=algorithm, **options), teachers, STUDENT)
        algo.setup(algo.build_student(), [images])
        losses = algo.losses(build_batch(algo, images))
    except KamalError as exc:
        assert algorithm not in ("kd", "cfl"), f"{algorithm} must take {family} teachers: {exc}"
        message = str(exc)
        assert "\n" not in message.strip() or algorithm == "layerwise", message
        assert "Traceback" not in message
        assert family in message or "teachers" in message, message
        return
    # what must work: kd always, cfl on pooled vectors and on tokens (as a patch-grid map)
    assert algorithm in ("kd", "cfl"), f"{algorithm} accepted {family} without a check"
    assert losses and all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("family", ["vit", "vit-no-cls"])
def test_cfl_reads_vit_tokens_as_a_patch_grid_map(timm_teachers, family):
    from kamal_plugin_cfl.blocks import as_features

    tokens = torch.rand(2, 17 if family == "vit" else 16, 192)
    grid = as_features(tokens, "teacher 'x'", "model.blocks.11")
    assert grid.shape == (2, 192, 4, 4)
    assert torch.equal(grid[0, :, 0, 1], tokens[0, -16 + 1])  # row-major patches, class token dropped
    with pytest.raises(KamalError, match=r"teacher 'x''s layer 'l' gives features shaped \(2, 35, 8\)"):
        as_features(torch.rand(2, 35, 8), "teacher 'x'", "l")  # 25 patches + 10 more: no grid
