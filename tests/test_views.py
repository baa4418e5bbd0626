"""Each model reads images through its own view: the pixels its library's eval transform
gives (timm's create_transform, transformers' image processors) on non-square images, and
teachers at other resolutions amalgamate into a student with its own input."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import EXAMPLES
from family_repos import FAMILIES, photo

from kamal import ConfigError, ImageView, InputSpec, SegmentationTask, ViewBatch
from kamal.config import RunConfig, TeacherRef, load_config
from kamal.data.views import ViewPlan, check_views
from kamal.run import amalgamate
from kamal.teacher_loading import resolve_teacher
from kamal.testing import write_run_config

SIZES = [(57, 43), (43, 61), (90, 90)]  # landscape, portrait (odd margins), square


def _normalised(spec: InputSpec, image) -> torch.Tensor:
    mean = torch.tensor(spec.mean).view(-1, 1, 1)
    std = torch.tensor(spec.std).view(-1, 1, 1)
    return (spec.view(image) - mean) / std


# --- timm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [
    {"input_size": (3, 40, 40), "crop_pct": 0.9, "interpolation": "bicubic"},
    {"input_size": (3, 36, 36), "crop_pct": 0.875, "interpolation": "bilinear",
     "crop_mode": "squash"},
    {"input_size": (3, 33, 33), "crop_pct": 1.0, "interpolation": "bicubic"},
], ids=["center-bicubic", "squash-bilinear", "no-margin"])
def test_timm_teacher_reads_timms_eval_pixels(tmp_path, cfg):
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    model = timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, **cfg, "mean": (0.4, 0.5, 0.6),
                            "std": (0.2, 0.25, 0.3)}
    save_for_hf(model, str(tmp_path / "repo"), model_config={"label_names": ["a", "b", "c"]},
                safe_serialization=True)
    (tmp_path / "repo" / "pytorch_model.bin").unlink(missing_ok=True)
    teacher = resolve_teacher(TeacherRef(name="t", path=str(tmp_path / "repo")), tmp_path, 0)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    for width, height in SIZES:
        image = photo(width, height)
        expected = transform(image)
        torch.testing.assert_close(_normalised(teacher.input_spec, image), expected,
                                   atol=1e-5, rtol=0)
        # the teacher on its own view gives what timm's model gives on timm's pixels
        with torch.no_grad():
            reference = model(expected[None])
        torch.testing.assert_close(teacher(teacher.input_spec.view(image)[None])["t"], reference,
                                   atol=1e-5, rtol=1e-5)


# --- transformers ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["vit", "convnext", "dinov2", "segformer", "dpt"])
def test_transformers_teacher_reads_its_processors_pixels(tmp_path, family):
    pytest.importorskip("transformers")
    from transformers import AutoImageProcessor

    torch.manual_seed(0)
    FAMILIES[family][0](tmp_path / "repo")
    teacher = resolve_teacher(TeacherRef(name="t", path=str(tmp_path / "repo")), tmp_path, 0)
    processor = AutoImageProcessor.from_pretrained(str(tmp_path / "repo"))
    for width, height in SIZES:
        image = photo(width, height, seed=width)
        expected = processor(image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(_normalised(teacher.input_spec, image), expected,
                                   atol=1e-5, rtol=0)


# --- the plan -----------------------------------------------------------------------------


def test_view_plan_shares_equal_views_and_puts_the_students_first():
    small = InputSpec(3, (16, 16))
    crop = InputSpec(3, (16, 16), (0.5,), (0.2,), "shorter", (18,), "bicubic", "pil")
    plan = ViewPlan.of(small, [crop, InputSpec(3, (16, 16), (0.1,), (0.9,)), crop])
    assert plan.views == (small.view, crop.view) and plan.teachers == (1, 0, 1)
    assert plan.mixed and not ViewPlan.of(small, [small]).mixed
    batch = plan.batch((torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16)))
    assert isinstance(batch, ViewBatch) and len(batch) == 2
    assert float(batch.for_model(SimpleNamespace(input_spec=crop)).mean()) == 1.0
    with pytest.raises(Exception, match="no images for a model reading 8x8"):
        batch.for_model(SimpleNamespace(input_spec=InputSpec(3, (8, 8))))


def test_a_dense_teacher_must_cover_the_students_part_of_the_image():
    student = InputSpec(3, (32, 32))
    cropped = InputSpec(3, (32, 32), resize="shorter", resize_to=(36,))
    seg = SimpleNamespace(name="segmenter", tasks=[SegmentationTask("seg", ["a", "b"])])
    check_views(ViewPlan.of(student, [InputSpec(3, (64, 64))]), [seg], "sbm", True, list)
    with pytest.raises(ConfigError, match="teacher 'segmenter' .*covers another part"):
        check_views(ViewPlan.of(student, [cropped]), [seg], "sbm", True, list)


def test_default_view_of_in_memory_images_keeps_them():
    images = torch.rand(3, 16, 16)
    assert ImageView(3, (16, 16))(images) is images


def test_a_crop_wider_than_the_resized_image_is_padded_like_torchvision():
    from PIL import Image
    from torchvision.transforms import v2

    pixels = torch.randint(1, 256, (3, 30, 24), dtype=torch.uint8)  # no zero: padding shows
    view = ImageView(3, (20, 24))  # shorter side to 20: 25x20, narrower than the crop
    expected = v2.Compose([v2.Resize(20, antialias=True), v2.CenterCrop((20, 24))])(pixels)
    out = view(pixels)
    assert out.shape == (3, 20, 24) and torch.equal(out, expected.float() / 255.0)
    assert (out[..., :2] == 0).all() and (out[..., 2:22] > 0).all()
    pil = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    assert ImageView(3, (20, 24), backend="pil")(pil).shape == (3, 20, 24)


# --- runs ---------------------------------------------------------------------------------


def _mixed_config(tmp_path: Path, tiny_teachers: list[Path], name: str, **train) -> Path:
    """kd of an 8x8 teacher (digits 0-4) and a 16x16 one (5-9) into a 12x12 student."""
    teachers = [tiny_teachers[0], EXAMPLES / "digits" / "teachers" / "digits-5-9"]
    # the one-pass merge: the cached run must equal the live one exactly
    path = write_run_config(tmp_path / f"{name}.yaml", teachers, {"name": "kd", "merge": "standardize"},
                            epochs=8)
    data = yaml.safe_load(path.read_text())
    data["student"]["input"] = {"size": 12}
    data["data"]["transfer"]["size"] = data["data"]["eval"]["size"] = 16
    data["train"].update(train)
    path.write_text(yaml.safe_dump(data))
    return path


def test_teachers_at_different_resolutions_amalgamate_with_and_without_the_cache(
        tmp_path, tiny_teachers):
    reports = {}
    for mode in ("off", "memory"):
        path = _mixed_config(tmp_path, tiny_teachers, mode, teacher_cache=mode)
        reports[mode] = amalgamate(path, tmp_path / mode, progress=False)
    report = reports["off"]
    assert report["student"]["input"]["size"] == [12, 12]
    assert [t["input"]["size"] for t in report["teachers"]] == [[8, 8], [16, 16]]
    top1 = report["student"]["metrics"]["digits"]["top1"]
    assert top1 > 0.5, top1  # ten classes: chance is 0.1
    assert reports["memory"]["student"]["metrics"] == report["student"]["metrics"]
    written = (tmp_path / "off" / "config.yaml").read_text()
    assert "# teachers.0 'tiny-small-cnn-0-4' reads 8x8" in written
    assert yaml.safe_load(written)["student"]["input"]["size"] == [12, 12]
    # the recorded config is a valid run config that gives the student the same input
    recorded, _ = load_config(RunConfig, tmp_path / "off" / "config.yaml")
    assert recorded.student.input.size == [12, 12] and recorded.student.input.backend == "tensor"
    assert json.loads((tmp_path / "off" / "student" / "config.json").read_text())["input"][
        "size"] == [12, 12]
