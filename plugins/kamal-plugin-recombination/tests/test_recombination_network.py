"""Combine is exact, pruning reaches its budget, the student round-trips as a model repo."""

from __future__ import annotations

import pytest
import torch
from kamal_plugin_recombination.combine import combine
from kamal_plugin_recombination.pruning import channel_floors, count_parameters, prune_to
from torch import nn

from kamal import ClassificationTask, InputSpec, KamalError, KamalModel, Teacher, load_model, save_model_repo

GRAY = InputSpec(1, (16, 16), (0.5,), (0.5,))
RGB = InputSpec(3, (8, 8), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def make_teacher(arch: str, classes: list[str], name: str, spec: InputSpec = GRAY,
                 seed: int = 0, **kwargs) -> Teacher:
    """A randomly initialised teacher with non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    model = KamalModel(arch, [ClassificationTask(name, classes)], spec, kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return Teacher(name, model, {"path": f"memory:{name}"})


def assert_exact(student: KamalModel, teachers: list[Teacher], spec: InputSpec) -> None:
    student.eval()
    x = torch.rand(4, spec.channels, *spec.size)
    merged = student.tasks[0]
    with torch.no_grad():
        out = student(x)[merged.name]
    for teacher in teachers:
        task = teacher.tasks[0]
        expected = teacher(x)[task.name]
        got = out[:, merged.positions(task)]
        assert (got - expected).abs().max() < 1e-5, teacher.name


@pytest.mark.parametrize("arch, kwargs", [("small-cnn", {"width": 8}),
                                          ("small-vgg", {"width": 8})])
def test_combine_is_exact_for_small_cnns(arch: str, kwargs: dict) -> None:
    teachers = [make_teacher(arch, ["a", "b", "c"], "abc", seed=1, **kwargs),
                make_teacher(arch, ["d", "e", "f", "g"], "defg", seed=2, **kwargs)]
    student = combine(teachers, {"classification": "all"})
    assert student.architecture == "recombined"
    assert student.tasks[0].classes == list("abcdefg")
    assert_exact(student, teachers, GRAY)
    # the teachers' weights, with their two heads replaced by one merged 7-class head
    heads = sum(32 * n + n for n in (3, 4))
    merged_head = 2 * (32 * 7 + 7)
    assert count_parameters(student) == sum(t.num_parameters() for t in teachers) - heads + merged_head


@pytest.fixture(scope="module")
def resnet_teachers() -> list[Teacher]:
    """Two ResNet-18 teachers (3x3 stem for tiny inputs) with 2 and 5 classes."""
    return [make_teacher("resnet18", ["cat", "dog"], "pets", RGB, seed=3, small_input=True),
            make_teacher("resnet18", ["car", "bus", "van", "tram", "bike"], "vehicles", RGB,
                         seed=4, small_input=True)]


def test_combine_is_exact_for_resnet18_with_different_class_counts(resnet_teachers) -> None:
    student = combine(resnet_teachers)
    assert student.tasks[0].num_outputs == 7
    assert_exact(student, resnet_teachers, RGB)


def test_shared_classes_get_the_mean_and_each_branch_keeps_its_normalisation() -> None:
    other = InputSpec(1, (16, 16), (0.1,), (0.3,))
    teachers = [make_teacher("small-cnn", ["0", "1", "2"], "low", seed=5, width=4),
                make_teacher("small-cnn", ["2", "3"], "high", other, seed=6, width=4)]
    student = combine(teachers, {"classification": "digits"}).eval()
    assert student.input_spec.mean == (0.0,)  # each branch normalises for its teacher
    x = torch.rand(3, 1, 16, 16)
    out = student(x)["digits"]
    low, high = teachers[0](x)["low"], teachers[1](x)["high"]
    assert (out[:, :2] - low[:, :2]).abs().max() < 1e-5
    assert (out[:, 3] - high[:, 1]).abs().max() < 1e-5
    assert (out[:, 2] - (low[:, 2] + high[:, 0]) / 2).abs().max() < 1e-5


def test_teachers_of_different_architectures_are_refused_with_a_pointer_to_cfl() -> None:
    teachers = [make_teacher("small-cnn", ["0"], "a", width=4),
                make_teacher("small-vgg", ["1"], "b", width=4)]
    with pytest.raises(KamalError, match="cfl") as info:
        combine(teachers)
    assert "small-vgg" in str(info.value) and "share one architecture" in str(info.value)


def _combined(width: int = 8) -> tuple[KamalModel, list[Teacher]]:
    teachers = [make_teacher("small-cnn", list("01234"), "low", seed=7, width=width),
                make_teacher("small-cnn", list("56789"), "high", seed=8, width=width)]
    return combine(teachers, {"classification": "digits"}), teachers


@pytest.mark.parametrize("importance", ["l2", "random"])
def test_pruning_reaches_the_budget_and_the_repo_round_trips(tmp_path, importance: str) -> None:
    student, teachers = _combined()
    before = count_parameters(student)
    target = before // 2
    net = student.net
    after = prune_to(net, target, torch.rand(1, 1, 16, 16), importance=importance,
                     floors=channel_floors(net, 0.1))
    assert after == count_parameters(student)
    assert 0.95 * target <= after <= target
    student.architecture_kwargs = net.architecture_kwargs()
    assert student.architecture_kwargs["widths"]  # pruned widths are recorded as data
    student.eval()
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        out = student(x)["digits"]
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    save_model_repo(student, tmp_path / "repo")
    reloaded = load_model(tmp_path / "repo").eval()
    assert reloaded.architecture_kwargs == student.architecture_kwargs
    assert count_parameters(reloaded) == after
    with torch.no_grad():
        assert torch.equal(reloaded(x)["digits"], out)


def test_l2_pruning_keeps_more_of_the_teachers_than_random_pruning() -> None:
    x = torch.rand(64, 1, 16, 16)
    agreement = {}
    for importance in ("l2", "random"):
        student, teachers = _combined(width=16)
        reference = torch.cat([teachers[0](x)["low"], teachers[1](x)["high"]], 1).argmax(1)
        prune_to(student.net, int(0.8 * count_parameters(student)), x[:1],
                 importance=importance, floors=channel_floors(student.net, 0.1))
        with torch.no_grad():
            predicted = student.eval()(x)["digits"].argmax(1)
        agreement[importance] = float((predicted == reference).float().mean())
    assert agreement["l2"] >= agreement["random"]


def test_residual_networks_prune_consistently(resnet_teachers) -> None:
    student = combine(resnet_teachers)
    net = student.net
    target = int(0.97 * count_parameters(student))
    prune_to(net, target, torch.rand(1, 3, 8, 8), floors=channel_floors(net, 0.1))
    kwargs = net.architecture_kwargs()
    # a residual stage has one width: layers adding into the same stream shrink together
    widths = kwargs["widths"]
    for b in range(2):
        stem = widths.get(f"branches.{b}.conv1", [3, 64])[1]
        assert widths.get(f"branches.{b}.layer1.1.conv2", [64, 64])[1] == stem
        stage4 = widths.get(f"branches.{b}.layer4.0.downsample.0", [256, 512])[1]
        assert widths.get(f"branches.{b}.layer4.1.conv2", [512, 512])[1] == stage4
        assert widths.get(f"head.pieces.{b}", [512, 7])[0] == stage4
    rebuilt = KamalModel("recombined", student.tasks, student.input_spec, kwargs)
    rebuilt.load_state_dict(student.state_dict(), strict=True)
    x, task = torch.rand(2, 3, 8, 8), student.tasks[0].name
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x)[task], student.eval()(x)[task])


def test_unpruned_student_records_no_widths() -> None:
    student, _ = _combined(width=4)
    kwargs = student.net.architecture_kwargs()
    # each branch is built as its teacher was: its options and its own head width
    assert kwargs == {"base": "small-cnn",
                      "branches": [{"base_kwargs": {"width": 4}, "num_outputs": 5}] * 2,
                      "widths": {}}
