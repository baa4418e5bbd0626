"""How a training step calls the student: eagerly, in channels-last memory format, and/or
through ``torch.compile`` (``train.student_channels_last``, ``train.compile``).

Compiling is tried on the first call; where it cannot work (no dynamo on this platform, no
C++ compiler for a CPU, a model dynamo fails on) the student runs eagerly and the log says
why, once. The module itself is never replaced: checkpoints, evaluation and the saved
student see the plain network.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def compile_problem(device: torch.device, tapped: bool) -> str | None:
    """Why the student cannot be compiled here (``None``: it can be tried)."""
    if tapped:
        return ("the algorithm taps student layers, whose hooks change every step and would "
                "make torch.compile trace again each time")
    try:
        import torch._dynamo as dynamo
    except ImportError as exc:  # pragma: no cover - every supported torch has it
        return f"torch._dynamo cannot be imported ({exc})"
    if not dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this platform or Python"
    if device.type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")) \
            and not shutil.which("c++"):
        return "compiling for a CPU needs a C++ compiler (g++ or c++ on PATH)"
    return None


class StudentForward:
    """Calls ``student`` on a batch as configured; see the module docstring."""

    def __init__(self, student: nn.Module, compile: bool = False, channels_last: bool = False,
                 tapped: bool = False) -> None:
        self.student = student
        self.channels_last = channels_last
        self.call: Callable[[Tensor], dict[str, Tensor]] = student
        self.compiled = False
        self._pending = compile
        self._tapped = tapped

    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if self._pending:
            return self._first_compiled_call(images)
        return self.call(images)

    def _first_compiled_call(self, images: Tensor) -> dict[str, Tensor]:
        self._pending = False
        problem = compile_problem(images.device, self._tapped)
        if problem is None:
            compiled = torch.compile(self.student)
            try:
                outputs = compiled(images)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: run eagerly
                problem = f"torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}"
            else:
                self.call, self.compiled = compiled, True
                return outputs
        log.warning("train.compile: the student runs eagerly: %s", problem)
        return self.call(images)
