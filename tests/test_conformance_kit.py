"""kamal.testing catches broken amalgamators, each with a message naming the broken rule."""

from __future__ import annotations

from typing import Literal

import pytest
from torch import nn

from kamal import InputSpec, KDTermConfig, Student
from kamal.algorithms.kd import KDAmalgamator
from kamal.testing import ConformanceError, check_amalgamator


class _Base(KDAmalgamator):
    """KD, broken in one way by each subclass."""


class NaNLoss(_Base):
    """Returns a NaN loss."""

    name = "nan-loss"

    class Config(KDTermConfig):
        """The KD term's hyperparameters."""

        name: Literal["nan-loss"] = "nan-loss"

    def losses(self, batch):
        return {"kd": super().losses(batch)["kd/digits"] * float("nan")}


class NoGradient(NaNLoss):
    """Computes its loss from the teachers only."""

    name = "no-gradient"

    class Config(NaNLoss.Config):
        """No hyperparameters."""

        name: Literal["no-gradient"] = "no-gradient"

    def losses(self, batch):
        (merged,) = self.kd.merger(batch.teacher_outputs).values()
        return {"entropy": -(merged.softmax(1) * merged.log_softmax(1)).sum(1).mean()}


class _Unsaveable(Student):
    def __init__(self, tasks):
        super().__init__()
        self.tasks, self.input_spec, self.feature_layers = tasks, InputSpec(1, (8, 8)), []
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, tasks[0].num_outputs))

    def forward(self, images):
        return {self.tasks[0].name: self.net(images)}


class UnsaveableStudent(NaNLoss):
    """Builds a student that is not a registered architecture and cannot describe itself."""

    name = "unsaveable"

    class Config(NaNLoss.Config):
        """No hyperparameters."""

        name: Literal["unsaveable"] = "unsaveable"

    def build_student(self):
        return _Unsaveable(super().build_student().tasks)

    def losses(self, batch):
        return KDAmalgamator.losses(self, batch)


class Undocumented(NaNLoss):
    """Has a hyperparameter without a description."""

    name = "undocumented"

    class Config(NaNLoss.Config):
        """Missing a description."""

        name: Literal["undocumented"] = "undocumented"
        secret: int = 3


class ReusesCoreName(UnsaveableStudent):
    """Calls itself 'kd', the core's algorithm."""

    name = "kd"


@pytest.mark.parametrize("cls, message", [
    (ReusesCoreName, "'kd' is a name the kamal core reserves"),
    (NaNLoss, "loss 'kd' is not finite"),
    (NoGradient, "loss 'entropy' has no gradient"),
    (UnsaveableStudent, "cannot be saved and reloaded as a model repo"),
    (Undocumented, "fields without a description: secret"),
])
def test_kit_catches_a_broken_amalgamator(tmp_path, cls, message):
    with pytest.raises(ConformanceError, match=message):
        check_amalgamator(cls, tmp_path)


def test_kit_passes_the_builtin_kd_and_its_fixture(kamal_check):
    report = kamal_check(KDAmalgamator)
    assert report["student"]["metrics"]["digits"]["top1"] > 0.2  # 2x chance after 2 epochs
