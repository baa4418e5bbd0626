"""Teachers in transformers' layout (extra kamal-core[transformers]): tiny random-weight
models made locally with save_pretrained, loaded through transformers' own classes; outputs
equal the library's forward on the same preprocessed input; refused when they would run
code from the repo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import kamal
from kamal import KamalError
from kamal.config import TeacherRef
from kamal.teacher_loading import resolve_teacher

transformers = pytest.importorskip("transformers")
PETS = {0: "cat", 1: "dog", 2: "fox"}


def _vit(folder: Path, shard: str | None = None) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, image_size=32, patch_size=8, num_labels=3,
                       id2label=PETS, label2id={v: k for k, v in PETS.items()})
    model = ViTForImageClassification(config).eval()
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                      image_std=[0.25] * 3).save_pretrained(folder)
    return model


def _segformer(folder: Path) -> torch.nn.Module:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    names = ["wall", "floor", "circle", "square", "triangle"]
    config = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                             hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2],
                             num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16,
                             num_labels=5, id2label=dict(enumerate(names)), image_size=32)
    model = SegformerForSemanticSegmentation(config).eval()
    model.save_pretrained(folder)
    return model


def _dpt(folder: Path) -> torch.nn.Module:
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(0)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                       intermediate_size=64, image_size=32, patch_size=8,
                       backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                       fusion_hidden_size=16)
    model = DPTForDepthEstimation(config).eval()
    model.save_pretrained(folder)
    return model


def test_image_classifier_equals_transformers_forward_with_its_own_preprocessing(tmp_path):
    reference = _vit(tmp_path / "vit")
    teacher = resolve_teacher(TeacherRef(name="pets", path=str(tmp_path / "vit")), tmp_path, 0)
    assert teacher.source["format"] == "transformers" and len(teacher.source["sha256"]) == 64
    assert teacher.tasks[0].classes == ["cat", "dog", "fox"] and not teacher.tasks[0].guessed_names
    assert teacher.input_spec.size == (32, 32) and teacher.input_spec.std == (0.25, 0.25, 0.25)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values=(x - 0.5) / 0.25).logits
    torch.testing.assert_close(teacher(x)["pets"], expected, atol=1e-5, rtol=0)
    subset = resolve_teacher(TeacherRef(name="p", path=str(tmp_path / "vit"), classes=["fox", "cat"]),
                             tmp_path, 0)
    torch.testing.assert_close(subset(x)["p"], expected[:, [2, 0]], atol=1e-5, rtol=0)
    # the transformers modules are the tappable layers (ViT tokens: 16 patches + class token)
    with kamal.FeatureTap(teacher.model.features, ["vit.layers.1"]) as tap:
        teacher(x)
    assert tap.features["vit.layers.1"].shape == (2, 17, 32)
    assert teacher.model.head_layer == "classifier"


def test_sharded_safetensors_load(tmp_path):
    reference = _vit(tmp_path / "vit", shard="20KB")
    assert (tmp_path / "vit" / "model.safetensors.index.json").exists()
    teacher = resolve_teacher(TeacherRef(path=str(tmp_path / "vit")), tmp_path, 0)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values=(x - 0.5) / 0.25).logits
    torch.testing.assert_close(teacher(x)["vit"], expected, atol=1e-5, rtol=0)


def test_segmentation_and_depth_heads_are_brought_to_the_input_size(tmp_path):
    seg, depth = _segformer(tmp_path / "seg"), _dpt(tmp_path / "dpt")
    x = torch.rand(2, 3, 32, 32)
    s = resolve_teacher(TeacherRef(name="scene", path=str(tmp_path / "seg")), tmp_path, 0)
    d = resolve_teacher(TeacherRef(name="depth", path=str(tmp_path / "dpt")), tmp_path, 1)
    assert (s.tasks[0].kind, d.tasks[0].kind) == ("segmentation", "depth")
    assert s.tasks[0].classes == ["wall", "floor", "circle", "square", "triangle"]
    # no preprocessor_config.json: the config's image size, mean/std 0.5
    assert s.input_spec.size == (32, 32) and s.input_spec.mean == (0.5, 0.5, 0.5)
    with torch.no_grad():
        logits = seg(pixel_values=(x - 0.5) / 0.5).logits  # at a quarter of the input size
        predicted = depth(pixel_values=(x - 0.5) / 0.5).predicted_depth
    out = s(x)["scene"]
    assert logits.shape[-1] < 32 and out.shape == (2, 5, 32, 32)
    torch.testing.assert_close(out, F.interpolate(logits, size=(32, 32), mode="bilinear",
                                                  align_corners=False), atol=1e-5, rtol=0)
    torch.testing.assert_close(d(x)["depth"], F.interpolate(predicted[:, None], size=(32, 32),
                                                            mode="bilinear", align_corners=False),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("change, message", [
    ({"auto_map": {"AutoModel": "modeling_evil.Evil"}}, "has auto_map: the repo brings its own code"),
    ({"model_type": "evil-net"}, "model type 'evil-net' is not one transformers"),
    ({"architectures": ["ViTForMaskedImageModeling"]},
     "architecture 'ViTForMaskedImageModeling' is not a transformers class kamal can use"),
])
def test_repos_that_would_run_code_or_are_unknown_are_refused(tmp_path, change, message):
    _vit(tmp_path / "vit")
    config = json.loads((tmp_path / "vit" / "config.json").read_text())
    (tmp_path / "vit" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(KamalError, match=message):
        resolve_teacher(TeacherRef(path=str(tmp_path / "vit")), tmp_path, 0)
    assert "modeling_evil" not in sys.modules


def test_absurd_processor_values_and_pickles_are_refused(tmp_path):
    _vit(tmp_path / "vit")
    processor = json.loads((tmp_path / "vit" / "preprocessor_config.json").read_text())
    (tmp_path / "vit" / "preprocessor_config.json").write_text(
        json.dumps({**processor, "image_std": [0.2, 0.0, 0.2]}))
    with pytest.raises(KamalError, match=r"std \[0.2, 0.0, 0.2\] \(must be positive\)"):
        resolve_teacher(TeacherRef(path=str(tmp_path / "vit")), tmp_path, 0)
    (tmp_path / "vit" / "model.safetensors").rename(tmp_path / "vit" / "pytorch_model.bin")
    with pytest.raises(KamalError, match=r"weights only as pickles \(pytorch_model.bin\)"):
        resolve_teacher(TeacherRef(path=str(tmp_path / "vit")), tmp_path, 0)


def test_without_transformers_the_error_names_the_extra(tmp_path):
    _vit(tmp_path / "vit")
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from kamal.cli import main\n"
            f"main(['inspect', {str(tmp_path / 'vit')!r}])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "pip install 'kamal-core[transformers]'" in result.stderr


def test_kd_and_cfl_amalgamate_a_transformers_vit_with_a_torchvision_cnn(tmp_path):
    from test_teacher_formats import _torchvision_repo

    _vit(tmp_path / "vit")
    _torchvision_repo(tmp_path / "tv", ["wall", "floor", "circle", "square"])
    # kd compares the cache with live teachers exactly, through the one-pass merge; cfl runs
    # the default learned gate over both teachers' views of shifted images
    exact = {"name": "kd", "merge": "standardize"}
    runs = [(exact, "memory"), (exact, "off"),
            ({"name": "cfl", "layer": "<head>:in", "tsne_samples": 0}, "auto")]
    for algorithm, cache in runs:
        name = f"{algorithm['name']}-{cache}"
        config = {
            "teachers": [{"name": "vit", "path": str(tmp_path / "vit")},
                         {"name": "tv", "path": str(tmp_path / "tv")}],
            "student": {"architecture": "small-cnn", "architecture_kwargs": {"width": 8},
                        "task_names": {"classification": "all"}},
            "algorithm": algorithm,
            "data": {"transfer": {"dataset": "scenes", "split": "transfer", "size": 32,
                                  "count": 64}},
            "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "teacher_cache": cache},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        report = kamal.amalgamate(path, tmp_path / name, progress=False)
        assert [t["source"]["format"] for t in report["teachers"]] == ["transformers", "torchvision"]
        student = kamal.load_model(tmp_path / name / "student")
        assert student.tasks[0].classes == ["cat", "dog", "fox", "wall", "floor", "circle", "square"]
    # the teacher cache gives these teachers' outputs as running them does
    cached, plain = (kamal.load_model(tmp_path / f"kd-{c}" / "student").state_dict()
                     for c in ("memory", "off"))
    for key, value in plain.items():
        torch.testing.assert_close(cached[key].float(), value.float(), atol=1e-5, rtol=1e-4)


def test_kamal_inspect_shows_a_backbones_output_layers(tmp_path):
    from conftest import run_kamal
    from family_repos import FAMILIES

    FAMILIES["dinov2"][0](tmp_path / "dinov2")
    result = run_kamal("inspect", str(tmp_path / "dinov2"))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "architecture: Dinov2Model" in result.stdout
    assert "reads:        32x32 (shorter side 40, bicubic, tensor)" in result.stdout
    for layer, shape in (("last_hidden_state", "(2, 32, 4, 4)"), ("pooled", "(2, 32)"),
                         ("hidden_states.2", "(2, 32, 4, 4)")):
        assert any(line.split()[:1] == [layer] and shape in line
                   for line in result.stdout.splitlines()), layer
    info = json.loads(run_kamal("inspect", str(tmp_path / "dinov2"), "--json").stdout)
    assert info["tasks"] == [] and info["input"]["resize_to"] == [40]
