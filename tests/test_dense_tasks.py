"""Dense tasks (segmentation, depth), the SegNet architecture and supervised dense training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

import kamal
from kamal import DepthTask, FeatureTap, InputSpec, KamalModel, SegmentationTask
from kamal.errors import ConfigError, KamalError
from kamal.evaluation import evaluate
from kamal.models import task_from_dict

CLASSES = ["wall", "floor", "circle"]


# --- segmentation ---------------------------------------------------------------------


def test_pixel_kl_matches_hand_computed_value_and_scales_with_temperature():
    task = SegmentationTask("seg", ["a", "b"])
    teacher = torch.tensor([2.0, 0.0]).view(1, 2, 1, 1)
    student = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    p = torch.softmax(teacher.flatten(), 0)
    q = torch.softmax(student.flatten(), 0)
    expected = float((p * (p / q).log()).sum())
    assert task.distill_loss(student, teacher) == pytest.approx(expected, rel=1e-5)
    assert float(task.distill_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)
    p4 = torch.softmax(teacher.flatten() / 4, 0)
    q4 = torch.softmax(student.flatten() / 4, 0)
    expected4 = float((p4 * (p4 / q4).log()).sum()) * 16
    assert task.distill_loss(student, teacher, 4.0) == pytest.approx(expected4, rel=1e-5)


def test_pixel_kl_averages_over_pixels_respects_mask_and_unknown_classes():
    task = SegmentationTask("seg", ["a", "b", "c"])
    student = torch.randn(2, 3, 4, 4)
    teacher = student.clone()
    teacher[0, :, 0, 0] = torch.tensor([5.0, -5.0, 0.0])  # one pixel disagrees
    full = float(task.distill_loss(student, teacher))
    one = float(task.distill_loss(student[:1, :, :1, :1], teacher[:1, :, :1, :1]))
    assert full == pytest.approx(one / 32, rel=1e-4)  # mean over 2 x 4 x 4 pixels
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = False
    assert float(task.distill_loss(student, teacher, mask=mask)) == pytest.approx(0.0, abs=1e-6)
    teacher[:, 2] = float("-inf")  # a class this teacher does not know
    assert math.isfinite(float(task.distill_loss(student, teacher)))


def test_segmentation_supervised_loss_ignores_void_pixels():
    task = SegmentationTask("seg", CLASSES)
    output = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[0, 1], [-1, 2]]])
    kept = F.cross_entropy(output.permute(0, 2, 3, 1).reshape(-1, 3)[[0, 1, 3]],
                           torch.tensor([0, 1, 2]))
    assert float(task.supervised_loss(output, target)) == pytest.approx(float(kept), rel=1e-5)
    all_void = torch.full((1, 2, 2), -1)
    assert float(task.supervised_loss(output, all_void)) == 0.0


def test_segmentation_meter_on_known_predictions():
    task = SegmentationTask("seg", ["a", "b"])
    meter = task.new_meter()
    pred = torch.tensor([[0, 0], [1, 1]])
    logits = F.one_hot(pred, 2).permute(2, 0, 1).float()[None]
    target = torch.tensor([[[0, 1], [1, -1]]])  # one void pixel, not counted
    meter.update(logits, target)
    result = meter.compute()
    # a: tp 1, fp 1, fn 0 -> IoU 1/2 ; b: tp 1, fp 0, fn 1 -> IoU 1/2
    assert result["miou"] == pytest.approx(0.5)
    assert result["pixel_acc"] == pytest.approx(2 / 3)
    assert result["pixels"] == 3
    assert SegmentationTask("s", ["a"]).new_meter().compute() == {}


def test_segmentation_meter_resizes_predictions_to_the_target():
    meter = SegmentationTask("seg", ["a", "b"]).new_meter()
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 1] = 1.0
    meter.update(logits, torch.ones(1, 4, 4, dtype=torch.long))
    assert meter.compute()["pixel_acc"] == 1.0


def test_segmentation_map_targets_picks_dict_entry_and_maps_class_names():
    task = SegmentationTask("seg", ["floor", "wall"])
    masks = torch.tensor([[[0, 1, 2, -1, 7]]])
    mapped = task.map_targets(["wall", "floor", "circle"],
                              {"segmentation": masks, "depth": torch.ones(1, 1, 1, 5)})
    # wall -> 1, floor -> 0, circle (unknown to the task) -> -1, void -> -1, out of range -> -1
    assert mapped.tolist() == [[[1, 0, -1, -1, -1]]]
    assert torch.equal(task.map_targets(None, masks), masks)
    with pytest.raises(KamalError, match="no 'segmentation' targets"):
        task.map_targets(["wall"], {"depth": torch.ones(1)})


def test_segmentation_merge_embed_and_round_trip():
    a = SegmentationTask("a", ["wall", "floor"])
    b = SegmentationTask("b", ["floor", "circle"])
    merged = SegmentationTask.merge([a, b], "scene")
    assert merged.classes == ["wall", "floor", "circle"]
    placed = merged.embed(b, torch.tensor([1.0, 2.0]).view(1, 2, 1, 1))
    assert placed.flatten().tolist() == [float("-inf"), 1.0, 2.0]
    again = task_from_dict(merged.to_dict())
    assert isinstance(again, SegmentationTask) and again.classes == merged.classes
    with pytest.raises(KamalError):
        SegmentationTask.merge([a, DepthTask("d")], "x")


# --- depth ----------------------------------------------------------------------------


def test_depth_l1_and_berhu_on_known_values():
    task = DepthTask("depth")
    student = torch.tensor([1.0, 2.0, 4.0]).view(1, 1, 1, 3)
    teacher = torch.tensor([1.0, 3.0, 0.0]).view(1, 1, 1, 3)
    assert float(task.distill_loss(student, teacher)) == pytest.approx((0 + 1 + 4) / 3)
    # berHu: c = 0.2 * 4 = 0.8; |d| = 0, 1, 4 -> 0, (1 + .64) / 1.6, (16 + .64) / 1.6
    expected = (0 + 1.64 / 1.6 + 16.64 / 1.6) / 3
    assert float(task.distill_loss(student, teacher, loss="berhu")) == pytest.approx(expected)
    assert DepthTask("d", loss="berhu").to_dict()["loss"] == "berhu"
    with pytest.raises(KamalError):
        DepthTask("d", loss="l2")  # type: ignore[arg-type]


def test_depth_supervised_loss_and_metrics_skip_missing_depth():
    task = DepthTask("depth")
    output = torch.tensor([2.0, 2.0, 4.0, 9.0]).view(1, 1, 2, 2)
    target = torch.tensor([2.0, 1.0, 5.0, 0.0]).view(1, 2, 2)  # 0 = no measurement
    mapped = task.map_targets(None, {"depth": target})
    assert mapped.shape == (1, 1, 2, 2)
    assert float(task.supervised_loss(output, mapped)) == pytest.approx((0 + 1 + 1) / 3)
    meter = task.new_meter()
    meter.update(output, mapped)
    result = meter.compute()
    assert result["rmse"] == pytest.approx(math.sqrt((0 + 1 + 1) / 3))
    assert result["abs_rel"] == pytest.approx((0 + 1 / 1 + 1 / 5) / 3)
    assert result["delta1"] == pytest.approx(1 / 3)  # ratios 1, 2 and 1.25: only 1 < 1.25
    assert result["pixels"] == 3
    assert not task.higher_is_better and task.primary_metric == "rmse"


def test_depth_merge_and_embed():
    merged = DepthTask.merge([DepthTask("a"), DepthTask("b")], "depth")
    x = torch.rand(2, 1, 3, 3)
    assert merged.embed(DepthTask("a"), x) is x
    assert task_from_dict(merged.to_dict()).kind == "depth"


# --- the SegNet architecture ----------------------------------------------------------


def _segnet(width: int = 4, size: int = 16) -> KamalModel:
    tasks = [SegmentationTask("seg", CLASSES), DepthTask("depth")]
    return KamalModel("segnet", tasks, InputSpec(3, (size, size)), {"width": width})


def test_segnet_outputs_one_map_per_task_and_named_feature_layers():
    model = _segnet().eval()
    x = torch.rand(2, 3, 16, 16)
    layers = ["enc1", "enc4", "dec1", "dec3"]
    with FeatureTap(model.features, layers) as tap:
        out = model(x)
    assert out["seg"].shape == (2, 3, 16, 16)
    assert out["depth"].shape == (2, 1, 16, 16)
    assert tap.features["enc1"].shape == (2, 4, 16, 16)
    assert tap.features["enc4"].shape == (2, 16, 2, 2)
    assert tap.features["dec1"].shape == (2, 8, 4, 4)
    assert model.feature_layers == ["enc1", "enc2", "enc3", "enc4", "dec1", "dec2", "dec3"]
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.rand(1, 3, 12, 12))


def test_segnet_single_task_model_repo_round_trip(tmp_path):
    model = KamalModel("segnet", [DepthTask("depth")], InputSpec(3, (16, 16)), {"width": 4})
    kamal.save_model_repo(model, tmp_path / "repo")
    loaded = kamal.load_model(tmp_path / "repo").eval()
    x = torch.rand(1, 3, 16, 16)
    model.eval()
    assert torch.equal(model(x)["depth"], loaded(x)["depth"])
    assert isinstance(loaded.tasks[0], DepthTask)


def test_evaluate_multi_task_model_on_scenes():
    from kamal.data.scenes import build_scenes

    data = build_scenes("test", size=16, count=4)
    model = KamalModel("segnet", [SegmentationTask("seg", data.classes), DepthTask("depth")],
                       InputSpec(3, (16, 16)), {"width": 4}).eval()
    metrics = evaluate(model, model.tasks, data, torch.device("cpu"))
    assert set(metrics) == {"seg", "depth"}
    assert 0 <= metrics["seg"]["miou"] <= 1 and metrics["seg"]["pixels"] == 4 * 16 * 16
    assert metrics["depth"]["rmse"] > 0


# --- kamal train with a dense task ----------------------------------------------------


def _train_config(tmp_path, kind: str, **model: object) -> str:
    config = {
        "model": {"architecture": "segnet", "architecture_kwargs": {"width": 4},
                  "task": f"scenes-{kind}", "task_kind": kind, **model},
        "data": {"train": {"dataset": "scenes", "split": "train", "size": 16, "count": 64},
                 "eval": {"dataset": "scenes", "split": "test", "size": 16, "count": 16}},
        "train": {"epochs": 4, "batch_size": 8, "optimizer": {"name": "adam", "lr": 0.01},
                  "device": "cpu"},
    }
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_kamal_train_fits_a_depth_model(tmp_path):
    from kamal.data.scenes import build_scenes

    report = kamal.train(_train_config(tmp_path, "depth"), tmp_path / "run", progress=False)
    rmse = report["model"]["metrics"]["scenes-depth"]["rmse"]
    untrained = KamalModel("segnet", [DepthTask("scenes-depth")], InputSpec(3, (16, 16)),
                           {"width": 4}).eval()
    before = evaluate(untrained, untrained.tasks, build_scenes("test", size=16, count=16),
                      torch.device("cpu"))["scenes-depth"]["rmse"]
    assert rmse < 0.75 * before  # measured: 2.95 vs 4.63
    loaded = kamal.load_model(tmp_path / "run" / "model")
    assert loaded.tasks[0].kind == "depth"
    assert '"loss/depth"' in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_kamal_train_rejects_an_unknown_task_kind(tmp_path):
    with pytest.raises(ConfigError, match="model.task_kind"):
        kamal.train(_train_config(tmp_path, "normals"), tmp_path / "run", progress=False)
