"""torchvision classification networks, always built without pretrained weights.

Weights come from model repos (safetensors), never from torchvision's download URLs.
``small_input=True`` swaps a ResNet's 7x7/stride-2 stem and max-pool for a 3x3/stride-1
stem, the usual choice for 32x32 images.
"""

from __future__ import annotations

from torch import nn

from .base import Architecture, head_removed


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


class TorchvisionClassifier(nn.Module):
    """Any torchvision classification model (built without weights), its output restricted to
    ``class_indices`` of its head: the network of a ``torchvision``-format teacher."""

    def __init__(self, num_outputs: int, in_channels: int = 3, model_name: str = "",
                 num_classes: int = 1000, class_indices: list[int] | None = None) -> None:
        super().__init__()
        from torchvision import models

        if model_name not in models.list_models(module=models):
            raise ValueError(f"torchvision has no classification model '{model_name}'")
        if in_channels != 3:
            raise ValueError(f"torchvision models take 3 channels, not {in_channels}")
        self.model = models.get_model(model_name, weights=None, num_classes=num_classes)
        self.class_indices = list(class_indices if class_indices is not None else range(num_classes))
        if len(self.class_indices) != num_outputs or any(
                not 0 <= i < num_classes for i in self.class_indices):
            raise ValueError(f"class_indices must be {num_outputs} indices in [0, {num_classes})")
        children = dict(self.model.named_children())
        head = next((name for name in ("fc", "classifier", "head", "heads") if name in children), None)
        self.head_layer = f"model.{head}" if head else None
        self.feature_layers = [f"model.{name}" for name, module in children.items()
                               if name != head and any(True for _ in module.parameters())]

    def forward(self, x):
        out = self.model(x)
        return out if head_removed(self) else out[:, self.class_indices]


TORCHVISION = Architecture(TorchvisionClassifier, (), head=None,
                           description="any torchvision classification model (torchvision-format teachers)")
