"""Real data in, real evaluation out: a labelled folder of non-square RGB JPEGs, paths
relative to the config file, labelled evaluation by folder names, refused unlabelled or
mismatched evaluation data, ``DATASET[:SPLIT]`` parsing, and a run that never ends without
its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import EXAMPLES, run_kamal

import kamal
from kamal import ConfigError, KamalError
from kamal.data.base import build_dataset, split_data_ref
from kamal.data.transforms import ImageView

TEACHERS = EXAMPLES / "digits" / "teachers"


def _write_jpegs(root: Path, split: str, count: int) -> None:
    """Digits as 48x32 RGB JPEGs (upscaled, padded left and right) in class subfolders."""
    from PIL import Image

    digits = build_dataset("digits", split, {"size": 32})
    for index in range(count):
        image, label = digits[index]
        gray = (torch.nn.functional.pad(image, (8, 8))[0] * 255).round().to(torch.uint8).numpy()
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gray).convert("RGB").save(folder / f"{index:04d}.jpg", quality=95)


@pytest.fixture(scope="module")
def jpeg_folders(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("jpegs") / "data"
    _write_jpegs(data / "transfer", "transfer", 256)
    _write_jpegs(data / "test", "test", 200)
    return data


def _config(folder: Path, data: Path, **eval_options) -> Path:
    """A short kd config in ``folder`` on the JPEG folders."""
    config = yaml.safe_load((EXAMPLES / "digits" / "kd.yaml").read_text())
    for teacher in config["teachers"]:
        teacher["path"] = str(EXAMPLES / "digits" / teacher["path"])
    config["data"] = {
        "transfer": {"dataset": "image-folder", "root": str(data / "transfer"), "size": 16,
                     "channels": 1},
        "eval": {"dataset": "image-folder", "root": str(data), "split": "test", "size": 16,
                 "channels": 1, **eval_options}}
    config["train"]["epochs"] = 2
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_default_view_keeps_the_aspect_and_crops_the_centre():
    image = torch.zeros(1, 32, 48)
    image[:, :, 8:40] = torch.linspace(0, 1, 32).view(1, 32, 1)
    out = ImageView(1, (16, 16))(image)
    assert out.shape == (1, 16, 16)
    assert torch.allclose(out[0, :, 0], out[0, :, -1], atol=0.02)  # no squashing: a column is a column
    same = torch.rand(3, 20, 20)
    assert ImageView(3, (20, 20))(same) is same  # nothing to resize or crop: untouched


def test_labelled_jpeg_folder_end_to_end_from_another_directory(jpeg_folders, tmp_path):
    workspace = jpeg_folders.parent
    # teachers are referred to relative to the config too: copy them next to the data
    import shutil

    for name in ("digits-0-4", "digits-5-9"):
        shutil.copytree(TEACHERS / name, workspace / "teachers" / name, dirs_exist_ok=True)
    # the second teacher reads another eval transform: 20 px, a 0.9 centre crop, PIL bicubic
    repo_config = workspace / "teachers" / "digits-5-9" / "config.json"
    described = json.loads(repo_config.read_text())
    described["input"].update(size=[20, 20], resize="shorter", resize_to=[22],
                              interpolation="bicubic", backend="pil")
    repo_config.write_text(json.dumps(described))
    config = yaml.safe_load((EXAMPLES / "digits" / "kd.yaml").read_text())
    config["teachers"] = [{"name": n, "path": f"../teachers/{n}"} for n in ("digits-0-4", "digits-5-9")]
    config["data"] = {
        "transfer": {"dataset": "image-folder", "root": "../data/transfer", "size": 16, "channels": 1},
        "eval": {"dataset": "image-folder", "root": "../data", "split": "test", "size": 16,
                 "channels": 1, "labels": "folders"}}
    config["train"]["epochs"] = 2
    (workspace / "configs").mkdir(exist_ok=True)
    path = workspace / "configs" / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_kamal("amalgamate", str(path), "--output", "run", "--quiet", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-2000:]
    run = elsewhere / "run"
    report = json.loads((run / "report.json").read_text())
    teachers = {t["name"]: t["metrics"] for t in report["teachers"]}
    # labels came from the folder names and were matched to each teacher's classes; each
    # teacher read the JPEGs through its own transform
    assert teachers["digits-0-4"]["digits-0-4"]["top1"] > 0.9
    assert teachers["digits-5-9"]["digits-5-9"]["top1"] > 0.8
    assert [t["input"]["size"] for t in report["teachers"]] == [[16, 16], [20, 20]]
    assert report["student"]["input"]["size"] == [20, 20]  # the largest teacher size
    assert teachers["digits-5-9"]["digits-5-9"]["samples"] == sum(
        len(list((jpeg_folders / "test" / str(c)).iterdir())) for c in range(5, 10))
    # the recorded config names absolute paths: it re-runs from anywhere
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["data"]["transfer"]["root"] == str(jpeg_folders / "transfer")
    assert recorded["teachers"][0]["path"] == str(workspace / "teachers" / "digits-0-4")
    # evaluate the student on the labelled folder, by DATASET:SPLIT
    evaluated = run_kamal("evaluate", "run", "--data", "image-folder:test", "--option",
                          f"root={jpeg_folders}", "--option", "size=16", "--option", "channels=1",
                          "--option", "labels=folders", "--json", cwd=elsewhere)
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)["model"]["metrics"]["digits"]
    assert metrics == report["student"]["metrics"]["digits"]
    # torchvision's ImageFolder reads the same folders (no train/split argument)
    same = run_kamal("evaluate", "run", "--data", "torchvision:ImageFolder:test", "--option",
                     f"root={jpeg_folders}", "--option", "size=16", "--json", cwd=elsewhere)
    assert same.returncode != 0 and "images have 3 channel(s) but the models read 1" in same.stderr


def test_unlabelled_evaluation_data_is_refused(jpeg_folders, tmp_path):
    path = _config(tmp_path / "cfg", jpeg_folders)  # eval without labels: folders
    with pytest.raises(ConfigError, match="data.eval: this data has no labels"):
        kamal.amalgamate(path, tmp_path / "run", progress=False)
    result = run_kamal("evaluate", str(TEACHERS / "digits-0-4"), "--data", "image-folder",
                       "--option", f"root={jpeg_folders / 'test'}", "--option", "size=16",
                       "--option", "channels=1")
    assert result.returncode != 0 and "--data: this data has no labels" in result.stderr


def test_class_names_the_models_do_not_know_are_an_error(tmp_path):
    data = tmp_path / "animals"
    for name in ("cat", "dog"):
        (data / name).mkdir(parents=True)
        from PIL import Image

        Image.new("L", (16, 16)).save(data / name / "a.png")
    result = run_kamal("evaluate", str(TEACHERS / "digits-0-4"), "--data", "image-folder",
                       "--option", f"root={data}", "--option", "size=16", "--option", "channels=1",
                       "--option", "labels=folders")
    assert result.returncode != 0
    assert ("the data's classes cat, dog are not classes of the model's task 'digits-0-4' "
            "(0, 1, 2, 3, 4)") in result.stderr


def test_dataset_references_with_colons():
    assert split_data_ref("digits:test") == ("digits", "test")
    assert split_data_ref("digits") == ("digits", None)
    assert split_data_ref("torchvision:ImageFolder") == ("torchvision:ImageFolder", None)
    assert split_data_ref("torchvision:CIFAR10:test") == ("torchvision:CIFAR10", "test")
    assert split_data_ref("image-folder:val") == ("image-folder", "val")


@pytest.mark.parametrize("broken, step", [
    ("kamal.run.save_model_repo", "saving the student model repo"),
    ("kamal.report.plot_curves", "plotting the training curves"),
    ("kamal.report.amalgamation_report", "evaluating the student and the teachers"),
])
def test_a_failing_finish_exits_with_an_error_and_resume_writes_the_outputs(
        tmp_path, tiny_teachers, monkeypatch, broken, step):
    from kamal.testing import write_run_config

    config = write_run_config(tmp_path / "kd.yaml", tiny_teachers, {"name": "kd"}, epochs=1)

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(broken, fail)
        with pytest.raises(KamalError) as info:
            kamal.amalgamate(config, tmp_path / "run", progress=False)
    message = str(info.value)
    assert f"but {step}" in message and "No space left on device" in message
    assert "--resume" in message
    assert (tmp_path / "run" / "checkpoints" / "latest.safetensors").exists()
    report = kamal.amalgamate(config, tmp_path / "run", progress=False, resume=True)
    assert (tmp_path / "run" / "student" / "model.safetensors").exists()
    assert json.loads((tmp_path / "run" / "report.json").read_text())["student"] == report["student"]
    assert (tmp_path / "run" / "loss.png").exists()


def test_setup_reads_a_bounded_sample_of_the_transfer_data(tmp_path, tiny_teachers, capfd):
    import types

    from kamal.algorithms.kd import KDAmalgamator
    from kamal.plugins import register_plugin, unregister_plugin
    from kamal.testing import write_run_config

    seen: list[int] = []

    class Counting(KDAmalgamator):
        """kd that counts the images its setup reads."""

        name = "counting-kd"

        class Config(kamal.KDTermConfig):
            """kd's fields."""

            name: str = "counting-kd"

        def setup(self, student, transfer_images):
            batches = list(transfer_images)
            seen.append(sum(len(b) for b in batches))
            super().setup(student, batches)

    plugin = types.SimpleNamespace(register_amalgamators=kamal.hookimpl(
        lambda register: register("counting-kd", Counting)))
    register_plugin(plugin, "counting-test")
    try:
        config = write_run_config(tmp_path / "c.yaml", tiny_teachers, {"name": "counting-kd"}, epochs=1)
        kamal.amalgamate(config, tmp_path / "a", overrides=["train.calibration_images=100"])
        kamal.amalgamate(config, tmp_path / "b", progress=False)
    finally:
        unregister_plugin("counting-test")
    transfer = len(build_dataset("digits", "transfer", {"size": 8}))
    assert seen == [100, transfer] and transfer > 100
    message = f"setup reads 100 of {transfer} transfer images (train.calibration_images)"
    assert message in capfd.readouterr().err
