"""kamal-plugin-sbm: discovery, the branched student, teacher checks, an end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import kamal
from kamal import (
    DepthTask,
    InputSpec,
    KamalError,
    KamalModel,
    SegmentationTask,
    StudentSpec,
    load_model,
    load_teacher,
)

SIZE, WIDTH = 16, 4
CLASSES = ["wall", "floor", "circle", "square", "triangle"]


def test_plugin_is_installed():
    from kamal import plugin_infos

    info = next((i for i in plugin_infos() if i.distribution == "kamal-plugin-sbm"), None)
    assert info is not None, "pip install ./plugins/kamal-plugin-sbm first"
    assert info.error is None
    assert info.provides["amalgamators"] == ["sbm"]
    assert info.provides["architectures"] == ["sbm-segnet"]
    assert kamal.get_registry().get("amalgamators", "sbm").name == "sbm"


def _student(branches=None) -> KamalModel:
    tasks = [SegmentationTask("seg", CLASSES), DepthTask("depth")]
    kwargs = {"width": WIDTH, **({"branches": branches} if branches else {})}
    return KamalModel("sbm-segnet", tasks, InputSpec(3, (SIZE, SIZE)), kwargs)


def test_pruned_student_matches_the_supernet_with_the_same_branch_points():
    torch.manual_seed(0)
    supernet = _student()
    net = supernet.features
    for p in net.gates.parameters():
        p.data.normal_()
    chosen = {"seg": 1, "depth": 0}
    net.choose(chosen)
    assert net.chosen() == chosen
    pruned = _student(chosen)
    pruned.features.load_state_dict(net.pruned_state(chosen), strict=True)
    assert set(pruned.features.state_dict()) == net.pruned_keys(chosen)
    x = torch.rand(2, 3, SIZE, SIZE)
    supernet.eval(), pruned.eval()
    a, b = supernet(x), pruned(x)
    assert torch.allclose(a["seg"], b["seg"]) and torch.allclose(a["depth"], b["depth"])
    assert a["seg"].shape == (2, 5, SIZE, SIZE) and a["depth"].shape == (2, 1, SIZE, SIZE)
    size = sum(p.numel() for p in pruned.parameters())
    assert size < sum(p.numel() for p in supernet.parameters())
    assert pruned.features.trunk.dec2 is None  # no task reads the second shared block


def test_branch_points_are_sampled_only_while_training_the_supernet():
    net = _student().features
    net.sampling = True
    net.train()
    torch.manual_seed(0)
    assert len({net.branch_point("seg") for _ in range(40)}) == 4
    net.eval()
    assert net.branch_point("seg") == 3  # not chosen yet: the fully shared decoder
    with net.trying({"seg": 1}):
        assert net.branch_point("seg") == 1
    with pytest.raises(kamal.ConfigError, match="branches must give every task"):
        _student({"seg": 1})


# --- with tiny teachers -------------------------------------------------------------------


def _data(split: str, count: int) -> dict:
    return {"dataset": "scenes", "split": split, "size": SIZE, "count": count}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """Two tiny SegNet teachers (segmentation, depth) trained on tiny scenes."""
    folder = tmp_path_factory.mktemp("sbm-teachers")
    repos = {}
    for kind in ("segmentation", "depth"):
        config = {"model": {"architecture": "segnet", "architecture_kwargs": {"width": WIDTH},
                            "task": f"scenes-{kind}", "task_kind": kind},
                  "data": {"train": _data("train", 96)},
                  "train": {"epochs": 4, "batch_size": 16, "optimizer": {"lr": 0.01},
                            "device": "cpu"}}
        path = folder / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(config))
        kamal.train(path, folder / kind, progress=False)
        repos[kind] = folder / kind / "model"
    return repos


def _run_config(folder: Path, teachers: dict[str, Path], **algorithm) -> Path:
    config = {
        "teachers": [{"name": kind, "path": str(path)} for kind, path in teachers.items()],
        "student": {"architecture": "sbm-segnet", "architecture_kwargs": {"width": WIDTH}},
        "algorithm": {"name": "sbm", "demo_images": 2, "calibration_images": 32, **algorithm},
        "data": {"transfer": _data("transfer", 96), "eval": _data("test", 32)},
        "train": {"epochs": 5, "batch_size": 8, "optimizer": {"lr": 0.01}, "device": "cpu"},
    }
    path = folder / "sbm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _amalgamator(teachers: dict[str, Path], **options):
    cls = kamal.get_registry().get("amalgamators", "sbm")
    loaded = [load_teacher(kind, path) for kind, path in teachers.items()]
    return cls(cls.Config(**options), loaded, StudentSpec("sbm-segnet", {"width": WIDTH}))


def test_init_from_teachers_copies_the_trunk_branches_and_heads(teachers):
    amalgamator = _amalgamator(teachers, trunk_teacher="segmentation")
    student = amalgamator.build_student().eval()
    net = student.features
    for p in net.gates.parameters():
        p.data.fill_(30.0)  # gates fully open
    seg_teacher, depth_teacher = (amalgamator.teachers[0].model, amalgamator.teachers[1].model)
    x = torch.rand(2, 3, SIZE, SIZE)
    net.choose({"scenes-segmentation": 3, "scenes-depth": 0})
    # the whole trunk and the head come from the segmentation teacher: same outputs
    assert torch.allclose(student(x)["scenes-segmentation"], seg_teacher(x)["scenes-segmentation"],
                          atol=1e-5)
    branch = net.private["scenes-depth"]["dec2"].state_dict()
    for key, value in depth_teacher.features.dec2.state_dict().items():
        assert torch.equal(branch[key], value)
    scratch = _amalgamator(teachers, init="scratch").build_student()
    assert not torch.equal(scratch.features.trunk.enc1[0].weight, net.trunk.enc1[0].weight)


def test_teachers_and_student_that_sbm_refuses(teachers, tmp_path):
    cls = kamal.get_registry().get("amalgamators", "sbm")
    seg = load_teacher("a", teachers["segmentation"])
    with pytest.raises(KamalError, match="one teacher per task kind"):
        cls.check_teachers([seg, load_teacher("b", teachers["segmentation"])])
    with pytest.raises(KamalError, match="sbm-segnet"):
        cls(cls.Config(), [seg], StudentSpec("segnet", {"width": WIDTH})).build_student()
    with pytest.raises(KamalError, match="width 4 but the student has 8"):
        cls(cls.Config(), [seg], StudentSpec("sbm-segnet", {"width": 8})).build_student()


def _distance_to_teachers(student, teachers: dict[str, Path]) -> tuple[float, float]:
    """Pixel-wise KL to the segmentation teacher and L1 to the depth teacher on test scenes."""
    x = kamal.build_dataset("scenes", "test", {"size": SIZE, "count": 32}).images.float() / 255
    seg, depth = (load_teacher(k, p).model for k, p in teachers.items())
    student.eval()
    with torch.no_grad():
        out = student(x)
        task_s, task_d = student.tasks
        kl = task_s.distill_loss(out[task_s.name], seg(x)[task_s.name])
        l1 = task_d.distill_loss(out[task_d.name], depth(x)[task_d.name])
    return float(kl), float(l1)


def test_short_sbm_run_improves_over_the_untrained_student(teachers, tmp_path):
    from kamal import Interrupted

    path = _run_config(tmp_path, teachers, init="scratch")
    report = kamal.amalgamate(path, tmp_path / "run", progress=False,
                              overrides=["train.loggers=[tensorboard]"])
    out = tmp_path / "run"
    summary = json.loads((out / "sbm.json").read_text())
    branches = summary["branches"]
    assert set(branches) == {"scenes-segmentation", "scenes-depth"}
    assert all(0 <= b <= 3 for b in branches.values())
    assert set(summary["search_losses"]["scenes-depth"]) == {"0", "1", "2", "3"}
    assert (out / "demo.png").stat().st_size > 1000
    # the demo also reaches the run's trackers (Trainer.log_figure): read back from TensorBoard
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.encoded_image_string[:4] for e in events.Images("sbm/demo")] == [b"\x89PNG"]
    assert report["hyperparameters"]["chosen_branches"] == branches
    metrics = report["student"]["metrics"]
    assert set(metrics) == {"scenes-segmentation", "scenes-depth"}
    assert {t["name"] for t in report["teachers"]} == {"segmentation", "depth"}

    student = load_model(out / "student")
    assert student.architecture_kwargs["branches"] == branches
    trained = _distance_to_teachers(student, teachers)
    torch.manual_seed(0)
    fresh = KamalModel("sbm-segnet", student.tasks, student.input_spec,
                       {"width": WIDTH, "branches": branches})
    untrained = _distance_to_teachers(fresh, teachers)
    assert trained[0] < 0.5 * untrained[0], (trained, untrained)  # KL to the seg teacher
    assert trained[1] < 0.5 * untrained[1], (trained, untrained)  # L1 to the depth teacher

    # interrupted while fine-tuning (after the search) and resumed: the same student
    with pytest.raises(Interrupted):
        kamal.amalgamate(path, tmp_path / "resumed", progress=False, interrupt_after_steps=33)
    kamal.amalgamate(path, tmp_path / "resumed", progress=False, resume=True)
    resumed = load_model(tmp_path / "resumed" / "student").state_dict()
    for key, value in student.state_dict().items():
        assert torch.allclose(value.float(), resumed[key].float(), atol=1e-6), key
