"""Every library family as a teacher through a ``hub:`` reference: tiny random-weight repos
saved with the libraries' own savers (transformers ``save_pretrained``, timm's
``save_for_hf``, a torchvision ``state_dict`` in safetensors), served by the loopback Hub.
Tasks, classes, input spec and tappable layers are right, and the teacher on its own view of
a non-square image gives what the library gives with its own preprocessing (1e-5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")
pytest.importorskip("timm")

TESTS = Path(__file__).parent

CHECK = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from family_repos import FAMILIES, library_outputs, photo
from kamal import FeatureTap
from kamal.config import TeacherRef
from kamal.teacher_loading import resolve_teacher

results = {}
for family, local in json.loads(sys.argv[1]).items():
    teacher = resolve_teacher(TeacherRef(name="t", hub=f"kamal-test/{family}"), Path.cwd(), 0)
    image = photo()
    layers = list(FAMILIES[family][1])
    with FeatureTap(teacher.model.features, layers, "t") as tap:
        outputs = teacher(teacher.input_spec.view(image)[None])
    mine = {"output": outputs.get("t"), **tap.features}
    diffs = {}
    for key, value in library_outputs(family, Path(local), image).items():
        scale = max(1.0, float(value.abs().max()))
        diffs[key] = float((mine[key] - value).abs().max()) / scale
    results[family] = {"source": teacher.source, "tasks": [t.to_dict() for t in teacher.tasks],
                       "input": teacher.input_spec.to_dict(), "diffs": diffs,
                       "layers": {k: list(v.shape) for k, v in tap.features.items()}}
print(json.dumps(results))
"""

CLASSES = {"vit": ["cat", "dog", "fox"], "convnext": ["cat", "dog", "fox"],
           "segformer": ["wall", "floor", "circle"], "timm-resnet": ["cat", "dog", "fox"],
           "timm-vit": ["cat", "dog", "fox"], "torchvision-resnet18": ["cat", "dog", "fox"]}
FORMATS = {"timm-resnet": "timm", "timm-vit": "timm", "torchvision-resnet18": "torchvision"}


def test_every_family_loads_from_the_hub_and_equals_its_library(hub_server, tmp_path):
    sys.path.insert(0, str(TESTS))
    from family_repos import FAMILIES

    locals_ = {}
    for family, (build, _) in FAMILIES.items():
        torch.manual_seed(0)
        folder = tmp_path / family
        build(folder)
        files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
                 if p.is_file()}
        hub_server.add_commit(f"kamal-test/{family}", files)
        if family == "vit":
            assert "model.safetensors.index.json" in files and "model.safetensors" not in files
        locals_[family] = str(folder)
    result = subprocess.run([sys.executable, "-c", CHECK, json.dumps(locals_), str(TESTS)],
                            env=hub_server.hub_env(tmp_path), capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.splitlines()[-1])
    for family, (_, layers) in FAMILIES.items():
        got = results[family]
        assert got["source"]["hub"] == f"kamal-test/{family}", family
        assert len(got["source"]["revision"]) == 40 and got["source"]["format"] == FORMATS.get(
            family, "transformers")
        assert got["layers"] == layers, family
        assert all(diff < 1e-5 for diff in got["diffs"].values()), (family, got["diffs"])
        tasks = got["tasks"]
        if family == "dinov2":
            assert tasks == [] and got["diffs"].keys() == {"pooled"}
        elif family == "dpt":
            assert [t["kind"] for t in tasks] == ["depth"]
        else:
            assert tasks[0]["classes"] == CLASSES[family], family
    assert results["segformer"]["input"]["size"] == [48, 40]
    assert results["dinov2"]["input"]["resize_to"] == [40]
    assert results["timm-resnet"]["input"]["backend"] == "pil"


def test_the_hub_formats_example_runs_from_the_hub(hub_server, tmp_path):
    """examples/hub-formats: its script's teachers (two steps each) published to the Hub, its
    kd and sbm configs pointed at them with hub: references, one short epoch each."""
    example = TESTS.parent / "examples" / "hub-formats"
    made = subprocess.run([sys.executable, str(example / "make_teachers.py"), "--quick", "--out",
                           str(tmp_path / "teachers")], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-3000:]
    for folder in (tmp_path / "teachers").iterdir():
        hub_server.add_commit(f"kamal-examples/{folder.name}",
                              {p.name: p.read_bytes() for p in folder.iterdir()})
    env = hub_server.hub_env(tmp_path)
    sizes = {}
    for name, data in (("kd", {"size": 32}), ("sbm", {"size": 48, "count": 48})):
        config = yaml.safe_load((example / f"{name}.yaml").read_text())
        for teacher in config["teachers"]:
            teacher["hub"] = f"kamal-examples/{Path(teacher.pop('path')).name}"
        for section in ("transfer", "eval"):
            config["data"][section].update(data)
        config["train"]["epochs"] = 1
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run([sys.executable, "-m", "kamal", "amalgamate", str(path), "-o",
                                 str(tmp_path / name), "--quiet"], env=env, capture_output=True,
                                text=True, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert report["student"]["metrics"] and all(t["metrics"] for t in report["teachers"])
        assert all(len(t["source"]["revision"]) == 40 for t in report["teachers"])
        sizes[name] = [t["input"]["size"] for t in report["teachers"]]
    assert sizes == {"kd": [[32, 32], [24, 24]], "sbm": [[48, 48], [32, 32]]}
