"""End-to-end tests of kamal-plugin-cfl: a short digits run, and kamal's conformance kit."""

from __future__ import annotations

from pathlib import Path

import pytest
from kamal_plugin_cfl.algorithm import PLOT_NAME, CFLAmalgamator

import kamal

DIGITS = Path(__file__).resolve().parents[3] / "examples" / "digits"


@pytest.mark.slow
@pytest.mark.skipif(not (DIGITS / "cfl.yaml").exists(), reason="needs examples/digits")
def test_short_digits_run_beats_chance_and_plots_tsne(tmp_path):
    out = tmp_path / "run"
    # the example itself (conv block on block3), shortened: 4 epochs at a constant LR
    report = kamal.amalgamate(DIGITS / "cfl.yaml", out, progress=False, overrides=[
        "train.epochs=4", "train.optimizer.lr=0.005", "train.scheduler=none",
        "train.device=cpu", "algorithm.tsne_samples=120", "train.loggers=[tensorboard]"])
    assert report["algorithm"] == "cfl"
    top1 = report["student"]["metrics"]["digits"]["top1"]
    assert top1 > 0.3, f"10 classes, chance is 0.1; got {top1}"  # measured 0.52
    png = (out / PLOT_NAME).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # the same figure reaches the run's trackers (Trainer.log_figure): read back from TensorBoard
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = events.Images("cfl/tsne")
    assert len(logged) == 1 and logged[0].encoded_image_string.startswith(b"\x89PNG")
    assert logged[0].step == events.Scalars("epoch/loss/kd/digits")[-1].step  # after training
    assert (out / "student" / "config.json").exists()


@pytest.mark.slow
def test_conformance_kit(tmp_path):
    testing = pytest.importorskip("kamal.testing")
    # the gradient cap's scale, kept between measurements, must survive the kit's resume
    report = testing.check_amalgamator(CFLAmalgamator, tmp_path, same_architecture=False,
                                       algorithm_options={"tsne_samples": 0,
                                                          "feature_grad_every": 3})
    assert report["algorithm"] == "cfl"
