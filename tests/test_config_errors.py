"""Bad input gets one clear message: key path, bad value, what is allowed; no traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import EXAMPLES, run_kamal

from kamal.cli import main

KD = EXAMPLES / "digits" / "kd.yaml"


def _config(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(KD.read_text())
    for t in data["teachers"]:
        t["path"] = str((KD.parent / t["path"]).resolve())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is None:
            del node[last]
        else:
            node[last] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _fail(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.mark.parametrize("changes, expected", [
    ({"train__epoch": 3}, ["train.epoch: unknown key. Did you mean 'epochs'?"]),
    ({"studnet": {}}, ["studnet: unknown key. Did you mean 'student'?"]),
    ({"train__epochs": "many"}, ["train.epochs:", "'many'"]),
    ({"train__batch_size": 0}, ["train.batch_size:", "greater than or equal to 1"]),
    ({"train__device": "gpu"}, ["train.device: unknown device 'gpu'"]),
    ({"algorithm__temprature": 2}, ["algorithm.temprature: unknown key. Did you mean "
                                    "'temperature'?"]),
    ({"algorithm__merge": "magic"}, ["algorithm.merge:", "'feature-density', 'auto' or 'naive'"]),
    ({"algorithm__name": "cfll"}, ["algorithm.name: unknown algorithm 'cfll'", "Installed:",
                                   "kamal install cfll"]),
    ({"student__architecture": "small-cn"}, ["unknown architecture 'small-cn'",
                                             "Did you mean 'small-cnn'?"]),
    ({"student__architecture_kwargs": {"widht": 8}}, ["has no option 'widht'", "width"]),
    ({"data__transfer__dataset": "digit"}, ["data.transfer.dataset: unknown dataset 'digit'",
                                            "Did you mean 'digits'?"]),
    ({"data__transfer__split": "validation"}, ["data.transfer", "unknown split 'validation'"]),
    ({"student__input": {"interpolation": "box"}},
     ["student.input: interpolation 'box' is not one of nearest, bilinear, bicubic (backend "
      "tensor)"]),
    ({"teachers__0__path": "/does/not/exist"}, ["teachers.0", "'/does/not/exist' does not exist"]),
    ({"teachers__0__hub": "org/x"}, ["teachers.0: give exactly one of 'path'"]),
    ({"student": None}, ["student: Field required"]),
])
def test_config_errors_name_the_key_and_the_fix(tmp_path, changes, expected):
    output = _fail("amalgamate", str(_config(tmp_path, **changes)), "-o", str(tmp_path / "out"))
    for fragment in expected:
        assert fragment in output


def test_missing_config_file(tmp_path):
    assert "config file" in _fail("amalgamate", str(tmp_path / "nope.yaml"))


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("teachers: [unclosed\n")
    assert "not valid YAML" in _fail("amalgamate", str(path))


def test_bad_override_syntax(tmp_path):
    assert "expected key.path=value" in _fail("amalgamate", str(KD), "--set", "train.epochs")


def test_teachers_at_another_resolution_need_an_algorithm_that_takes_them(tmp_path,
                                                                         tiny_teachers):
    """An 8x8 teacher beside 16x16 ones: layerwise (same pixels) refuses, naming it and the
    algorithms that take it; kd reads each teacher at its own size (tests/test_views.py)."""
    path = _config(tmp_path, algorithm={"name": "layerwise"})
    data = yaml.safe_load(path.read_text())
    data["teachers"][1]["path"] = str(tiny_teachers[1])
    path.write_text(yaml.safe_dump(data))
    output = _fail("amalgamate", str(path), "-o", str(tmp_path / "out"))
    assert "algorithm 'layerwise' compares the teachers and the student at the same pixels" in output
    assert "reads 8x8" in output and "16x16" in output
    assert re.search(r"\(.*\bcfl\b.*\bkd\b.*\)", output), output


def test_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    output = _fail("amalgamate", str(KD), "-o", str(out))
    assert "already holds a run" in output and "--resume" in output
    assert (out / "report.json").read_text() == "{}"


def test_resume_without_checkpoint(tmp_path):
    assert "no checkpoints/latest.safetensors" in _fail("amalgamate", str(KD), "-o",
                                                         str(tmp_path), "--resume")


def test_debug_shows_the_traceback(tmp_path):
    """The real CLI: one line without --debug, the full traceback with it."""
    missing = str(tmp_path / "nope.yaml")
    plain = run_kamal("amalgamate", missing)
    assert plain.returncode != 0
    assert f"config file '{missing}' does not exist" in plain.stderr
    assert "Traceback" not in plain.stderr + plain.stdout
    debug = run_kamal("--debug", "amalgamate", missing)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr, debug.stderr
    # kamal's own frames and the exception with its type, as Python prints them
    assert re.search(r'File ".*[/\\]kamal[/\\]\w+\.py", line \d+', debug.stderr), debug.stderr
    assert f"ConfigError: config file '{missing}' does not exist" in debug.stderr


def test_train_configs_refuse_teacher_only_keys(tmp_path):
    data = yaml.safe_load((EXAMPLES / "digits" / "supervised.yaml").read_text())
    data["train"]["teacher_cache"] = "memory"
    path = tmp_path / "supervised.yaml"
    path.write_text(yaml.safe_dump(data))
    output = _fail("train", str(path), "-o", str(tmp_path / "out"))
    assert "train.teacher_cache: unknown key" in output


def test_train_on_a_subset_of_the_datas_classes(tmp_path):
    data = yaml.safe_load((EXAMPLES / "digits" / "supervised.yaml").read_text())
    data["model"]["classes"] = ["0", "1", "seven"]
    path = tmp_path / "supervised.yaml"
    path.write_text(yaml.safe_dump(data))
    output = _fail("train", str(path), "-o", str(tmp_path / "out"))
    assert "model.classes: ['seven'] not among the training data's classes (0, 1, 2" in output
    import kamal

    data["model"]["classes"] = ["0", "1", "2"]
    data["train"].update(epochs=1)
    path.write_text(yaml.safe_dump(data))
    report = kamal.train(path, tmp_path / "run", progress=False)
    model = kamal.load_model(tmp_path / "run" / "model")
    assert model.tasks[0].classes == ["0", "1", "2"] and model.tasks[0].num_outputs == 3
    # scored on the test images of its own classes only
    test = kamal.build_dataset("digits", "test", {"size": 16})
    own = sum(1 for i in range(len(test)) if int(test[i][1]) in (0, 1, 2))
    assert report["model"]["metrics"]["digits"]["samples"] == own
