"""SegNet-style encoder-decoder for dense prediction (Badrinarayanan et al., 2017), small.

Four encoder blocks (``enc1..enc4``, 2x2 max-pooling before blocks 2-4) and three decoder
blocks (``dec1..dec3``) that max-unpool with the encoder's pooling indices, so object
boundaries come back at their original positions without skip tensors. One 1x1 head per
task in ``heads``. Channels are ``width x (1, 2, 4, 4)``; the input size must be divisible
by 8. Heads of ``depth`` tasks predict log-depth and return ``exp`` of it: depth is always
positive, and a net that starts near 1 reaches any scale (metres or millimetres) in a few
steps, where a plain linear output moves by about the learning rate per step.

As a single-task model it is a teacher; with several tasks the whole trunk is shared and
only the heads differ (the plain multi-task student that algorithms such as SBM refine).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..interfaces import Task
from .base import Architecture

STAGES = 4


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    """3x3 convolution, batch norm, ReLU."""
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


def stage_channels(width: int) -> list[int]:
    """Channels after ``enc1..enc4``."""
    return [width, 2 * width, 4 * width, 4 * width]


class DecoderBlock(nn.Module):
    """max-unpool with the matching encoder indices -> conv-BN-ReLU x2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.unpool = nn.MaxUnpool2d(2)
        self.convs = nn.Sequential(*conv_bn_relu(cin, cin), *conv_bn_relu(cin, cout))

    def forward(self, x: Tensor, indices: Tensor) -> Tensor:
        return self.convs(self.unpool(x, indices))


class Head(nn.Module):
    """1x1 convolution to a task's outputs; ``exp`` of it for depth (see the module doc)."""

    def __init__(self, channels: int, task: Task) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, task.num_outputs, 1)
        self.log_space = task.kind == "depth"

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return out.clamp(max=30.0).exp() if self.log_space else out


class SegNet(nn.Module):
    """Encoder-decoder with one 1x1 head per task; ``forward`` returns ``{task_name: map}``.

    :meth:`encode` and :meth:`decode_block` expose the stages so that multi-task students
    can share, gate or branch them.
    """

    def __init__(self, tasks: Sequence[Task], in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        if not tasks:
            raise ValueError("SegNet needs at least one task")
        channels = stage_channels(width)
        self.width = width
        self.channels = channels
        inputs = [in_channels, *channels[:-1]]
        for i in range(STAGES):  # each block's output is a plain tensor, so it can be tapped
            self.add_module(f"enc{i + 1}", nn.Sequential(*conv_bn_relu(inputs[i], channels[i]),
                                                         *conv_bn_relu(channels[i], channels[i])))
        # dec<k> undoes the pooling before enc<5-k>, so it unpools a tensor with enc<4-k>'s
        # channels and ends with the channels the next unpooling needs
        for k in range(1, STAGES):
            cin, cout = channels[STAGES - 1 - k], channels[max(STAGES - 2 - k, 0)]
            self.add_module(f"dec{k}", DecoderBlock(cin, cout))
        self.heads = nn.ModuleDict({t.name: Head(channels[0], t) for t in tasks})

    def decoder_channels(self) -> list[int]:
        """Channels of the encoder output and of ``dec1..dec3``'s outputs."""
        c = self.channels
        return [c[3], c[1], c[0], c[0]]

    def encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Encoder output and the pooling indices, deepest first (as ``dec1..dec3`` use them)."""
        indices = []
        for i in range(STAGES):
            if i > 0:
                x, idx = F.max_pool2d(x, 2, return_indices=True)
                indices.append(idx)
            x = getattr(self, f"enc{i + 1}")(x)
        return x, indices[::-1]

    def decode_block(self, k: int, x: Tensor, indices: list[Tensor]) -> Tensor:
        """Run decoder block ``dec<k>`` (1-based) of this network."""
        return getattr(self, f"dec{k}")(x, indices[k - 1])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        if size[0] % 8 or size[1] % 8:
            raise ValueError(f"segnet needs an input size divisible by 8, got {tuple(size)}")
        x, indices = self.encode(x)
        for k in range(1, STAGES):
            x = self.decode_block(k, x, indices)
        return {name: head(x) for name, head in self.heads.items()}


def build_segnet(tasks: Sequence[Task], in_channels: int = 3, width: int = 16) -> SegNet:
    """Builder registered as ``segnet``."""
    return SegNet(tasks, in_channels, width)


SEGNET_LAYERS = ("enc1", "enc2", "enc3", "enc4", "dec1", "dec2", "dec3")
SEGNET = Architecture(build_segnet, SEGNET_LAYERS, head=None, multi_task=True,
                      description="SegNet-style encoder-decoder (width=16, 4 stages, unpooling "
                                  "by indices) with one 1x1 head per dense task")
