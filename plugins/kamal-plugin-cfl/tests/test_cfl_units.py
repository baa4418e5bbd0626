"""Unit tests of kamal-plugin-cfl: blocks, losses, config errors, plugin discovery (fast)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import torch
from kamal_plugin_cfl.algorithm import CFLAmalgamator
from kamal_plugin_cfl.blocks import ConvBlock, FCBlock, build_block
from kamal_plugin_cfl.config import CFLConfig
from kamal_plugin_cfl.losses import mmd_rbf, mmd_rbf_to_each

import kamal
from kamal import Batch, StudentSpec, build_batch, get_registry, load_teacher, plugin_infos

DIGITS = Path(__file__).resolve().parents[3] / "examples" / "digits"
needs_examples = pytest.mark.skipif(not (DIGITS / "cfl.yaml").exists(),
                                    reason="needs the kamal repository's examples/digits")


# --- blocks ---------------------------------------------------------------------------


def test_fc_block_shapes():
    block = build_block((4, 96), [(4, 64), (4, 32)], hidden=16)
    assert isinstance(block, FCBlock)
    out = block(torch.randn(4, 96), [torch.randn(4, 64), torch.randn(4, 32)])
    assert out.student.shape == (4, 16)
    assert [h.shape for h in out.teachers] == [(4, 16), (4, 16)]
    assert [r.shape for r in out.reconstructions] == [(4, 64), (4, 32)]
    assert [t.shape for t in out.targets] == [(4, 64), (4, 32)]


def test_conv_block_shapes_and_resizing():
    # teachers with other widths and strides than the student: resized to the student's 4x4
    block = build_block((4, 24, 4, 4), [(4, 32, 8, 8), (4, 16, 2, 2)], hidden=8)
    assert isinstance(block, ConvBlock)
    out = block(torch.randn(4, 24, 4, 4), [torch.randn(4, 32, 8, 8), torch.randn(4, 16, 2, 2)])
    assert out.student.shape == (4, 8, 4, 4)
    assert [h.shape for h in out.teachers] == [(4, 8, 4, 4)] * 2
    assert [r.shape for r in out.reconstructions] == [(4, 32, 4, 4), (4, 16, 4, 4)]
    assert [r.shape for r in out.reconstructions] == [t.shape for t in out.targets]


def test_mixed_maps_and_vectors_use_the_fc_block():
    block = build_block((4, 24, 4, 4), [(4, 64)], hidden=8)
    assert isinstance(block, FCBlock)
    assert block(torch.randn(4, 24, 4, 4), [torch.randn(4, 64)]).student.shape == (4, 8)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        build_block((4, 24, 4), [(4, 64)], hidden=8)


def test_feature_standardisation_rescales_targets():
    block = build_block((64, 8), [(64, 5)], hidden=4)
    teacher = 50 + 20 * torch.randn(64, 5)
    block.calibrate([block.prepare(teacher)])
    target = block(torch.randn(64, 8), [teacher]).targets[0]
    assert target.mean().abs() < 1e-3 and (target.std(0) - 1).abs().max() < 1e-2


# --- losses ---------------------------------------------------------------------------


def test_mmd_is_zero_for_equal_samples_and_grows_with_shift():
    x = torch.randn(16, 8)
    sigmas = [0.1, 1.0]
    assert float(mmd_rbf(x, x, sigmas)) == pytest.approx(0.0, abs=1e-6)
    near, far = mmd_rbf(x, x + 0.1, sigmas, normalize=False), mmd_rbf(x, x + 3, sigmas,
                                                                      normalize=False)
    assert 0 < float(near) < float(far) <= 2.0
    # 'sum' adds the kernels: KamalEngine's scale, number-of-kernels times larger
    assert float(mmd_rbf(x, x + 3, sigmas, False, "sum")) == pytest.approx(2 * float(far))


def test_mmd_to_each_equals_the_estimator_pair_by_pair():
    """The one-matrix form against the definition: mean(Kxx) + mean(Kyy) - 2 mean(Kxy),
    kernel by kernel, for samples of unequal sizes."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 2, 2, generator=generator, dtype=torch.float64)
    ys = [torch.randn(n, 3, 2, 2, generator=generator, dtype=torch.float64) + shift
          for n, shift in ((12, 0.0), (7, 0.5), (20, 2.0))]
    sigmas = [0.05, 0.5, 2.0]

    def reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = (torch.nn.functional.normalize(v.flatten(1), dim=1) for v in (a, b))
        kernel = [lambda u, v, s=s: torch.exp(-torch.cdist(u, v) ** 2 / (2 * s * s)).mean()
                  for s in sigmas]
        return sum(k(a, a) + k(b, b) - 2 * k(a, b) for k in kernel) / len(sigmas)

    each = mmd_rbf_to_each(x, ys, sigmas)
    expected = torch.stack([reference(x, y) for y in ys])
    assert torch.allclose(each, expected, atol=1e-10)
    assert torch.allclose(mmd_rbf(x, ys[2], sigmas, kernel_reduction="sum"),
                          expected[2] * len(sigmas), atol=1e-10)
    assert 0 < each[0] < each[1] < each[2]  # farther samples, larger MMD


def _digits_batch(n: int) -> torch.Tensor:
    dataset = get_registry().get("datasets", "digits")(split="transfer", size=16)
    return torch.stack([dataset[i][0] for i in range(n)])


def _teachers() -> list[kamal.Teacher]:
    return [load_teacher(name, DIGITS / "teachers" / name) for name in ("digits-0-4", "digits-5-9")]


def _amalgamator(images: torch.Tensor, width: int = 24, **options) -> CFLAmalgamator:
    teachers = _teachers()
    algo = CFLAmalgamator(CFLConfig(tsne_samples=0, **options), teachers,
                          StudentSpec("small-cnn", {"width": width}, {"classification": "digits"}))
    algo.setup(algo.build_student(), [images[:32], images[32:]])
    return algo


def _batch(algo: CFLAmalgamator, images: torch.Tensor) -> Batch:
    """What the engine hands to ``losses``: frozen teachers first, then the student."""
    return build_batch(algo, images)


@needs_examples
@pytest.mark.parametrize("layer", ["<head>:in", "block3"])
def test_each_loss_is_finite_has_gradients_and_decreases(layer):
    torch.manual_seed(0)
    images = _digits_batch(32)
    # uncapped, so the logged MMD is the MMD itself
    algo = _amalgamator(images, layer=layer, feature_grad_ratio=None)
    assert isinstance(algo.block, FCBlock if layer.endswith(":in") else ConvBlock)
    params = [*algo.student.parameters(), *algo.block.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    history = []
    for step in range(10):
        losses = algo.losses(_batch(algo, images))
        assert set(losses) == {"kd/digits", "mmd", "recon"}
        assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
        if step == 0:  # every term reaches what it trains; the MMD reaches the student
            for name, value in losses.items():
                grads = torch.autograd.grad(value, params, allow_unused=True, retain_graph=True)
                assert any(g is not None and g.abs().sum() > 0 for g in grads), name
            grads = torch.autograd.grad(losses["mmd"], list(algo.student.parameters()),
                                        allow_unused=True, retain_graph=True)
            assert any(g is not None and g.abs().sum() > 0 for g in grads)
        history.append({k: float(v.detach()) for k, v in losses.items()})
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    for name in history[0]:
        assert history[-1][name] < history[0][name], (name, history[0][name], history[-1][name])


@needs_examples
def test_the_mmd_never_pulls_the_student_harder_than_kd():
    torch.manual_seed(0)
    images = _digits_batch(32)
    algo = _amalgamator(images, mmd_weight=1000.0, feature_grad_ratio=0.5)
    batch = _batch(algo, images)
    losses = algo.losses(batch)
    feature = batch.student_features[algo.student_layer]
    g_kd, g_mmd = (torch.autograd.grad(losses[k], feature, retain_graph=True)[0]
                   for k in ("kd/digits", "mmd"))
    assert float(g_mmd.norm()) == pytest.approx(0.5 * float(g_kd.norm()), rel=1e-3)
    uncapped = _amalgamator(images, mmd_weight=1000.0, feature_grad_ratio=None)
    uncapped.block.load_state_dict(algo.block.state_dict())
    uncapped.student.load_state_dict(algo.student.state_dict())
    raw = uncapped.losses(_batch(uncapped, images))["mmd"]
    assert float(raw.detach()) > 10 * float(losses["mmd"].detach())  # the cap did scale it down


@needs_examples
def test_hidden_width_floor_and_paper_setting():
    images = _digits_batch(32)
    # student small-cnn width 24: the classifier reads 96 channels, C/4 = 24
    assert _amalgamator(images).block.hidden == 24
    assert _amalgamator(images, min_hidden=64).block.hidden == 64
    assert _amalgamator(images, width=8).block.hidden == 24  # C/4 = 8: the floor holds
    paper = _amalgamator(images, min_hidden=1, kernel_reduction="sum",
                         standardize_features=False, mmd_weight=10.0, feature_grad_ratio=None)
    assert paper.block.hidden == 24
    assert float(paper.block.scale_teachers[1].std.sum()) == 64.0  # raw features


@needs_examples
def test_naive_merge_sets_up_like_standardize():
    # LogitMerger.calibrate used to return early for 'naive' without reading the images, so
    # cfl saw no transfer images and `--set algorithm.merge=naive` always failed at setup
    images = _digits_batch(40)
    naive = _amalgamator(images, merge="naive")
    standardize = _amalgamator(images)
    assert naive.block.hidden == standardize.block.hidden
    assert torch.equal(naive.kd.merger.confidence_std, torch.ones(2))  # naive measured nothing
    losses = naive.losses(_batch(naive, images[:8]))
    assert all(torch.isfinite(value) for value in losses.values())


@needs_examples
def test_teacher_layers_must_match_the_teachers():
    with pytest.raises(kamal.KamalError, match="teacher_layers has 1 entries for 2 teachers"):
        _amalgamator(_digits_batch(8), teacher_layers=["<head>:in"])


def test_teachers_without_classification_are_refused():
    from types import SimpleNamespace

    depth = SimpleNamespace(name="scenes-depth", tasks=[SimpleNamespace(kind="depth")])
    with pytest.raises(kamal.KamalError, match="teacher 'scenes-depth' has only depth tasks"):
        CFLAmalgamator.check_teachers([depth])


# --- config ---------------------------------------------------------------------------


@needs_examples
@pytest.mark.parametrize(("override", "message"), [
    ("algorithm.sigmas=[0.1, -1]", "algorithm.sigmas: every kernel bandwidth must be > 0"),
    ("algorithm.mmd_weight=-1", "algorithm.mmd_weight: Input should be greater than or equal"),
    ("algorithm.kernel_reduction=median", "algorithm.kernel_reduction: Input should be 'mean'"),
    ("algorithm.mmd_wieght=1", "Did you mean 'mmd_weight'?"),
])
def test_a_wrong_value_is_a_clear_config_error(tmp_path, override, message):
    with pytest.raises(kamal.ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        kamal.amalgamate(DIGITS / "cfl.yaml", tmp_path / "run", overrides=[override],
                         progress=False)
    assert not (tmp_path / "run").exists()


def test_every_hyperparameter_is_documented_with_the_paper_defaults():
    fields = CFLConfig.model_fields
    assert all(f.description for n, f in fields.items() if n != "name")
    config = CFLConfig()
    assert (config.kd_weight, config.recon_weight) == (1.0, 10.0)
    assert config.hidden_ratio == 0.25 and config.sigmas == [0.001, 0.01, 0.05, 0.1, 0.2, 1, 2]


# --- discovery ------------------------------------------------------------------------


def test_plugin_is_installed_and_discovered():
    dist = metadata.distribution("kamal-plugin-cfl")
    points = [ep for ep in dist.entry_points if ep.group == "kamal"]
    assert [(ep.name, ep.value) for ep in points] == [("kamal-plugin-cfl",
                                                       "kamal_plugin_cfl.plugin")]
    info = next(i for i in plugin_infos() if i.distribution == "kamal-plugin-cfl")
    assert info.status == "ok" and info.provides == {"amalgamators": ["cfl"]}
    assert get_registry().get("amalgamators", "cfl") is CFLAmalgamator


@needs_examples
def test_the_cap_measured_every_n_steps_keeps_its_scale_in_between():
    torch.manual_seed(0)
    images = _digits_batch(32)
    algo = _amalgamator(images, mmd_weight=1000.0, feature_grad_ratio=0.5, feature_grad_every=3)
    scales = []
    for step in range(4):
        batch = _batch(algo, images)
        batch.step = step
        if step == 1:  # another student: the gradients move, the kept scale must not
            with torch.no_grad():
                for p in algo.student.parameters():
                    p.mul_(1.5)
        algo.losses(batch)
        scales.append(float(algo.block.mmd_scale))
    assert scales[0] < 1.0 and scales[1] == scales[2] == scales[0]
    assert scales[3] != scales[0]  # measured again at step 3
