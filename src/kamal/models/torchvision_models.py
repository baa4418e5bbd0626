"""torchvision classification networks, always built without pretrained weights.

Weights come from model repos (safetensors), never from torchvision's download URLs.
``small_input=True`` swaps a ResNet's 7x7/stride-2 stem and max-pool for a 3x3/stride-1
stem, the usual choice for 32x32 images.
"""

from __future__ import annotations

from torch import nn

from .base import Architecture


def _resnet(depth: int):
    def build(num_outputs: int, in_channels: int = 3, small_input: bool = False) -> nn.Module:
        from torchvision import models

        net = getattr(models, f"resnet{depth}")(weights=None, num_classes=num_outputs)
        if small_input or in_channels != 3:
            stride = 1 if small_input else 2
            kernel = 3 if small_input else 7
            net.conv1 = nn.Conv2d(in_channels, 64, kernel, stride, kernel // 2, bias=False)
        if small_input:
            net.maxpool = nn.Identity()
        return net

    build.__name__ = f"resnet{depth}"
    return build


def _mobilenet_v3_small(num_outputs: int, in_channels: int = 3) -> nn.Module:
    from torchvision import models

    net = models.mobilenet_v3_small(weights=None, num_classes=num_outputs)
    if in_channels != 3:
        first = net.features[0][0]
        net.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, 2, 1, bias=False)
    return net


_RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4", "avgpool")
RESNET18 = Architecture(_resnet(18), _RESNET_LAYERS, head="fc", description="torchvision ResNet-18")
RESNET34 = Architecture(_resnet(34), _RESNET_LAYERS, head="fc", description="torchvision ResNet-34")
RESNET50 = Architecture(_resnet(50), _RESNET_LAYERS, head="fc", description="torchvision ResNet-50")
MOBILENET_V3_SMALL = Architecture(_mobilenet_v3_small, ("features", "avgpool"),
                                  head="classifier", description="torchvision MobileNetV3-Small")
