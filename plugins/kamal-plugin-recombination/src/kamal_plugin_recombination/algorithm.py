"""``recombination``: combine same-architecture teachers, then prune the result to a budget.

1. **Combine** (:func:`~kamal_plugin_recombination.combine.combine`): the teachers become
   the branches of one ``recombined`` network whose merged head outputs every teacher's
   logits at its classes' positions. Before any training it reproduces each teacher
   exactly.
2. **Prune** in ``rounds``: round ``i`` removes the least important channels (weight norm
   by default, ranked globally across layers and teachers) until the network has at most
   ``P0 * (1 - (1 - budget) * i / rounds)`` parameters, then fine-tunes it for
   ``epochs_per_round`` by KD from the teachers' merged logits (as ``kd`` does), through the
   engine (``trainer.fit(stage="round<i>")``), so checkpoints, evaluation and resume work.

The student stays a normal kamal model: its ``architecture_kwargs`` record the pruned
widths, so ``kamal.load_model`` rebuilds it from ``config.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from kamal import (
    Amalgamator,
    Batch,
    ConfigError,
    KamalModel,
    KDTerm,
    KDTermConfig,
    Student,
    Teacher,
)

from .combine import check_combinable, combine
from .network import NAME, RecombinedNet
from .pruning import channel_floors, count_parameters, prune_to

if TYPE_CHECKING:
    from kamal import Trainer


class RecombinationConfig(KDTermConfig):
    """Hyperparameters of ``recombination`` (with the shared KD term's ``temperature``,
    ``merge`` and ``kd_weight``, used in every fine-tuning round)."""

    name: Literal["recombination"] = "recombination"
    budget: float = Field(0.5, gt=0, le=1, description="Parameters the student keeps, as a "
                          "fraction of the combined network's (about the sum of the teachers').")
    rounds: int = Field(4, ge=1, description="Pruning rounds; round i prunes to an evenly "
                        "spaced intermediate target, then fine-tunes.")
    epochs_per_round: int | None = Field(None, ge=1, description="Fine-tuning epochs after each "
                                         "round; by default train.epochs / rounds (rounded up).")
    importance: Literal["l2", "l1", "random"] = Field(
        "l2", description="Channel importance: the L2 or L1 norm of the weights a channel owns "
        "(normalised per layer group, ranked globally), or 'random' as a control.")
    min_keep: float = Field(0.1, gt=0, le=1, description="Every layer keeps at least this "
                            "fraction of its channels.")


class RecombinationAmalgamator(Amalgamator):
    """Combine same-architecture teachers into one network, prune it in rounds, distil."""

    name = "recombination"
    Config = RecombinationConfig
    config: RecombinationConfig

    def __init__(self, config: RecombinationConfig, teachers: list[Teacher], student_spec: Any
                 ) -> None:
        super().__init__(config, teachers, student_spec)
        self.combined_params = 0

    @classmethod
    def check_teachers(cls, teachers: Sequence[Teacher]) -> None:
        check_combinable(teachers)

    def build_student(self) -> Student:
        spec = self.student_spec
        if spec.architecture != NAME:
            raise ConfigError(f"student.architecture: recombination builds its student from the "
                              f"teachers; set it to '{NAME}' (got '{spec.architecture}')")
        if spec.architecture_kwargs:
            raise ConfigError("student.architecture_kwargs: the recombined student's widths come "
                              "from the teachers and algorithm.budget; remove this key")
        student = combine(self.teachers, spec.task_names)
        student.net.adapt_widths_on_load = True  # --resume may load an already pruned student
        return student

    def setup(self, student: Student, transfer_images: Iterable[Tensor]) -> None:
        super().setup(student, transfer_images)
        self.combined_params = count_parameters(student)
        self.floors = channel_floors(self._net(), self.config.min_keep)
        self.kd = KDTerm(self.config, self.teachers, student.tasks)
        self.kd.calibrate(self.teachers, transfer_images, next(student.parameters()).device)

    def targets(self) -> list[int]:
        """Parameter count to reach in each round (the last one is the budget)."""
        cfg = self.config
        return [int(self.combined_params * (1 - (1 - cfg.budget) * i / cfg.rounds))
                for i in range(1, cfg.rounds + 1)]

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"merger": self.kd.merger}

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        return self.kd(batch)

    def amalgamate(self, trainer: Trainer) -> None:
        """Prune to each round's target, then fine-tune; completed rounds are skipped."""
        student, net = self._student(), self._net()
        epochs = self.config.epochs_per_round or math.ceil(trainer.cfg.epochs / self.config.rounds)
        spec = student.input_spec
        example = torch.rand(1, spec.channels, *spec.size,
                             device=next(net.parameters()).device)
        for i, target in enumerate(self.targets(), start=1):
            stage = f"round{i}"
            # after --resume the loaded student may already be pruned for this round
            if stage not in trainer.completed_stages and count_parameters(student) > target:
                started = time.perf_counter()
                generator = torch.Generator().manual_seed(trainer.cfg.seed * 1009 + i)
                prune_to(net, target, example, importance=self.config.importance,
                         floors=self.floors, generator=generator)
                student.architecture_kwargs = net.architecture_kwargs()
                self._log(trainer, {"round": i, "target": target,
                                    "params": count_parameters(student),
                                    "seconds": round(time.perf_counter() - started, 3),
                                    "widths": student.architecture_kwargs["widths"]})
            trainer.fit(stage=stage, epochs=epochs)
        student.architecture_kwargs = net.architecture_kwargs()

    def describe(self) -> dict[str, Any]:
        return {**self.config.model_dump(), "combined_params": self.combined_params,
                "round_targets": self.targets()}

    # --- helpers ------------------------------------------------------------------------

    def _student(self) -> KamalModel:
        assert isinstance(self.student, KamalModel), "setup() has not run"
        return self.student

    def _net(self) -> RecombinedNet:
        net = self._student().net
        assert isinstance(net, RecombinedNet)
        return net

    @staticmethod
    def _log(trainer: Trainer, record: dict[str, Any]) -> None:
        """One line per pruning round in ``pruning.jsonl`` of the run folder."""
        trainer.output_dir.mkdir(parents=True, exist_ok=True)
        with open(trainer.output_dir / "pruning.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
