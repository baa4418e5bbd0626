"""The amalgamation block placed at each tapped layer.

The teachers' feature maps at one layer are concatenated and *encoded* by a 1x1 conv into a
code with the student's channel count; a 1x1 conv *decodes* the code back into every
teacher's feature map, so the code has to keep what all teachers know (the paper's compact
feature). A small *feature-adaptation* module (1x1 conv) maps the student's map onto that
code. Same shape as KamalEngine's ``AmalBlock``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class AmalBlock(nn.Module):
    """Encoder / decoder of the teachers' maps and the student's feature-adaptation module.

    ``student_channels`` is the student's channel count at the layer (the code's size);
    ``teacher_channels`` lists each teacher's channels there, in teacher order.
    """

    def __init__(self, student_channels: int, teacher_channels: Sequence[int]) -> None:
        super().__init__()
        if student_channels < 1 or not teacher_channels or min(teacher_channels) < 1:
            raise ValueError(f"bad channels: student {student_channels}, "
                             f"teachers {list(teacher_channels)}")
        self.student_channels = int(student_channels)
        self.teacher_channels = [int(c) for c in teacher_channels]
        total = sum(self.teacher_channels)
        self.encoder = nn.Conv2d(total, self.student_channels, kernel_size=1)
        self.decoder = nn.Conv2d(self.student_channels, total, kernel_size=1)
        self.adapter = nn.Conv2d(self.student_channels, self.student_channels, kernel_size=1)

    def encode(self, teacher_features: Sequence[Tensor]) -> Tensor:
        """The code of the concatenated teacher maps: ``(N, student_channels, H, W)``."""
        return self.encoder(torch.cat(list(teacher_features), dim=1))

    def decode(self, code: Tensor) -> list[Tensor]:
        """Each teacher's map reconstructed from ``code``."""
        return list(torch.split(self.decoder(code), self.teacher_channels, dim=1))

    def adapt(self, student_feature: Tensor) -> Tensor:
        """The student's map in code space (what the amalgamation loss compares)."""
        return self.adapter(student_feature)

    def forward(self, student_feature: Tensor,
                teacher_features: Sequence[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``(code, adapted student map, decoded teacher maps)``."""
        code = self.encode(teacher_features)
        return code, self.adapt(student_feature), self.decode(code)
