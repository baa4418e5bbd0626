"""Teacher formats as a hook: built-in kamal / timm / torchvision formats, detection and its
errors, a third-party format from a plugin, safetensors only, sane preprocessing values."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES
from safetensors.torch import save_file

import kamal
from kamal import KamalError, hookimpl
from kamal.config import TeacherRef
from kamal.plugins import register_plugin, unregister_plugin
from kamal.teacher_loading import resolve_teacher

DIGITS = EXAMPLES / "digits" / "teachers" / "digits-0-4"


def _torchvision_repo(folder: Path, labels: list[str] | None = None, **config) -> torch.nn.Module:
    from torchvision import models

    torch.manual_seed(0)
    net = models.get_model("resnet18", weights=None, num_classes=4).eval()
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "library": "torchvision", "architecture": "resnet18", "num_classes": 4,
        "input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
        **({"label_names": labels} if labels else {}), **config}))
    return net


def test_torchvision_repo_is_detected_and_equals_torchvisions_own_forward(tmp_path):
    reference = _torchvision_repo(tmp_path / "tv", ["cat", "dog", "fox", "owl"])
    teacher = resolve_teacher(TeacherRef(name="animals", path=str(tmp_path / "tv"),
                                         classes=["owl", "cat"]), tmp_path, 0)
    assert teacher.source["format"] == "torchvision" and len(teacher.source["sha256"]) == 64
    assert teacher.tasks[0].classes == ["owl", "cat"] and not teacher.tasks[0].guessed_names
    assert teacher.input_spec.size == (32, 32)
    assert teacher.model.head_layer == "model.fc" and "model.layer4" in teacher.model.feature_layers
    x = torch.rand(2, 3, 32, 32)
    expected = reference((x - 0.5) / 0.25)[:, [3, 0]]
    torch.testing.assert_close(teacher(x)["animals"], expected, atol=1e-5, rtol=0)
    # saved as a kamal repo, it reloads with the same outputs
    kamal.save_model_repo(teacher.model, tmp_path / "as-kamal")
    torch.testing.assert_close(kamal.load_model(tmp_path / "as-kamal").eval()(x)["animals"],
                               expected, atol=1e-5, rtol=0)


def test_unnamed_torchvision_classes_are_marked_guessed(tmp_path):
    _torchvision_repo(tmp_path / "tv")
    teacher = resolve_teacher(TeacherRef(path=str(tmp_path / "tv")), tmp_path, 0)
    assert teacher.tasks[0].classes == ["0", "1", "2", "3"] and teacher.tasks[0].guessed_names


@pytest.mark.parametrize("values, problem", [
    ({"input_size": [3, 0, 32]}, "size 0x32"),
    ({"input_size": [3, 100000, 32]}, "size 100000x32"),
    ({"std": [0.2, 0.0, 0.2]}, "std [0.2, 0.0, 0.2] (must be positive)"),
    ({"input_size": [2, 32, 32]}, "2 channels"),
    ({"mean": [0.5, 0.5]}, "2 mean / 3 std values for 3 channels"),
])
def test_absurd_preprocessing_values_are_a_clear_error(tmp_path, values, problem):
    _torchvision_repo(tmp_path / "tv", **values)
    with pytest.raises(KamalError) as info:
        resolve_teacher(TeacherRef(path=str(tmp_path / "tv")), tmp_path, 0)
    assert str(info.value).startswith("teachers.0: ")
    assert f"the preprocessing values make no sense: {problem}" in str(info.value)


@pytest.mark.parametrize("pickle_name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickled_weights_are_refused_for_every_format(tmp_path, pickle_name):
    for layout, make in {"kamal": lambda f: __import__("shutil").copytree(DIGITS, f),
                         "torchvision": _torchvision_repo}.items():
        folder = tmp_path / layout
        make(folder)
        (folder / "model.safetensors").unlink()
        (folder / pickle_name).write_bytes(b"not loaded")
        with pytest.raises(KamalError, match=rf"has weights only as pickles \({pickle_name}\).*"
                           r"safetensors.torch.save_file"):
            resolve_teacher(TeacherRef(path=str(folder)), tmp_path, 0)


def test_a_repo_of_no_format_names_the_formats_and_the_fix(tmp_path):
    (tmp_path / "odd").mkdir()
    save_file({"w": torch.zeros(1)}, str(tmp_path / "odd" / "weights.safetensors"))
    with pytest.raises(KamalError) as info:
        resolve_teacher(TeacherRef(path=str(tmp_path / "odd")), tmp_path, 3)
    message = str(info.value)
    assert message.startswith("teachers.3: ")
    assert "matches no teacher format (kamal, timm, torchvision, transformers)" in message
    assert "weights.safetensors" in message and "teachers.3.format" in message
    with pytest.raises(KamalError, match=r"teachers.0.format: unknown teacher format 'onnx'"):
        resolve_teacher(TeacherRef(path=str(DIGITS), format="onnx"), tmp_path, 0)


class ToyFormat(kamal.TeacherFormat):
    """A third party's format: a kamal small-cnn stored as toy.json + toy.safetensors."""

    name = "toy"

    def detect(self, folder, config):
        return (folder / "toy.json").is_file()

    def load(self, folder, name, classes):
        from safetensors.torch import load_file

        spec = json.loads((folder / "toy.json").read_text())
        task = kamal.ClassificationTask(name, spec["classes"])
        model = kamal.KamalModel("small-cnn", [task], kamal.InputSpec(1, (16, 16)), {"width": 16})
        model.load_state_dict(load_file(str(folder / "toy.safetensors")))
        return model


class GreedyFormat(kamal.TeacherFormat):
    """Claims every repo: detection becomes ambiguous."""

    name = "greedy"

    def detect(self, folder, config):
        return True


class BrokenFormat(kamal.TeacherFormat):
    """Raises while recognising a repo."""

    name = "broken"

    def detect(self, folder, config):
        raise ZeroDivisionError("division by zero")


@pytest.fixture
def format_plugin():
    registered = []

    def add(*formats):
        plugin = types.SimpleNamespace(register_teacher_formats=hookimpl(
            lambda register: [register(f.name, f) for f in formats]))
        name = f"formats-test-{len(registered)}"
        register_plugin(plugin, name)
        registered.append(name)

    yield add
    for name in registered:
        unregister_plugin(name)


def test_a_plugin_adds_a_format_without_touching_the_core(tmp_path, format_plugin):
    format_plugin(ToyFormat)
    folder = tmp_path / "toy"
    folder.mkdir()
    reference = kamal.load_model(DIGITS)
    save_file(reference.state_dict(), str(folder / "toy.safetensors"))
    (folder / "toy.json").write_text(json.dumps({"classes": reference.tasks[0].classes}))
    teacher = resolve_teacher(TeacherRef(name="t", path=str(folder)), tmp_path, 0)
    assert teacher.source["format"] == "toy"
    x = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(teacher(x)["t"], reference.eval()(x)[reference.tasks[0].name])
    listed = {i.name: i for i in kamal.plugin_infos()}
    assert listed["formats-test-0"].provides == {"teacher_formats": ["toy"]}


def test_two_formats_claiming_a_repo_and_a_raising_format_are_one_line_errors(tmp_path, format_plugin):
    format_plugin(GreedyFormat)
    with pytest.raises(KamalError, match=r"claimed by several teacher formats \(greedy, kamal\); "
                       r"set teachers.0.format to one of them"):
        resolve_teacher(TeacherRef(path=str(DIGITS)), tmp_path, 0)
    assert resolve_teacher(TeacherRef(path=str(DIGITS), format="kamal"), tmp_path, 0).tasks
    format_plugin(BrokenFormat)
    with pytest.raises(KamalError) as info:
        resolve_teacher(TeacherRef(path=str(DIGITS), format=None), tmp_path, 0)
    message = str(info.value)
    assert "teacher format 'broken' (from formats-test-1) failed while recognising" in message
    assert "ZeroDivisionError: division by zero" in message and "\n" not in message


def test_kamal_inspect_lists_every_layer_with_its_shape(tmp_path, hub_server):
    from conftest import run_kamal

    table = run_kamal("inspect", str(DIGITS))
    assert table.returncode == 0, table.stderr
    assert "format:       kamal" in table.stdout and "parameters:   23,733" in table.stdout
    assert "digits-0-4 [classification] 5 classes: 0, 1, 2, 3, 4" in table.stdout
    row = next(line.split() for line in table.stdout.splitlines() if line.strip().startswith("block3 "))
    assert row[1:6] == ["(2,", "64,", "4,", "4)", "feature"]
    _torchvision_repo(tmp_path / "tv", ["a", "b", "c", "d"])
    info = json.loads(run_kamal("inspect", str(tmp_path / "tv"), "--json").stdout)
    assert info["format"] == "torchvision" and info["head_layer"] == "model.fc"
    shapes = {layer["name"]: layer["shape"] for layer in info["layers"]}
    assert shapes["model.layer4"] == [2, 512, 1, 1] and shapes["model.fc"] == [2, 4]
    # a Hub reference, resolved to its commit like every other command
    env = {**hub_server.hub_env(tmp_path), "HF_TOKEN": hub_server.token}
    assert run_kamal("push", str(DIGITS), "kamal-test/inspect-me", env=env).returncode == 0
    hub = json.loads(run_kamal("inspect", "hub:kamal-test/inspect-me@main", "--json", env=env).stdout)
    assert hub["source"]["hub"] == "kamal-test/inspect-me" and len(hub["source"]["revision"]) == 40
    assert hub["layers"] == json.loads(run_kamal("inspect", str(DIGITS), "--json").stdout)["layers"]


def test_a_layer_that_does_not_exist_lists_the_nearest_names():
    model = kamal.load_model(DIGITS)
    with pytest.raises(KamalError, match=r"teacher 'x' has no layer 'blok3'; nearest names: block3"):
        with kamal.FeatureTap(model.features, ["blok3"], "teacher 'x'"):
            pass
