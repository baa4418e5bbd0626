"""FeatureTap: capture named intermediate layers with forward hooks, removed on exit.

A layer is addressed by its ``named_modules`` name; ``"<name>:in"`` captures the module's
*input* instead of its output (e.g. ``"head:in"``, the pooled feature a classifier reads).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .errors import KamalError


def resolve_layers(root: nn.Module, layers: Sequence[str], owner: str = "model") -> dict[str, nn.Module]:
    """Map each layer name to its module, or raise naming the missing ones and what exists."""
    modules = dict(root.named_modules())
    found, missing = {}, []
    for layer in layers:
        name = layer[:-3] if layer.endswith(":in") else layer
        if name in modules and name != "":
            found[layer] = modules[name]
        else:
            missing.append(layer)
    if missing:
        names = [n for n in modules if n]
        nearest = difflib.get_close_matches(missing[0].removesuffix(":in"), names, n=5, cutoff=0.5)
        top = [n for n in names if "." not in n]
        hint = (f"nearest names: {', '.join(nearest)}" if nearest
                else f"its top-level layers are: {', '.join(top)}")
        raise KamalError(f"{owner} has no layer {', '.join(map(repr, missing))}; {hint} "
                         "(kamal inspect lists every layer with its output shape)")
    return found


class FeatureTap:
    """Context manager collecting features of ``layers`` during forward passes.

    >>> with FeatureTap(model.features, ["block2", "head:in"]) as tap:
    ...     model(x)
    >>> tap.features["block2"].shape
    """

    def __init__(self, root: nn.Module, layers: Sequence[str], owner: str = "model") -> None:
        self.modules = resolve_layers(root, layers, owner) if layers else {}
        self.features: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> FeatureTap:
        self.features = {}  # a tap may be entered again (layers resolved once); fresh each time
        for layer, module in self.modules.items():
            if layer.endswith(":in"):
                def pre_hook(_m, args, _layer=layer):
                    self.features[_layer] = args[0]
                self._handles.append(module.register_forward_pre_hook(pre_hook))
            else:
                def hook(_m, _args, output, _layer=layer):
                    self.features[_layer] = output
                self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
