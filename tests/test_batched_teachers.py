"""Teacher execution: vmapped same-architecture groups and channels-last equal the plain path."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from kamal import ClassificationTask, InputSpec, KamalModel
from kamal.config import AmalgamationTrainConfig
from kamal.interfaces import Teacher
from kamal.teachers import TeacherRunner, group_key

LAYERS = ["block2", "head:in"]


def _teacher(name: str, arch: str = "small-cnn", width: int = 4, classes: str = "01234",
             seed: int = 0) -> Teacher:
    torch.manual_seed(seed)
    model = KamalModel(arch, [ClassificationTask(name, list(classes))], InputSpec(1, (8, 8)),
                       {"width": width})
    for module in model.modules():  # non-trivial running statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return Teacher(name, model)


def _reference(teachers, layers, images):
    plain = TeacherRunner(teachers, layers, batch="off", channels_last="off")
    return plain(images)


def _assert_close(got, want) -> None:
    for mine, theirs in zip(got, want, strict=True):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key].shape == theirs[key].shape, key
            assert torch.allclose(mine[key], theirs[key], rtol=1e-5, atol=1e-6), key


def test_same_architecture_teachers_run_as_one_call_with_stacked_features():
    teachers = [_teacher("a", seed=0), _teacher("b", classes="56789", seed=1),
                _teacher("c", arch="small-vgg", seed=2), _teacher("d", seed=3)]
    layers = [LAYERS] * 4
    images = torch.rand(6, 1, 8, 8)
    want_out, want_feat = _reference(teachers, layers, images)
    runner = TeacherRunner(teachers, layers, batch="on", channels_last="off")
    for _ in range(2):  # the checked first batch, then the plain vmapped path
        got_out, got_feat = runner(images)
        _assert_close(got_out, want_out)
        _assert_close(got_feat, want_feat)
    assert runner.describe() == {"batched_groups": [["a", "b", "d"]], "channels_last": []}
    assert list(got_out[1]) == ["b"]  # each teacher keeps its own task names
    assert got_feat[0]["head:in"].shape == (6, 16)


def test_groups_need_identical_networks_and_layers():
    a, b = _teacher("a"), _teacher("b", seed=1)
    assert group_key(a, LAYERS) == group_key(b, LAYERS)
    assert group_key(a, LAYERS) != group_key(b, ["block1"])
    assert group_key(a, LAYERS) != group_key(_teacher("w", width=6), LAYERS)
    assert group_key(a, LAYERS) != group_key(_teacher("k", classes="0123"), LAYERS)


def test_auto_follows_the_measurements_on_cpu():
    teachers = [_teacher("a"), _teacher("b", seed=1)]
    runner = TeacherRunner(teachers, [[], []])
    runner(torch.rand(2, 1, 8, 8))
    # CPU: vmapped groups measured slower (off), channels-last faster (on)
    assert runner.describe() == {"batched_groups": [], "channels_last": ["a", "b"]}


def test_channels_last_gives_the_same_contiguous_results():
    teachers = [_teacher("a"), _teacher("b", arch="small-vgg", seed=1)]
    layers = [LAYERS, ["block1"]]
    images = torch.rand(5, 1, 8, 8)
    want = _reference([_teacher("a"), _teacher("b", arch="small-vgg", seed=1)], layers, images)
    got = TeacherRunner(teachers, layers, batch="off", channels_last="on")(images)
    _assert_close(got[0], want[0])
    _assert_close(got[1], want[1])
    assert all(v.is_contiguous() for d in (*got[0], *got[1]) for v in d.values())


class _DataDependent(nn.Module):
    """A KamalModel look-alike whose forward branches on a value: vmap cannot run it."""

    architecture = "data-dependent"
    architecture_kwargs: dict = {}
    input_spec = InputSpec(1, (8, 8))

    def __init__(self, name: str, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tasks = [ClassificationTask(name, ["x", "y"])]
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))

    @property
    def features(self) -> nn.Module:
        return self.net

    def forward(self, images):
        out = self.net(images)
        return {self.tasks[0].name: out * 2 if float(out.sum()) > 0 else out}


def test_unvmappable_architecture_falls_back_once_and_logged(caplog):
    teachers = [Teacher("p", _DataDependent("p", 0)), Teacher("q", _DataDependent("q", 1))]
    images = torch.rand(4, 1, 8, 8)
    want = _reference(teachers, [[], []], images)
    runner = TeacherRunner(teachers, [[], []], batch="on", channels_last="off")
    with caplog.at_level(logging.WARNING, logger="kamal.teachers"):
        for _ in range(3):
            got = runner(images)
            _assert_close(got[0], want[0])
    warnings = [r for r in caplog.records if "cannot run as one batched call" in r.message]
    assert len(warnings) == 1 and "p, q" in warnings[0].getMessage()
    assert runner.describe()["batched_groups"] == []


@pytest.mark.parametrize(("given", "expected"), [(True, "on"), (False, "off"), ("auto", "auto")])
def test_yaml_on_off_are_accepted(given, expected):
    cfg = AmalgamationTrainConfig(batch_teachers=given, teacher_channels_last=given)
    assert (cfg.batch_teachers, cfg.teacher_channels_last) == (expected, expected)


def test_channels_last_leaves_the_teacher_itself_alone():
    teacher = _teacher("a")
    TeacherRunner([teacher], [[]], batch="off", channels_last="on")(torch.rand(2, 1, 8, 8))
    conv = teacher.model.net.block2[0].weight
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("switch", ["on", "off"])
def test_the_run_config_chooses_how_teachers_run(tmp_path, tiny_teachers, switch):
    from kamal.run import amalgamate
    from kamal.testing import write_run_config

    config = write_run_config(tmp_path / "kd.yaml", tiny_teachers, {"name": "kd"}, epochs=1)
    report = amalgamate(config, tmp_path / "run", progress=False,
                        overrides=[f"train.batch_teachers={switch}", "train.teacher_channels_last=off",
                                   "train.teacher_cache=off"])  # a cache runs one at a time
    groups = report["teacher_execution"]["batched_groups"]
    assert [len(g) for g in groups] == ([2] if switch == "on" else [])
