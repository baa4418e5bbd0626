"""Tests of kamal-plugin-layerwise: blocks, losses, schedules, the mismatch error, discovery.

Uses the shipped digits teachers (small-cnn and small-vgg, width 16, 16x16 inputs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kamal_plugin_layerwise.algorithm import LayerwiseAmalgamator, LayerwiseConfig
from kamal_plugin_layerwise.blocks import AmalBlock

import kamal
from kamal import Batch, KamalError, StudentSpec, build_batch

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "digits" / "layerwise.yaml"
TEACHERS = ROOT / "examples" / "digits" / "teachers"
STUDENT = StudentSpec("small-cnn", {"width": 8}, {"classification": "digits"})


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions gain nothing from threads, and on a busy CI machine intra-op threads
    spin against each other: this file measured 20 s of CPU with one thread, 100 s with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _teacher(name: str) -> kamal.Teacher:
    return kamal.load_teacher(name, TEACHERS / name, {"path": str(TEACHERS / name)})


@pytest.fixture(scope="module")
def cnn_teachers() -> list[kamal.Teacher]:
    return [_teacher("digits-0-4"), _teacher("digits-5-9-cnn")]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    data = kamal.get_registry().get("datasets", "digits")("transfer", size=16)
    return torch.stack([data[i][0] for i in range(64)])


def _amalgamator(teachers, images, **config) -> LayerwiseAmalgamator:
    torch.manual_seed(0)
    algo = LayerwiseAmalgamator(LayerwiseConfig(**config), teachers, STUDENT)
    algo.setup(algo.build_student(), [images[:32], images[32:]])
    return algo


def _batch(algo: LayerwiseAmalgamator, images: torch.Tensor) -> Batch:
    """What the engine hands to ``losses``: frozen teachers first, then the student."""
    return build_batch(algo, images)


# --- blocks ---------------------------------------------------------------------------


def test_amal_block_shapes():
    block = AmalBlock(8, [4, 6])
    code, adapted, decoded = block(torch.randn(2, 8, 5, 5), [torch.randn(2, 4, 5, 5),
                                                             torch.randn(2, 6, 5, 5)])
    assert code.shape == adapted.shape == (2, 8, 5, 5)
    assert [tuple(d.shape) for d in decoded] == [(2, 4, 5, 5), (2, 6, 5, 5)]


def test_setup_sizes_blocks_from_the_real_feature_maps(cnn_teachers, images):
    algo = _amalgamator(cnn_teachers, images)
    assert algo.layers == ["block1", "block2", "block3"]  # the small-cnn default
    widths = {k: (b.student_channels, b.teacher_channels) for k, b in algo.blocks.items()}
    assert widths == {"block1": (8, [16, 16]), "block2": (16, [32, 32]), "block3": (32, [64, 64])}
    assert algo.describe()["layers"] == algo.layers


# --- losses ---------------------------------------------------------------------------


def test_only_reconstruction_trains_the_encoder_and_decoder(cnn_teachers, images):
    algo = _amalgamator(cnn_teachers, images)
    losses = algo.losses(_batch(algo, images[:16]))
    assert set(losses) == {f"{kind}/block{i}" for kind in ("amal", "recon") for i in (1, 2, 3)} | {
        "kd/digits"}
    block = algo.blocks["block2"]
    coders = [*block.encoder.parameters(), *block.decoder.parameters()]
    amal = torch.autograd.grad(losses["amal/block2"], coders + list(block.adapter.parameters()),
                               allow_unused=True, retain_graph=True)
    assert all(g is None for g in amal[:len(coders)])
    assert all(g is not None for g in amal[len(coders):])
    recon = torch.autograd.grad(losses["recon/block2"], coders + list(algo.student.parameters()),
                                allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in recon[:len(coders)])
    assert all(g is None for g in recon[len(coders):])  # teachers only: the student is untouched


def _train(algo, images, params, steps=15, lr=5e-3) -> tuple[dict, dict]:
    """Adam on ``params`` for ``steps`` steps; the losses before and after."""
    optimizer = torch.optim.Adam(params, lr=lr)
    algo.student.train()
    first = None
    for _ in range(steps):
        losses = algo.losses(_batch(algo, images))
        first = first or {k: v.item() for k, v in losses.items()}
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return first, {k: v.item() for k, v in algo.losses(_batch(algo, images)).items()}


def test_each_loss_decreases(cnn_teachers, images):
    algo = _amalgamator(cnn_teachers, images[:32])
    student = list(algo.student.parameters())
    adapters = [p for b in algo.blocks.values() for p in b.adapter.parameters()]
    coders = [p for b in algo.blocks.values() for p in (*b.encoder.parameters(),
                                                        *b.decoder.parameters())]
    # the encoders first (their code is the amalgamation target), then the student on it
    before, after = _train(algo, images[:32], coders)
    for name in [k for k in before if k.startswith("recon/")]:
        assert after[name] < 0.5 * before[name], (name, before[name], after[name])
    before, after = _train(algo, images[:32], student + adapters)
    for name in [k for k in before if not k.startswith("recon/")]:
        assert after[name] < 0.7 * before[name], (name, before[name], after[name])
    assert after["recon/block1"] == pytest.approx(before["recon/block1"])  # not the student's


# --- the mismatch error ---------------------------------------------------------------


def test_layers_that_do_not_line_up_are_listed(images):
    teachers = [_teacher("digits-0-4"), _teacher("digits-5-9")]  # small-cnn and small-vgg
    algo = LayerwiseAmalgamator(
        LayerwiseConfig(layers=["block1", "block2.0", "block2.3", "pool"]), teachers, STUDENT)
    with pytest.raises(KamalError) as info:
        algo.setup(algo.build_student(), [images])
    message = str(info.value)
    # small-vgg's first conv of block2 keeps 16x16, small-cnn's has stride 2
    assert "block2.0: student 16x8x8, digits-0-4 32x8x8, digits-5-9 32x16x16" in message
    assert "block2.3: student missing, digits-0-4 missing, digits-5-9 32x16x16" in message
    assert "pool: student 32, digits-0-4 64, digits-5-9 64" in message
    assert "  block1:" not in message  # block1 lines up (16x16 everywhere)
    assert "algorithm.layers" in message


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError):
        LayerwiseConfig(schedule="greedy")
    for name, field in LayerwiseConfig.model_fields.items():
        assert name == "name" or field.description, f"{name} has no description"


# --- schedules, end to end ------------------------------------------------------------

FAST = ["train.batch_size=64", "train.log_every=1", "data.transfer.augment=false"]


class _SpyTrainer:
    """Wraps the engine's Trainer and records which weights each stage changed."""

    def __init__(self, trainer) -> None:
        self.trainer, self.cfg, self.stages = trainer, trainer.cfg, []

    def _snapshot(self):
        return {f"{m}.{n}": p.detach().clone() for m, module in self.trainer.modules.items()
                for n, p in module.named_parameters()}

    def fit(self, stage="main", epochs=None, parameters=None, lr=None):
        before = self._snapshot()
        self.trainer.fit(stage=stage, epochs=epochs, parameters=parameters, lr=lr)
        after = self._snapshot()
        self.stages.append((stage, {n for n in before if not torch.equal(before[n], after[n])}))


def _parts(names: set[str]) -> set[str]:
    """``student.net.block1.0.weight`` -> ``block1``; ``amal.block2.encoder.bias`` ->
    ``amal.block2.encoder``."""
    return {".".join(n.split(".")[:3]) if n.startswith("amal.")
            else n.removeprefix("student.net.").split(".")[0] for n in names}


def test_progressive_trains_only_the_layers_of_each_stage(tmp_path, monkeypatch):
    spies = []
    original = LayerwiseAmalgamator.amalgamate

    def spying(self, trainer):
        spies.append(_SpyTrainer(trainer))
        original(self, spies[-1])

    monkeypatch.setattr(LayerwiseAmalgamator, "amalgamate", spying)
    kamal.amalgamate(EXAMPLE, tmp_path / "run", progress=False, overrides=FAST + [
        "algorithm.schedule=progressive", "algorithm.layer_epochs=1", "algorithm.head_epochs=1",
        "algorithm.finetune=head", "student.architecture_kwargs.width=8", "data.eval=null"])
    changed = {stage: _parts(names) for stage, names in spies[0].stages}
    # the auto-encoders learn the teachers' codes in every layer stage; the student and its
    # adapters grow one tapped layer at a time; the last stage touches the classifier only
    coders = {f"amal.block{i}.{part}" for i in (1, 2, 3) for part in ("encoder", "decoder")}
    assert changed == {
        "layer:block1": {"block1", "amal.block1.adapter"} | coders,
        "layer:block2": {"block1", "block2", "amal.block1.adapter", "amal.block2.adapter"} | coders,
        "layer:block3": {"block1", "block2", "block3", "amal.block1.adapter",
                         "amal.block2.adapter", "amal.block3.adapter"} | coders,
        "finetune:head": {"head"},
    }
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    epochs = {r["stage"]: {k for k in r if k.startswith("loss/")} for r in logged
              if r.get("event") == "epoch"}
    assert epochs["layer:block1"] == {"loss/amal/block1"} | {
        f"loss/recon/block{i}" for i in (1, 2, 3)}
    assert epochs["finetune:head"] == {"loss/kd/digits"}


def test_joint_run_end_to_end(tmp_path):
    report = kamal.amalgamate(EXAMPLE, tmp_path / "run", progress=False,
                              overrides=FAST + ["train.epochs=3"])
    assert report["algorithm"] == "layerwise"
    assert report["hyperparameters"]["layers"] == ["block1", "block2", "block3"]
    assert report["student"]["metrics"]["digits"]["top1"] > 0.3  # chance is 0.1
    assert (tmp_path / "run" / "student" / "model.safetensors").exists()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    epochs = [r for r in logged if r.get("event") == "epoch"]
    assert {r["stage"] for r in epochs} == {"joint"}
    # (the amalgamation losses chase codes that move while the encoders learn; they fall over
    # longer runs, and test_each_loss_decreases checks them against a settled code)
    for key in ("loss/recon/block1", "loss/recon/block3", "loss/kd/digits"):
        assert epochs[-1][key] < 0.8 * epochs[0][key], key


# --- discovery ------------------------------------------------------------------------


def test_installed_distribution_is_discovered():
    from kamal import plugin_infos

    infos = [i for i in plugin_infos() if i.distribution == "kamal-plugin-layerwise"]
    assert infos, "pip install plugins/kamal-plugin-layerwise first"
    assert infos[0].error is None
    assert "layerwise" in infos[0].provides["amalgamators"]
    assert kamal.get_registry().get("amalgamators", "layerwise") is LayerwiseAmalgamator


# --- the conformance kit --------------------------------------------------------------


def test_conformance_kit(tmp_path):
    """The lead's kit, on the progressive schedule: its interrupted-and-resumed run stops in
    the first of four stages, so it also checks that multi-stage runs resume exactly."""
    from kamal.testing import check_amalgamator

    report = check_amalgamator(LayerwiseAmalgamator, tmp_path,
                               algorithm_options={"schedule": "progressive"})
    assert report["hyperparameters"]["schedule"] == "progressive"
