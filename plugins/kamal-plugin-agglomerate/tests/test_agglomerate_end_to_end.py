"""End-to-end tests of kamal-plugin-agglomerate: the example (shortened), kamal evaluate on
its student, the conformance kit (resume included) and a two-process torchrun run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from kamal_plugin_agglomerate.algorithm import REPORT_NAME, AgglomerateAmalgamator

import kamal

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "agglomerate" / "agglomerate.yaml"
needs_example = pytest.mark.skipif(not EXAMPLE.exists(), reason="needs examples/agglomerate")
SHORT = ["train.epochs=2", "data.transfer.count=192", "data.eval.count=48", "train.device=cpu",
         "train.calibration_images=64"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("agglomerate") / "run"
    report = kamal.amalgamate(EXAMPLE, out, progress=False, overrides=SHORT)
    return out, report


@pytest.mark.slow
@needs_example
def test_the_student_does_every_teachers_task(short_run):
    out, report = short_run
    tasks = {"scenes-segmentation", "scenes-depth", "scenes-shape"}
    assert set(report["student"]["metrics"]) == tasks
    for teacher in report["teachers"]:
        assert set(teacher["metrics"]) <= tasks
    # smaller than the teachers together
    assert report["student"]["params"] < 0.5 * sum(t["params"] for t in report["teachers"])
    measured = json.loads((out / REPORT_NAME).read_text())
    assert measured == report["measurements"]
    shares = measured["gradient_share"]
    assert set(shares) == {"start", "end"}
    for when in shares.values():
        assert set(when) == {"scenes-segmentation", "scenes-depth", "scenes-shape"}
        assert sum(when.values()) == pytest.approx(1.0, abs=1e-3)
    sweep = measured["resolution_sweep"]
    assert set(sweep) == {"scenes-segmentation/spatial", "scenes-depth/spatial",
                          "scenes-shape/summary"}
    assert all(set(errors) == {"24", "32", "40"} for errors in sweep.values())
    assert measured["features_only"] == {}


@pytest.mark.slow
@needs_example
def test_kamal_evaluate_on_the_student_repo_reports_every_task(short_run):
    out, report = short_run
    student = kamal.load_model(out / "student")
    assert student.architecture == "agglomerated"
    evaluated = kamal.evaluate_repo(out / "student", "scenes:test", {"size": 64, "count": 48},
                                    with_teachers=True)
    assert [t["metrics"] for t in evaluated["teachers"]] == [t["metrics"] for t in report["teachers"]]
    assert evaluated["model"]["metrics"] == report["student"]["metrics"]


@pytest.mark.slow
@needs_example
def test_every_teachers_loss_decreases(short_run):
    out, _ = short_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r.get("event") == "epoch"]
    assert len(epochs) == 2
    for name in ("scenes-segmentation/spatial", "scenes-depth/spatial", "scenes-shape/summary"):
        first, last = (e[f"loss/{name}"] for e in (epochs[0], epochs[-1]))
        assert last < first, (name, first, last)


@pytest.mark.slow
def test_conformance_kit(tmp_path):
    testing = pytest.importorskip("kamal.testing")
    report = testing.check_amalgamator(AgglomerateAmalgamator, tmp_path, same_architecture=False,
                                       algorithm_options={"adaptor_hidden": 32})
    assert report["algorithm"] == "agglomerate"


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")
@needs_example
def test_two_processes(tmp_path):
    config = yaml.safe_load(EXAMPLE.read_text())
    for teacher in config["teachers"]:
        teacher["path"] = str((EXAMPLE.parent / teacher["path"]).resolve())
    config["train"].update(epochs=1, device="cpu")
    config["data"]["transfer"]["count"] = 128
    config["data"]["eval"]["count"] = 32
    config["train"]["calibration_images"] = 32
    path = tmp_path / "agglomerate.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node=2", "-m", "kamal", "amalgamate", str(path),
                             "--output", str(tmp_path / "run"), "--quiet"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["student"]["metrics"]) == {"scenes-segmentation", "scenes-depth",
                                                 "scenes-shape"}
    assert (tmp_path / "run" / REPORT_NAME).exists()
    assert torch.isfinite(torch.tensor(report["student"]["metrics"]["scenes-depth"]["rmse"]))


@pytest.mark.slow
@needs_example
def test_features_from_a_half_precision_disk_cache(tmp_path):
    out = tmp_path / "run"
    report = kamal.amalgamate(EXAMPLE, out, progress=False, overrides=[
        *SHORT, "data.transfer.augment=false", "train.teacher_cache=disk",
        "train.teacher_cache_dtype=float16"])
    assert report["teacher_cache"]["mode"] == "disk" and report["teacher_cache"]["bytes"] > 0
    # the cache holds the student's view only: the end figures fall back to trained-on images
    assert report["measurements"]["measured_on"] == "transfer images the student trained on"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r.get("event") == "epoch"]
    assert epochs[-1]["loss/scenes-depth/spatial"] < epochs[0]["loss/scenes-depth/spatial"]


@pytest.mark.slow
@needs_example
def test_a_head_that_cannot_be_separated_is_a_one_line_warning(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "kamal", "amalgamate", str(EXAMPLE), "--output", str(tmp_path / "r"),
         "--quiet", *(f"--set={o}" for o in [*SHORT, "train.epochs=1",
                                             "algorithm.teacher_layers=[{spatial: enc4}, "
                                             "{spatial: dec3}, {summary: 'model.fc:in'}]"])],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("kamal: warning: agglomerate: teacher 'scenes-segmentation' keeps no head in the "
            "student (no single module reads layer 'enc4'") in result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(report["student"]["metrics"]) == {"scenes-depth", "scenes-shape"}
    assert "scenes-segmentation" in report["measurements"]["features_only"]


@pytest.mark.slow
@needs_example
def test_a_transformers_backbone_teacher_gives_its_summary_and_its_map(tmp_path):
    """The field's case: a DINOv2-style backbone (no task) beside a task teacher."""
    transformers = pytest.importorskip("transformers")
    backbone = tmp_path / "dinov2"
    transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8)).save_pretrained(backbone)
    transformers.BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                   do_center_crop=True, resample=3).save_pretrained(backbone)
    config = {
        "teachers": [{"name": "scenes-segmentation",
                      "path": str(EXAMPLE.parent.parent / "scenes" / "teachers" / "scenes-segmentation")},
                     {"name": "dinov2", "path": str(backbone)}],
        "student": {"architecture": "segnet", "architecture_kwargs": {"width": 8},
                    "input": {"size": 32}},
        "algorithm": {"name": "agglomerate", "summary_layer": "enc4", "adaptor_hidden": 32,
                      "student_sizes": [24, 32]},
        "data": {"transfer": {"dataset": "scenes", "split": "transfer", "size": 48, "count": 192},
                 "eval": {"dataset": "scenes", "split": "test", "size": 48, "count": 32}},
        "train": {"epochs": 2, "batch_size": 32, "device": "cpu", "calibration_images": 64}}
    path = tmp_path / "dino.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.warns(UserWarning, match="'dinov2' keeps no head"):
        report = kamal.amalgamate(path, tmp_path / "run", progress=False)
    measured = report["measurements"]
    assert set(measured["resolution_sweep"]) == {"scenes-segmentation/spatial", "dinov2/summary",
                                                 "dinov2/spatial"}
    assert "architecture registry" in measured["features_only"]["dinov2"]
    assert set(report["student"]["metrics"]) == {"scenes-segmentation"}
    student = kamal.load_model(tmp_path / "run" / "student")
    targets = student.features.targets
    # the backbone's patch tokens (a 4x4 grid at its 32 px crop) and its pooled vector
    assert [(t["teacher"], t["kind"], t["channels"], t["stride"]) for t in targets] == [
        ("scenes-segmentation", "spatial", 16, 1.0), ("dinov2", "summary", 32, None),
        ("dinov2", "spatial", 32, 8.0)]
