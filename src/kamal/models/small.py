"""Small CNNs for 8x8 to 32x32 inputs (digits, CIFAR-size images).

Each has named stages ``block1..block3`` and ``pool`` (the pooled feature vector that the
``head`` classifier reads), so feature-based algorithms can tap them by name.
"""

from __future__ import annotations

from torch import nn

from .base import Architecture


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages (stride 1, 2, 2), global average pool, linear head."""

    def __init__(self, num_outputs: int, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self.block1 = nn.Sequential(*_conv_bn(in_channels, width))
        self.block2 = nn.Sequential(*_conv_bn(width, 2 * width, stride=2))
        self.block3 = nn.Sequential(*_conv_bn(2 * width, 4 * width, stride=2))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, num_outputs)

    def forward(self, x):
        return self.head(self.pool(self.block3(self.block2(self.block1(x)))))


class SmallVGG(nn.Module):
    """VGG-style: two convs per stage with max-pooling, no batch norm, dropout before the head."""

    def __init__(self, num_outputs: int, in_channels: int = 1, width: int = 24,
                 dropout: float = 0.2) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")

        def stage(cin: int, cout: int, pool: bool) -> nn.Sequential:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
                                       nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))

        self.block1 = stage(in_channels, width, pool=False)
        self.block2 = stage(width, 2 * width, pool=True)
        self.block3 = stage(2 * width, 4 * width, pool=True)
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.head = nn.Linear(4 * width, num_outputs)

    def forward(self, x):
        return self.head(self.pool(self.block3(self.block2(self.block1(x)))))


_LAYERS = ("block1", "block2", "block3", "pool")
SMALL_CNN = Architecture(SmallCNN, _LAYERS, head="head",
                         description="3-stage conv-BN-ReLU CNN (width=32) for 8-32 px inputs")
SMALL_VGG = Architecture(SmallVGG, _LAYERS, head="head",
                         description="3-stage VGG-style CNN without BN (width=24) for 8-32 px")
