"""The installed plugin end to end: discovery, a short run, resume, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kamal import ConfigError, KamalError, amalgamate, load_model
from kamal.testing import check_amalgamator

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "digits" / "recombination.yaml"
SHORT = ["algorithm.rounds=2", "algorithm.epochs_per_round=1", "train.device=cpu"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("recombination")


@pytest.fixture(scope="module")
def quick_config(workdir: Path) -> Path:
    """The example config (shipped 16x16 teachers), made quick: no augmentation."""
    config = yaml.safe_load(EXAMPLE.read_text())
    for teacher in config["teachers"]:
        teacher["path"] = str(EXAMPLE.parent / teacher["path"])
    config["data"]["transfer"]["augment"] = False
    config["train"]["batch_size"] = 32
    path = workdir / "recombination.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_installed_distribution_is_discovered() -> None:
    from kamal import plugin_infos

    info = next(i for i in plugin_infos() if i.distribution == "kamal-plugin-recombination")
    assert info.status == "ok", info.error
    assert info.provides["amalgamators"] == ["recombination"]
    assert info.provides["architectures"] == ["recombined"]


def test_short_run_prunes_to_budget_and_saves_a_loadable_student(quick_config, workdir) -> None:
    out = workdir / "run"
    report = amalgamate(quick_config, out, overrides=SHORT, progress=False)
    combined = report["hyperparameters"]["combined_params"]
    assert report["hyperparameters"]["round_targets"] == [int(combined * 0.75),
                                                          int(combined * 0.5)]
    assert 0.45 * combined <= report["student"]["params"] <= 0.5 * combined
    assert report["student"]["metrics"]["digits"]["top1"] > 0.8
    rounds = [json.loads(line) for line in (out / "pruning.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    config = json.loads((out / "student" / "config.json").read_text())
    assert config["architecture"] == "recombined" and config["architecture_kwargs"]["widths"]
    student = load_model(out / "student").eval()
    assert sum(p.numel() for p in student.parameters()) == report["student"]["params"]
    with torch.no_grad():
        assert student(torch.rand(2, 1, 16, 16))["digits"].shape == (2, 10)


def test_resume_after_a_pruning_round_matches_an_uninterrupted_run(quick_config, workdir) -> None:
    from kamal import Interrupted

    finished = workdir / "run"
    if not (finished / "student").exists():
        amalgamate(quick_config, finished, overrides=SHORT, progress=False)
    out = workdir / "resumed"
    # the transfer split is 539 images: 16 steps per epoch, so step 20 is inside round 2,
    # after the second pruning: resume must load a checkpoint narrower than the combination
    with pytest.raises(Interrupted):
        amalgamate(quick_config, out, overrides=SHORT, progress=False, interrupt_after_steps=20)
    amalgamate(quick_config, out, overrides=SHORT, progress=False, resume=True)
    expected = load_model(finished / "student").state_dict()
    resumed = load_model(out / "student").state_dict()
    assert expected.keys() == resumed.keys()
    for key, value in expected.items():
        assert torch.allclose(value, resumed[key], atol=1e-6), key


def test_config_errors_say_what_to_write(quick_config) -> None:
    with pytest.raises(ConfigError, match="student.architecture: .*'recombined'"):
        amalgamate(quick_config, quick_config.parent / "bad-student", progress=False,
                   overrides=[*SHORT, "student.architecture=small-cnn"])
    with pytest.raises(ConfigError, match="algorithm.budget"):
        amalgamate(quick_config, quick_config.parent / "bad-budget", progress=False,
                   overrides=[*SHORT, "algorithm.budget=1.5"])


def test_example_with_teachers_of_different_architectures_suggests_cfl(tmp_path) -> None:
    with pytest.raises(KamalError, match="cfl"):
        amalgamate(EXAMPLE, tmp_path / "run", progress=False,
                   overrides=["teachers.1.path=teachers/digits-5-9"])


def test_conformance_kit(tmp_path) -> None:
    from kamal_plugin_recombination.algorithm import RecombinationAmalgamator

    check_amalgamator(RecombinationAmalgamator, tmp_path,
                      algorithm_options={"rounds": 2, "epochs_per_round": 1},
                      student={"architecture": "recombined"})
