"""Structured (channel) pruning of a recombined network down to a parameter count.

Which layers must lose the same channels (a convolution's outputs, the batch norm after it,
the next layer's inputs, every layer feeding a residual addition, the merged head's columns)
comes from torch-pruning's dependency graph (Fang et al., "DepGraph: Towards Any Structural
Pruning", CVPR 2023), traced on each branch with its head piece as a plain network
(:class:`~kamal_plugin_recombination.network.BranchView`). One traced group = one set of
coupled channels.

Importance of a channel (``l2``, the default, or ``l1``): the norm of every weight that the
channel owns across its group, divided by the group's mean (torch-pruning's
``GroupMagnitudeImportance``), so channels compare across layers and teachers; ``random``
is the control. The ranking is global: the least important channels anywhere go first,
until the parameters they own cover the excess; then the network is recounted, and the
step repeats until the count is at or below the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from kamal import KamalError

from .network import RecombinedNet

Importance = Literal["l2", "l1", "random"]
_MAX_STEPS = 50


def count_parameters(module: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())


def channel_floors(net: RecombinedNet, min_keep: float) -> dict[str, int]:
    """The fewest output channels each convolution / linear layer may keep."""
    floors = {}
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            floors[name] = max(1, math.ceil(min_keep * module.out_channels))
        elif isinstance(module, nn.Linear):
            floors[name] = max(1, math.ceil(min_keep * module.out_features))
    return floors


def _scorer(kind: Importance, generator: torch.Generator) -> Callable[[object], Tensor | None]:
    import torch_pruning as tp

    if kind == "random":
        def random_scores(group: object) -> Tensor:
            return torch.rand(len(group[0].idxs), generator=generator)  # type: ignore[index]
        return random_scores
    p = {"l2": 2, "l1": 1}[kind]
    return tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer="mean")


def _channel_cost(group: object, graph: object) -> float:
    """Parameters one root channel of ``group`` owns (first order: shared weights count twice)."""
    total, seen = 0.0, set()
    for dep, idxs in group:  # type: ignore[attr-defined]
        module, handler = dep.target.module, dep.handler
        key = (id(module), handler)
        if key in seen:
            continue
        seen.add(key)
        if graph.is_out_channel_pruning_fn(handler):  # type: ignore[attr-defined]
            per = sum(p.numel() / p.shape[0] for p in module.parameters(recurse=False) if p.dim())
        elif isinstance(module, nn.Conv2d | nn.Linear):
            inputs = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
            per = module.weight.numel() / inputs
        else:
            per = 0.0
        total += per * len(idxs)
    return total / max(1, len(group[0].idxs))  # type: ignore[index]


def prune_to(net: RecombinedNet, target: int, example: Tensor, *, importance: Importance = "l2",
             floors: dict[str, int] | None = None, generator: torch.Generator | None = None) -> int:
    """Remove the least important channels until ``net`` has at most ``target`` parameters.

    ``example`` is one input batch (the shape the network reads); ``floors`` the fewest
    output channels per layer name (default 1). Returns the new parameter count.
    """
    import torch_pruning as tp

    floors = floors or {}
    generator = generator or torch.Generator().manual_seed(0)
    score = _scorer(importance, generator)
    names = {id(m): n for n, m in net.named_modules()}
    was_training = net.training
    net.eval()  # trace without touching batch-norm statistics
    try:
        # one graph per branch, reused across steps (it follows the modules it prunes)
        with torch.enable_grad():
            graphs = [(view, tp.DependencyGraph().build_dependency(
                view, example_inputs=example, verbose=False)) for view in net.views()]
        for _ in range(_MAX_STEPS):
            params = count_parameters(net)
            excess = params - target
            if excess <= 0:
                return params
            candidates: list[tuple[float, float, object, int]] = []
            for view, graph in graphs:
                for group in graph.get_all_groups(ignored_layers=[view.piece],
                                                  root_module_types=(nn.Conv2d, nn.Linear)):
                    root = group[0].dep.target.module
                    size = len(group[0].idxs)
                    removable = size - floors.get(names.get(id(root), ""), 1)
                    scores = score(group) if removable > 0 else None
                    if scores is None:
                        continue
                    cost = _channel_cost(group, graph)
                    for channel in torch.argsort(scores.cpu())[:removable].tolist():
                        candidates.append((float(scores[channel]), cost, group, channel))
            if not candidates:
                raise KamalError(
                    f"cannot prune to {target:,} parameters: every layer is at its floor at "
                    f"{params:,}; lower algorithm.min_keep or raise algorithm.budget")
            candidates.sort(key=lambda c: c[0])
            chosen: dict[object, list[int]] = {}
            saved = 0.0
            for _score, cost, group, channel in candidates:
                chosen.setdefault(group, []).append(channel)
                saved += cost
                if saved >= excess:
                    break
            for group, channels in chosen.items():
                group.prune(sorted(channels))  # type: ignore[attr-defined]
        raise KamalError(f"pruning did not reach {target:,} parameters in {_MAX_STEPS} steps")
    finally:
        net.train(was_training)
