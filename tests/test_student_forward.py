"""train.compile and train.student_channels_last: the student trains alike, resumes
bit-exactly, and where compiling cannot work the log says why and the run goes on."""

from __future__ import annotations

import logging

import pytest
import torch

from kamal import Interrupted, load_model
from kamal.run import amalgamate
from kamal.student_forward import StudentForward
from kamal.testing import write_run_config


def _weights(folder):
    return load_model(folder).state_dict()


def test_a_channels_last_student_trains_alike_and_resumes_bit_exact(tmp_path, tiny_teachers):
    config = write_run_config(tmp_path / "kd.yaml", tiny_teachers,
                              {"name": "kd", "merge": "standardize"}, epochs=2)
    plain = amalgamate(config, tmp_path / "plain", progress=False)
    flag = ["train.student_channels_last=true"]
    full = amalgamate(config, tmp_path / "full", progress=False, overrides=flag)
    assert full["student_execution"] == {"compiled": False, "channels_last": True}
    with pytest.raises(Interrupted):
        amalgamate(config, tmp_path / "cut", progress=False, interrupt_after_steps=5,
                   overrides=flag)
    amalgamate(config, tmp_path / "cut", progress=False, resume=True, overrides=flag)
    resumed, straight = _weights(tmp_path / "cut" / "student"), _weights(tmp_path / "full" / "student")
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
    top1 = [r["student"]["metrics"]["digits"]["top1"] for r in (plain, full)]
    assert abs(top1[0] - top1[1]) <= 0.02, top1  # other summation order, same training


@pytest.mark.slow
def test_a_compiled_student_trains_alike(tmp_path, tiny_teachers):
    config = write_run_config(tmp_path / "kd.yaml", tiny_teachers,
                              {"name": "kd", "merge": "standardize"}, epochs=2)
    eager = amalgamate(config, tmp_path / "eager", progress=False)
    compiled = amalgamate(config, tmp_path / "compiled", progress=False,
                          overrides=["train.compile=true"])
    assert compiled["student_execution"]["compiled"] is True
    top1 = [r["student"]["metrics"]["digits"]["top1"] for r in (eager, compiled)]
    assert abs(top1[0] - top1[1]) <= 0.02, top1
    # the saved student is the plain network (no torch.compile wrapper in its keys)
    assert set(_weights(tmp_path / "compiled" / "student")) == set(_weights(tmp_path / "eager" / "student"))


def test_where_compiling_cannot_work_the_student_runs_eagerly_and_the_log_says_why(
        monkeypatch, caplog):
    student = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten())
    images = torch.rand(2, 1, 5, 5)
    with caplog.at_level(logging.WARNING, logger="kamal.student_forward"):
        tapped = StudentForward(student, compile=True, tapped=True)
        torch.testing.assert_close(tapped(images), student(images))
        assert not tapped.compiled and "taps student layers" in caplog.text
        monkeypatch.setenv("PATH", "")
        monkeypatch.delenv("CXX", raising=False)
        caplog.clear()
        bare = StudentForward(student, compile=True)
        torch.testing.assert_close(bare(images), student(images))
        assert not bare.compiled and "needs a C++ compiler" in caplog.text
        bare(images)
    assert caplog.text.count("runs eagerly") == 1  # said once
