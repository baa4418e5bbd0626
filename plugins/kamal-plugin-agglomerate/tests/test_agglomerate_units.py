"""Unit tests of kamal-plugin-agglomerate: balancing, adaptors, head transplant, config
errors (fast; real kamal teachers built here, no files)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kamal_plugin_agglomerate.adaptor import Adaptor, as_map, summary_of, token_grid
from kamal_plugin_agglomerate.algorithm import AgglomerateAmalgamator
from kamal_plugin_agglomerate.balance import FeatureNormalizer, hadamard
from kamal_plugin_agglomerate.config import AgglomerateConfig

from kamal import (
    ClassificationTask,
    ConfigError,
    DepthTask,
    InputSpec,
    KamalModel,
    SegmentationTask,
    StudentSpec,
    Teacher,
    build_batch,
    get_registry,
    load_teacher,
)

SPEC = InputSpec(3, (16, 16), (0.5,), (0.25,))
SCENES = Path(__file__).resolve().parents[3] / "examples" / "scenes" / "teachers"
needs_scenes = pytest.mark.skipif(not SCENES.exists(), reason="needs examples/scenes/teachers")


def _teacher(name: str, model: KamalModel) -> Teacher:
    return Teacher(name, model.eval(), {"path": name})


def _segnet_teacher(name: str, task, seed: int) -> Teacher:
    torch.manual_seed(seed)
    return _teacher(name, KamalModel("segnet", [task], SPEC, {"width": 4}))


def _classifier(seed: int = 2, size: int = 16) -> Teacher:
    torch.manual_seed(seed)
    spec = InputSpec(3, (size, size), (0.5,), (0.25,))
    return _teacher("shapes", KamalModel("small-cnn", [ClassificationTask("shape", ["a", "b", "c"])],
                                         spec, {"width": 8}))


def _teachers() -> list[Teacher]:
    return [_segnet_teacher("seg", SegmentationTask("parse", ["x", "y", "z"]), 0),
            _segnet_teacher("depth", DepthTask("depth"), 1), _classifier()]


def _algorithm(teachers, architecture="segnet", kwargs=None, **options) -> AgglomerateAmalgamator:
    config = AgglomerateConfig(adaptor_hidden=16, **options)
    spec = StudentSpec(architecture, kwargs or {"width": 4}, {}, SPEC)
    return AgglomerateAmalgamator(config, teachers, spec)


# --- balancing --------------------------------------------------------------------------


def test_hadamard_is_orthonormal_and_refuses_other_sizes():
    h = hadamard(8)
    assert torch.allclose(h @ h.T, torch.eye(8, dtype=h.dtype))
    assert torch.allclose(h.abs(), torch.full_like(h, 8 ** -0.5))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(6)


@pytest.mark.parametrize("balance", ["none", "standardize", "phi-s"])
@pytest.mark.parametrize("channels", [6, 8])
def test_round_trip_is_exact(balance, channels):
    torch.manual_seed(0)
    mixing = torch.randn(channels, channels) * torch.logspace(-2, 2, channels)
    features = 30 + torch.randn(500, channels) @ mixing
    norm = FeatureNormalizer(channels, balance)
    norm.fit(features)
    back = norm.inverse(norm(features))
    error = (back - features).norm() / features.norm()
    assert error < 1e-5, f"{balance}: relative error {error:.2e}"


def test_phi_s_gives_every_channel_unit_variance_and_pads_to_a_power_of_two():
    torch.manual_seed(0)
    features = torch.randn(4000, 6) * torch.tensor([100.0, 10, 1, 0.1, 5, 50]) + 7
    norm = FeatureNormalizer(6, "phi-s")
    norm.fit(features)
    out = norm(features)
    assert out.shape == (4000, 8)
    assert out.mean(0).abs().max() < 1e-3
    assert (out.var(0) - 1).abs().max() < 0.05, out.var(0)   # even spread, unlike standardize
    # a rotation up to one scale: distances keep their ratios
    d_in = (features[0] - features[1]).norm() / (features[2] - features[3]).norm()
    d_out = (out[0] - out[1]).norm() / (out[2] - out[3]).norm()
    assert torch.isclose(d_in, d_out, rtol=1e-4)


# --- adaptors and geometry ---------------------------------------------------------------


def test_adaptor_maps_vectors_and_maps():
    adaptor = Adaptor(12, 32, hidden=16, depth=2)
    assert adaptor(torch.randn(4, 12)).shape == (4, 32)
    assert adaptor(torch.randn(4, 12, 5, 7)).shape == (4, 32, 5, 7)


def test_vit_tokens_fold_into_their_grid():
    tokens = torch.randn(2, 1 + 4 * 6, 10)   # a class token and a 4x6 grid
    assert token_grid(25, (16, 24), patch=4) == (1, 4, 6)
    grid = as_map(tokens, (16, 24), patch=4)
    assert grid.shape == (2, 10, 4, 6)
    assert torch.equal(grid[:, :, 0, 1], tokens[:, 2])       # row-major after the class token
    assert torch.equal(summary_of(tokens, (16, 24), patch=4), tokens[:, 0])
    assert summary_of(torch.randn(2, 10, 3, 3), (12, 12)).shape == (2, 10)


def test_cnn_student_adaptor_shapes():
    teachers = _teachers()
    algo = _algorithm(teachers, backbone="dec3", summary_layer="enc4")
    student = algo.build_student()
    net = student.features
    assert [t["kind"] for t in net.targets] == ["spatial", "spatial", "summary"]
    predictions = net.predictions(torch.rand(2, 3, 16, 16))
    # segnet width 4: dec3 has 4 channels (padded: 4); small-cnn width 8 pools 32
    assert [tuple(p.shape) for p in predictions] == [(2, 4, 16, 16), (2, 4, 16, 16), (2, 32)]
    assert {t.name for t in student.tasks} == {"parse", "depth", "shape"}


def test_vit_student_adaptor_shapes():
    pytest.importorskip("timm")
    teachers = _teachers()
    vit = {"model_name": "vit_tiny_patch16_224",
           "model_args": {"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": 2,
                          "num_heads": 2, "dynamic_img_size": True}}
    algo = _algorithm(teachers, "timm", vit, backbone="model.blocks", student_sizes=[12, 16, 20])
    student = algo.build_student()
    predictions = student.features.predictions(torch.rand(2, 3, 16, 16))
    # 4x4 patch grid of 24 channels; the class token feeds the summary
    assert [tuple(p.shape) for p in predictions] == [(2, 4, 4, 4), (2, 4, 4, 4), (2, 32)]
    out = student(torch.rand(2, 3, 20, 20))
    assert out["parse"].shape == (2, 3, 20, 20) and out["shape"].shape == (2, 3)


# --- head transplant ----------------------------------------------------------------------


def test_transplanted_heads_reproduce_the_teachers_exactly():
    teachers = _teachers()
    algo = _algorithm(teachers, backbone="dec3", summary_layer="enc4")
    student = algo.build_student().eval()
    images = torch.rand(6, 3, 16, 16)
    algo.setup(student, [images[:3], images[3:]])
    net = student.features
    # the constructed case: adapted features equal to the teachers' (balanced) features
    targets = [algo._normalised(k, t) for k, t in enumerate(algo._teacher_targets(images))]
    outputs = net.head_outputs(targets, (16, 16))
    for teacher in teachers:
        with torch.no_grad():
            expected = teacher(images)
        for task, value in expected.items():
            assert torch.allclose(outputs[task], value, rtol=1e-4, atol=1e-4), task
    # the heads are the teachers' own weights, frozen
    head = net.heads[[h["task"] for h in net.head_configs].index("shape")]
    assert torch.equal(head.weight, teachers[2].model.net.head.weight)
    assert not any(p.requires_grad for p in head.parameters())


def test_a_head_that_reads_other_layers_keeps_features_only():
    teachers = _teachers()
    with pytest.warns(UserWarning, match="'seg' keeps no head"):
        algo = _algorithm(teachers, backbone="dec3",
                          teacher_layers=[{"spatial": "enc4"}, {"spatial": "dec3"},
                                          {"summary": "head:in"}])
        student = algo.build_student()
    assert "parse" not in {t.name for t in student.tasks}
    assert "seg" in algo.head_reasons


# --- losses and balancing in a step ---------------------------------------------------------


def test_losses_are_finite_and_decrease():
    torch.manual_seed(0)
    algo = _algorithm(_teachers(), backbone="dec3", summary_layer="enc4")
    student = algo.build_student()
    images = torch.rand(16, 3, 16, 16)
    algo.setup(student, [images])
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    first = last = None
    for _ in range(30):
        losses = algo.losses(build_batch(algo, images))
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        first = total.item() if first is None else first
        last = total.item()
    assert set(losses) == {"seg/spatial", "depth/spatial", "shapes/summary", "seg/output",
                           "depth/output", "shapes/output"}
    assert last < 0.7 * first, (first, last)


def _scaled(teacher: Teacher, factor: float) -> Teacher:
    """The same function with its dec3 features ``factor`` x larger (BN scaled, head undone)."""
    net = teacher.model.net
    bn = net.dec3.convs[-2]
    with torch.no_grad():
        bn.weight.mul_(factor)
        bn.bias.mul_(factor)
        for head in net.heads.values():
            head.conv.weight.div_(factor)
    return teacher


@needs_scenes
@pytest.mark.parametrize("balance", ["none", "standardize", "phi-s"])
def test_balancing_evens_the_gradient_shares(balance):
    # the shipped scenes teachers (trained), the depth one with 100x larger features
    teachers = [load_teacher(name, SCENES / name) for name in ("scenes-segmentation",
                                                               "scenes-depth")]
    images = get_registry().get("datasets", "scenes")(split="transfer", size=32, count=64).images
    images = images.float() / 255
    with torch.no_grad():
        before = teachers[1](images)["scenes-depth"]
        _scaled(teachers[1], 100.0)
        assert torch.allclose(teachers[1](images)["scenes-depth"], before, rtol=1e-3)
    torch.manual_seed(0)
    algo = AgglomerateAmalgamator(
        AgglomerateConfig(adaptor_hidden=32, balance=balance, spatial_cosine=0,
                          spatial_smooth_l1=0, spatial_mse=1),
        teachers, StudentSpec("segnet", {"width": 8}, {}, None))
    algo.setup(algo.build_student(), [images])
    shares = algo.shares["start"]
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    if balance == "none":  # under a squared error the 100x teacher owns the gradient
        assert shares["scenes-depth"] > 0.9, shares
    else:
        assert all(0.25 <= s <= 0.75 for s in shares.values()), shares


# --- bad input ------------------------------------------------------------------------------


def test_unknown_layer_lists_the_nearest_names():
    algo = _algorithm(_teachers(), backbone="dec3",
                      teacher_layers=[{"spatial": "dec33"}, {"spatial": "dec3"},
                                      {"summary": "head:in"}])
    with pytest.raises(Exception, match="no layer 'dec33'; nearest names: dec3"):
        algo.build_student()


def test_a_teacher_without_a_tappable_layer_is_refused():
    class Bare(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    model = KamalModel("small-cnn", [ClassificationTask("t", ["a", "b"])], SPEC, {"width": 4})
    model.head_layer, model.feature_layers = None, []
    with pytest.raises(ConfigError, match="no tappable feature layer"):
        _algorithm([_teacher("bare", model)])


def test_sizes_not_divisible_by_the_vit_patch_are_refused():
    pytest.importorskip("timm")
    vit = {"model_name": "vit_tiny_patch16_224",
           "model_args": {"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": 1,
                          "num_heads": 2, "dynamic_img_size": True}}
    algo = _algorithm(_teachers(), "timm", vit, backbone="model.blocks", student_sizes=[16, 18])
    with pytest.raises(ConfigError, match=r"student_sizes: \[18\] not divisible by the "
                                          "student's ViT patch size 4"):
        algo.build_student()


def test_a_size_the_cnn_cannot_read_is_named():
    algo = _algorithm(_teachers(), backbone="dec3", summary_layer="enc4", student_sizes=[16, 12])
    with pytest.raises(ConfigError, match="cannot read 12x12 images"):
        algo.setup(algo.build_student(), [torch.rand(4, 3, 16, 16)])
