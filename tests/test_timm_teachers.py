"""Teachers in timm's Hub layout (optional extra kamal-core[timm])."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_kamal

from kamal import KamalError, load_model, save_model_repo
from kamal.config import TeacherRef
from kamal.teacher_loading import resolve_teacher

timm = pytest.importorskip("timm")  # the dev extra installs it; users without it get a hint


def _timm_repo(folder: Path) -> torch.nn.Module:
    from timm.models._hub import save_for_hf

    model = timm.create_model("resnet18", pretrained=False, num_classes=6).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32)}
    labels = {"label_names": ["plane", "car", "bird", "cat", "deer", "dog"]}
    save_for_hf(model, str(folder), model_config=labels, safe_serialization=True)
    (folder / "pytorch_model.bin").unlink(missing_ok=True)  # kamal never reads pickles
    return model


def test_timm_repo_loads_as_a_teacher_with_selected_classes(tmp_path):
    reference = _timm_repo(tmp_path / "repo")
    ref = TeacherRef(name="animals", path=str(tmp_path / "repo"), classes=["cat", "dog", "bird"])
    teacher = resolve_teacher(ref, tmp_path, 0)  # format detected from config.json
    assert teacher.source["format"] == "timm" and len(teacher.source["sha256"]) == 64
    assert teacher.tasks[0].classes == ["cat", "dog", "bird"]
    assert teacher.input_spec.size == (32, 32) and teacher.input_spec.channels == 3
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = reference((x - mean) / std)[:, [3, 5, 2]]
    assert torch.allclose(teacher(x)["animals"], expected, atol=1e-5)
    # selection by index, and a wrapped timm model saves and reloads as a kamal repo
    by_index = resolve_teacher(TeacherRef(path=str(tmp_path / "repo"), format="timm",
                                          classes={0: "aeroplane"}), tmp_path, 0)
    assert by_index.tasks[0].classes == ["aeroplane"]
    save_model_repo(teacher.model, tmp_path / "kamal-repo")
    assert torch.allclose(load_model(tmp_path / "kamal-repo").eval()(x)["animals"], expected,
                          atol=1e-5)


def test_unknown_label_names_the_fix(tmp_path):
    _timm_repo(tmp_path / "repo")
    with pytest.raises(KamalError, match=r"not among this model's labels.*\{index: name\}"):
        resolve_teacher(TeacherRef(path=str(tmp_path / "repo"), classes=["zebra"]), tmp_path, 0)


def test_without_timm_the_error_names_the_extra(tmp_path):
    _timm_repo(tmp_path / "repo")
    config = yaml.safe_load((Path(__file__).parents[1] / "examples/digits/kd.yaml").read_text())
    config["teachers"] = [{"path": str(tmp_path / "repo"), "classes": ["cat", "dog"]}]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    code = ("import sys; sys.modules['timm'] = None\n"  # as if timm were not installed
            "from kamal.cli import main\n"
            f"main(['amalgamate', {str(path)!r}, '-o', {str(tmp_path / 'out')!r}])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "pip install 'kamal-core[timm]'" in result.stderr and "Traceback" not in result.stderr


def _unnamed_timm_repo(folder: Path, classes: int = 5) -> None:
    from timm.models._hub import save_for_hf

    model = timm.create_model("resnet18", pretrained=False, num_classes=classes).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 16, 16)}
    save_for_hf(model, str(folder), safe_serialization=True)  # no label_names
    (folder / "pytorch_model.bin").unlink(missing_ok=True)


def test_unnamed_classes_are_never_merged_by_their_numbers(tmp_path):
    _unnamed_timm_repo(tmp_path / "a")
    _unnamed_timm_repo(tmp_path / "b")
    config = yaml.safe_load((Path(__file__).parents[1] / "examples/digits/kd.yaml").read_text())
    config["teachers"] = [{"name": "a", "path": str(tmp_path / "a")},
                          {"name": "b", "path": str(tmp_path / "b")}]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    from kamal import ConfigError, amalgamate

    with pytest.raises(ConfigError) as info:
        amalgamate(path, tmp_path / "out", progress=False)
    message = str(info.value)
    assert message.startswith("teachers.0: 'a' has no classification class names in its repo")
    assert "numbered 0..4" in message and "classes: [...]" in message
    assert "'a': 0, 1, 2, 3, 4; 'b': 0, 1, 2, 3, 4" in message
    # named by the user, the same teachers load and merge (and a teacher alone is fine)
    alone = resolve_teacher(TeacherRef(path=str(tmp_path / "a")), tmp_path, 0)
    assert alone.tasks[0].guessed_names
    named = resolve_teacher(TeacherRef(path=str(tmp_path / "a"), classes={0: "x", 1: "y"}),
                            tmp_path, 0)
    assert not named.tasks[0].guessed_names


def test_same_architecture_timm_teachers_with_layerwise_and_recombination(tmp_path):
    """Two timm teachers of one architecture: layerwise (the student: the same timm network)
    and recombination (their networks side by side under one head, then pruned)."""
    from timm.models._hub import save_for_hf

    for i, classes in enumerate((["0", "1", "2", "3", "4"], ["5", "6", "7", "8", "9"])):
        torch.manual_seed(i)
        model = timm.create_model("resnet10t", pretrained=False, num_classes=5, in_chans=1)
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (1, 16, 16)}
        save_for_hf(model.eval(), str(tmp_path / f"t{i}"), safe_serialization=True,
                    model_config={"label_names": classes,
                                  "model_args": {"num_classes": 5, "in_chans": 1}})
        (tmp_path / f"t{i}" / "pytorch_model.bin").unlink(missing_ok=True)
    # combined, before any pruning, the student gives each teacher's logits for its classes
    from kamal_plugin_recombination.combine import combine

    teachers = [resolve_teacher(TeacherRef(path=str(tmp_path / f"t{i}")), tmp_path, i)
                for i in range(2)]
    combined = combine(teachers, {"classification": "digits"}).eval()
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        merged = combined(x)["digits"]
    for i, teacher in enumerate(teachers):
        torch.testing.assert_close(merged[:, 5 * i:5 * i + 5], teacher(x)[f"t{i}"], atol=1e-4,
                                   rtol=1e-4)
    outputs = {}
    for algorithm, student in (("layerwise", {"architecture": "timm", "architecture_kwargs": {
            "model_name": "resnet10t"}}), ("recombination", {"architecture": "recombined"})):
        config = {"teachers": [{"path": str(tmp_path / "t0")}, {"path": str(tmp_path / "t1")}],
                  "student": {**student, "task_names": {"classification": "digits"}},
                  "algorithm": {"name": algorithm},
                  "data": {"transfer": {"dataset": "digits", "split": "transfer", "size": 16}},
                  "train": {"epochs": 1, "batch_size": 64, "device": "cpu"}}
        path = tmp_path / f"{algorithm}.yaml"
        path.write_text(yaml.safe_dump(config))
        outputs[algorithm] = run_kamal("amalgamate", str(path), "-o", str(tmp_path / algorithm),
                                       "--quiet")
    for algorithm, result in outputs.items():
        assert result.returncode == 0, result.stderr[-2000:]
        student = load_model(tmp_path / algorithm / "student")
        assert student.tasks[0].classes == [str(d) for d in range(10)]


def test_a_students_recorded_teacher_loads_again_with_its_class_selection(tmp_path):
    """kamal evaluate --teachers reloads the teachers from the student's provenance (JSON):
    format and classes come back as the run used them."""
    import json

    from kamal.model_eval import recorded_teacher

    _timm_repo(tmp_path / "repo")
    ref = TeacherRef(name="pets", path=str(tmp_path / "repo"), classes={3: "cat", 5: "dog"})
    teacher = resolve_teacher(ref, tmp_path, 0)
    entry = json.loads(json.dumps({"name": teacher.name, **teacher.source}))  # as config.json
    again = resolve_teacher(recorded_teacher(entry), tmp_path, 0)
    assert again.source["format"] == "timm" and again.tasks[0].classes == ["cat", "dog"]
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(again(x)["pets"], teacher(x)["pets"])
