"""The shape of the run path and of the public surface plugins build on.

- src/kamal has no import cycle (lazy imports inside functions count; ``TYPE_CHECKING``
  blocks do not, they never run);
- the report does not reach back into the run, and run.py stays a thin wiring module;
- plugins (sources and tests) and the scaffold's output import only public names;
- one KD term: a config written for ``kd`` runs with a freshly scaffolded plugin;
- the Trainer's hold-out API, the run-folder lookup (``kamal push`` of a ``kamal train``
  run) and ``KAMAL_TRACE_PLUGINS``.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import EXAMPLES, ROOT, run_kamal

import kamal
from kamal.config import TrainConfig
from kamal.data.base import TensorImageDataset
from kamal.data.views import UnlabeledView
from kamal.engine import StepInfo, Trainer
from kamal.run_folder import model_folder
from kamal.scaffold import new_plugin

SRC = ROOT / "src" / "kamal"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """kamal modules imported anywhere in ``path`` (functions included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "kamal")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[:len(package.split(".")) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] == "kamal":
                    for alias in child.names:  # ``from . import module`` names a module
                        full = f"{target}.{alias.name}"
                        found.add(full if full in modules else target)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    """Module -> the kamal modules it imports, from the source (nothing is imported)."""
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_lazy_import_cycle(tmp_path):
    graph = {"kamal.a": {"kamal.b"}, "kamal.b": {"kamal.c"}, "kamal.c": {"kamal.a"}, "kamal.d": set()}
    assert find_cycle(graph) == ["kamal.a", "kamal.b", "kamal.c", "kamal.a"]
    assert find_cycle({"kamal.a": {"kamal.b"}, "kamal.b": set()}) is None


def test_src_kamal_has_no_import_cycle():
    graph = import_graph()
    assert "kamal.models.base" in graph["kamal.amalgamator"]  # the parser sees real imports
    assert "kamal.step" in graph["kamal.testing"]  # ... including those inside functions
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_report_does_not_import_the_run_and_run_py_is_thin():
    graph = import_graph()
    assert not {"kamal.run", "kamal.supervised", "kamal.model_eval"} & graph["kamal.report"]
    assert len((SRC / "run.py").read_text().splitlines()) < 250
    # the CLI's error handler needs no torch: Interrupted lives with the other errors
    assert graph["kamal.errors"] == set()


def _non_public_imports(path: Path) -> list[str]:
    """``kamal`` names that ``path`` imports but the public API does not offer."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module == "kamal":
                bad += [f"kamal.{a.name}" for a in node.names if a.name not in kamal.__all__]
            elif node.module.startswith("kamal.") and node.module != "kamal.testing":
                bad.append(node.module)
        elif isinstance(node, ast.Import):
            bad += [a.name for a in node.names
                    if a.name.startswith("kamal.") and a.name != "kamal.testing"]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "kamal" and node.attr not in kamal.__all__
              and node.attr != "testing"):
            bad.append(f"kamal.{node.attr}")
    return bad


def test_plugins_and_the_scaffold_use_only_public_names(tmp_path):
    scaffold = new_plugin("surface-check", tmp_path)
    files = [*ROOT.glob("plugins/*/src/**/*.py"), *ROOT.glob("plugins/*/tests/**/*.py"),
             *scaffold.rglob("*.py")]
    assert len(files) > 20
    offenders = {str(f.relative_to(f.parents[3])): bad for f in files
                 if (bad := _non_public_imports(f))}
    assert offenders == {}
    # the checker itself flags private imports
    probe = tmp_path / "probe.py"
    probe.write_text("from kamal.engine import Trainer\nimport kamal\nkamal.run_folder\n")
    assert _non_public_imports(probe) == ["kamal.engine", "kamal.run_folder"]


def test_a_kd_config_runs_with_a_scaffolded_plugin_by_changing_only_the_name(tmp_path):
    root = new_plugin("kd-twin", tmp_path)
    sys.path.insert(0, str(root / "src"))
    try:
        module = importlib.import_module("kamal_plugin_kd_twin.algorithm")
    finally:
        sys.path.remove(str(root / "src"))
    from kamal.plugins import unregister_plugin
    from kamal.testing import _ensure_registered

    config = yaml.safe_load((EXAMPLES / "digits" / "kd.yaml").read_text())
    # every key of the shared KD term, as a kd user would write them
    config["algorithm"].update(temperature=1.0, merge="standardize", kd_weight=1.0)
    config["train"]["epochs"] = 2
    for teacher in config["teachers"]:
        teacher["path"] = str(EXAMPLES / "digits" / teacher["path"])
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump(config))
    config["algorithm"]["name"] = "kd-twin"  # the only change
    (tmp_path / "twin.yaml").write_text(yaml.safe_dump(config))
    kd = kamal.amalgamate(tmp_path / "kd.yaml", tmp_path / "kd", progress=False)
    plugin = _ensure_registered(module.KdTwinAmalgamator)
    try:
        twin = kamal.amalgamate(tmp_path / "twin.yaml", tmp_path / "twin", progress=False)
    finally:
        if plugin:
            unregister_plugin(plugin)
    assert twin["algorithm"] == "kd-twin" and twin["hyperparameters"]["kd_weight"] == 1.0
    # the scaffold starts as kd: same term, same seed -> the same student
    assert twin["student"]["metrics"] == kd["student"]["metrics"]
    ours = kamal.load_model(tmp_path / "twin" / "student").state_dict()
    for key, value in kamal.load_model(tmp_path / "kd" / "student").state_dict().items():
        assert torch.equal(value, ours[key]), key


def _trainer(tmp_path: Path, dataset, step_fn) -> Trainer:
    cfg = TrainConfig(epochs=1, batch_size=3, device="cpu")  # 9 kept samples: 3 full batches
    model = torch.nn.Linear(1, 1)
    return Trainer(modules={"student": model}, dataset=dataset, step_fn=step_fn, cfg=cfg,
                   output_dir=tmp_path, device=torch.device("cpu"), progress=False)


def test_trainer_holds_out_samples_and_fetches_images_by_index(tmp_path):
    images = torch.arange(12, dtype=torch.float32).view(12, 1, 1, 1).expand(12, 1, 2, 2).clone()
    data = UnlabeledView(TensorImageDataset(images, torch.zeros(12), None))
    seen: list[float] = []
    weight = torch.nn.Parameter(torch.zeros(()))

    def step(batch, info: StepInfo):
        seen.extend(batch[:, 0, 0, 0].tolist())
        return {"loss": (weight - 1) ** 2 + batch.sum() * 0}

    trainer = _trainer(tmp_path, data, step)
    trainer.modules["student"].register_parameter("w", weight)
    assert trainer.num_samples == 12
    held = [1, 5, 7]
    torch.testing.assert_close(trainer.images(held), images[held])
    trainer.hold_out(held)
    trainer.fit()
    assert sorted(seen) == [float(i) for i in range(12) if i not in held]
    assert trainer.num_samples == 12 and len(trainer.dataset) == 9
    torch.testing.assert_close(trainer.images([5]), images[[5]])  # still reachable


def test_trainer_images_draw_augmentation_from_the_seed_only():
    data = UnlabeledView(TensorImageDataset(torch.rand(6, 1, 8, 8), torch.zeros(6), None,
                                            augment_shift=2))
    trainer = Trainer(modules={"student": torch.nn.Linear(1, 1)}, dataset=data,
                      step_fn=lambda b, i: {}, cfg=TrainConfig(device="cpu"),
                      output_dir=Path("/nonexistent-unused"), device=torch.device("cpu"))
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    first = trainer.images([0, 1, 2], seed=11)
    assert torch.equal(torch.random.get_rng_state(), before)  # training randomness untouched
    assert torch.equal(first, trainer.images([0, 1, 2], seed=11))
    assert not torch.equal(first, trainer.images([0, 1, 2], seed=12))


def test_model_folder_finds_the_model_of_either_kind_of_run(tmp_path, tiny_teachers):
    train_run = tiny_teachers[0].parent  # a `kamal train` run folder
    assert model_folder(train_run) == train_run / "model"
    assert model_folder(tiny_teachers[0]) == tiny_teachers[0]
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "config.json").write_text("{}")
    assert model_folder(tmp_path) == tmp_path / "student"
    with pytest.raises(kamal.KamalError, match="neither a run folder"):
        model_folder(tmp_path / "student" / "nothing")


def test_kamal_push_publishes_a_kamal_train_run_folder(hub_server, tmp_path, tiny_teachers):
    env = {**hub_server.hub_env(tmp_path), "HF_TOKEN": hub_server.token}
    result = run_kamal("push", str(tiny_teachers[0].parent), "kamal-test/trained", env=env)
    assert result.returncode == 0, result.stderr
    files = hub_server.files("kamal-test/trained")
    assert files["model.safetensors"] == (tiny_teachers[0] / "model.safetensors").read_bytes()
    assert "kamal train" in files["README.md"].decode()


def test_trace_plugins_prints_each_registration():
    traced = run_kamal("list-plugins", env={"KAMAL_TRACE_PLUGINS": "1"})
    assert traced.returncode == 0, traced.stderr
    assert "kamal (kamal-core) registers algorithm 'kd' -> kamal.algorithms.kd:KDAmalgamator" in traced.stderr
    quiet = run_kamal("list-plugins", env={"KAMAL_TRACE_PLUGINS": ""})
    assert "registers" not in quiet.stderr
