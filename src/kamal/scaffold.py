"""``kamal new-plugin NAME``: write a ready-to-install amalgamator plugin package.

The generated plugin registers a working amalgamator (multi-teacher KD on the calibrated
merged logits, plus an optional feature-matching term to show feature taps) that the author
then changes, a test that runs kamal's conformance kit on it, and a README.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path

from .errors import KamalError
from .version import CORE_DISTRIBUTION, PLUGIN_API

_NAME = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "kamal-plugin-{name}"
version = "0.1.0"
description = "The {name} amalgamation algorithm for kamal"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["{core_requirement}"]

[project.optional-dependencies]
test = ["pytest>=8", "build>=1.2", "twine>=5"]

# the entry-point name is the distribution's name (pluggy skips a repeated name)
[project.entry-points.kamal]
kamal-plugin-{name} = "{module}.plugin"

[tool.setuptools.packages.find]
where = ["src"]
'''

PLUGIN = '''\
"""Hook implementations: kamal imports this module to discover the plugin.

Register lazily ("module:attr") so that `kamal list-plugins` does not import torch.
"""

from kamal import Register, hookimpl

KAMAL_PLUGIN_API = "{plugin_api}"  # the kamal plugin API this plugin was built for


@hookimpl
def register_amalgamators(register: Register) -> None:
    """The {name} amalgamator."""
    register("{name}", "{module}.algorithm:{cls}")
'''

ALGORITHM = '''\
"""The {name} amalgamator.

Starts as multi-teacher knowledge distillation on the teachers' calibrated merged logits,
plus an optional term matching the student's pooled feature to a projection of the
teachers'. Change `losses` (and `Config`) to implement your algorithm.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from kamal import Amalgamator, Batch, FeatureRequest, KDTerm, KDTermConfig, Student


class {cls}Config(KDTermConfig):
    """Hyperparameters of {name}; every field needs a default and a description.

    KDTermConfig brings kamal's shared KD term: temperature, merge, kd_weight.
    """

    name: Literal["{name}"] = "{name}"
    feature_weight: float = Field(0.0, ge=0, description="Weight of the feature-matching loss "
                                  "(0 disables it).")


class {cls}(Amalgamator):
    """KD on merged teacher logits (+ optional feature matching): edit me."""

    name = "{name}"
    Config = {cls}Config
    config: {cls}Config

    def feature_layers(self) -> FeatureRequest:
        if not self.config.feature_weight:
            return FeatureRequest()
        teacher_layers = [[f"{{t.model.head_layer}}:in"] for t in self.teachers]
        return FeatureRequest(teacher_layers, [f"{{self.student.head_layer}}:in"])

    def setup(self, student: Student, transfer_images: Iterable[Tensor]) -> None:
        super().setup(student, transfer_images)
        device = next(student.parameters()).device
        self.kd = KDTerm(self.config, self.teachers, student.tasks)
        self.kd.calibrate(self.teachers, transfer_images, device)
        self.projection = None
        if self.config.feature_weight:
            # lazily sized on the first batch: teacher features -> student feature width
            self.projection = nn.LazyLinear(1).to(device)

    def trainable_modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {{"merger": self.kd.merger}}
        if self.projection is not None:
            modules["projection"] = self.projection
        return modules

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        losses = self.kd(batch)
        if self.projection is not None:
            (student_feature,) = batch.student_features.values()
            teacher_feature = torch.cat([next(iter(f.values())).flatten(1)
                                         for f in batch.teacher_features], dim=1)
            if isinstance(self.projection, nn.LazyLinear):
                self.projection.out_features = student_feature.flatten(1).shape[1]
            projected = self.projection(teacher_feature)
            losses["feature"] = self.config.feature_weight * nn.functional.mse_loss(
                student_feature.flatten(1), projected)
        return losses
'''

TEST = '''\
"""Conformance and discovery tests for kamal-plugin-{name}."""

from kamal import plugin_infos
from kamal.testing import check_amalgamator

from {module}.algorithm import {cls}


def test_plugin_is_installed_and_registers_{ident}():
    infos = {{info.name: info for info in plugin_infos()}}
    info = infos["kamal-plugin-{name}"]
    assert info.status == "ok", info.error
    assert info.provides == {{"amalgamators": ["{name}"]}}


def test_{ident}_meets_the_amalgamator_contract(tmp_path):
    report = check_amalgamator({cls}, tmp_path)
    assert report["algorithm"] == "{name}"
    assert report["student"]["metrics"]["digits"]["top1"] > 0.2  # 10 classes: chance is 0.1
'''

README = '''\
# kamal-plugin-{name}

The `{name}` knowledge-amalgamation algorithm, a plugin for kamal (the distribution
`{core}` on the package index; import package and command `kamal`).

## Develop

```bash
pip install -e './kamal-plugin-{name}[test]'   # the plugin in editable mode, with pytest and build
kamal list-plugins                             # shows kamal-plugin-{name}, providing {name}
pytest kamal-plugin-{name}/tests               # discovery + kamal's conformance kit
kamal amalgamate run.yaml                      # with `algorithm: {{name: {name}}}`
```

Hyperparameters: see `{cls}Config` in `src/{module}/algorithm.py`.

## Publish

```bash
python -m build kamal-plugin-{name}           # sdist and wheel into kamal-plugin-{name}/dist
twine check kamal-plugin-{name}/dist/*
twine upload kamal-plugin-{name}/dist/*
```

Users then install it with `kamal install {name}` (= `pip install kamal-plugin-{name}`).
It requires `{core_requirement}` and declares `KAMAL_PLUGIN_API = "{plugin_api}"` in
`src/{module}/plugin.py`: widen both only after testing with the newer core.
'''


def core_requirement(version: str) -> str:
    """``kamal-core`` from this release up to the next one that may break plugins: the next
    minor while the major version is 0, else the next major."""
    parts = [int(p) for p in version.split(".")[:2]] if version[0].isdigit() else [0, 1]
    major, minor = (parts + [0])[:2]
    upper = f"{major}.{minor + 1}" if major == 0 else f"{major + 1}"
    return f"{CORE_DISTRIBUTION}>={major}.{minor},<{upper}"


def api_range() -> str:
    """The plugin API range a plugin written against this core declares."""
    major = int(PLUGIN_API.split(".")[0])
    return f">={major},<{major + 1}"


def _files(name: str) -> dict[str, str]:
    from . import __version__

    module = "kamal_plugin_" + name.replace("-", "_")
    cls = "".join(part.capitalize() for part in name.split("-")) + "Amalgamator"
    values = {"name": name, "module": module, "cls": cls, "ident": name.replace("-", "_"),
              "core_requirement": core_requirement(__version__), "plugin_api": api_range(),
              "core": CORE_DISTRIBUTION}
    return {
        "pyproject.toml": PYPROJECT.format(**values),
        "README.md": README.format(**values),
        f"src/{module}/__init__.py": f'"""kamal-plugin-{name}."""\n',
        f"src/{module}/plugin.py": PLUGIN.format(**values),
        f"src/{module}/algorithm.py": ALGORITHM.format(**values),
        f"tests/test_{values['ident']}_plugin.py": TEST.format(**values),
    }


def new_plugin(name: str, directory: str | Path = ".") -> Path:
    """Write ``kamal-plugin-NAME`` under ``directory``; refuses to overwrite anything."""
    if not _NAME.match(name) or keyword.iskeyword(name):
        raise KamalError(f"plugin name '{name}' must be lower-case letters, digits and single "
                         "dashes, starting with a letter (e.g. 'my-algo')")
    root = Path(directory) / f"kamal-plugin-{name}"
    if root.exists():
        raise KamalError(f"'{root}' already exists; choose another name or --dir")
    for relative, text in _files(name).items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root
