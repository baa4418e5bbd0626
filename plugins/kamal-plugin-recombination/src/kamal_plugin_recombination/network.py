"""The ``recombined`` architecture: teachers side by side under one merged head.

Teachers of one architecture become the diagonal blocks of one wide network: layer ``l`` of
the combined network is the direct sum of the teachers' layers ``l`` (a block-diagonal
convolution, concatenated batch-norm statistics and affine parameters). It is stored as one
*branch* per teacher, so no zero block is ever stored, counted, trained or mis-indexed
(KamalEngine's channel-offset bugs), and each branch may be pruned to its own widths.

The teachers' classifiers become one merged head over the concatenated pooled features
(``pool``, also the ``head:in`` feature), with one row per class of the merged task. It is
dense, so fine-tuning may read one teacher's features for another teacher's classes.

Everything that shapes the network is plain data in ``architecture_kwargs``: the base
architecture, each branch's base options, and ``widths``, the shapes of the layers that
pruning changed (``{module name: [in, out(, groups)]}`` for convolutions and linear
layers, ``[channels]`` for norms). ``kamal.load_model`` rebuilds it from ``config.json``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kamal import Architecture, get_registry

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
SHAPED = (nn.Conv2d, nn.Linear, *NORMS)
NAME = "recombined"


# --- layer shapes as data -------------------------------------------------------------


def shape_of(module: nn.Module) -> list[int] | None:
    """The widths of a convolution, linear layer or norm as a JSON list (None otherwise)."""
    if isinstance(module, nn.Conv2d):
        extra = [module.groups] if module.groups != 1 else []
        return [module.in_channels, module.out_channels, *extra]
    if isinstance(module, nn.Linear):
        return [module.in_features, module.out_features]
    if isinstance(module, NORMS):
        return [module.num_features]
    return None


def reshaped(module: nn.Module, shape: Sequence[int]) -> nn.Module:
    """A fresh module of ``module``'s kind and options with the widths ``shape``."""
    shape = [int(s) for s in shape]
    if isinstance(module, nn.Conv2d) and len(shape) in (2, 3):
        groups = shape[2] if len(shape) == 3 else 1
        new: nn.Module = nn.Conv2d(shape[0], shape[1], module.kernel_size, module.stride,
                                   module.padding, module.dilation, groups,
                                   bias=module.bias is not None, padding_mode=module.padding_mode)
    elif isinstance(module, nn.Linear) and len(shape) == 2:
        new = nn.Linear(shape[0], shape[1], bias=module.bias is not None)
    elif isinstance(module, NORMS) and len(shape) == 1:
        new = type(module)(shape[0], eps=module.eps, momentum=module.momentum,
                           affine=module.affine, track_running_stats=module.track_running_stats)
    else:
        raise ValueError(f"cannot give a {type(module).__name__} the widths {shape}")
    like = next(iter([*module.parameters(), *module.buffers()]), None)
    return new.to(like.device) if like is not None else new


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted) of ``root``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def head_of(net: nn.Module, arch: Architecture) -> str | None:
    """The architecture's head layer, or the one the built network names (networks that
    wrap a library's model, such as timm's and torchvision's, name it on the instance)."""
    return arch.head or getattr(net, "head_layer", None)


def classifier_name(net: nn.Module, head: str | None) -> str:
    """Name of the last ``nn.Linear`` inside the architecture's ``head`` module."""
    if head is None:
        raise ValueError("the architecture names no head layer")
    found = [name for name, m in net.get_submodule(head).named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"the head '{head}' contains no nn.Linear classifier")
    return f"{head}.{found[-1]}" if found[-1] else head


# --- the network ----------------------------------------------------------------------


class Concat(nn.Module):
    """Concatenates the branches' pooled features along channels (the tappable ``pool``)."""

    def forward(self, features: list[Tensor]) -> Tensor:
        return torch.cat(features, dim=1)


class MergedHead(nn.Module):
    """One linear classifier over concatenated features, stored as one piece per branch.

    ``head(cat(f_1..f_T)) = sum_i pieces[i](f_i)``: the same map as a dense ``nn.Linear``,
    split by input block so that pruning a branch removes only its own columns.
    """

    def __init__(self, in_features: Sequence[int], out_features: int) -> None:
        super().__init__()
        self.pieces = nn.ModuleList(nn.Linear(n, out_features) for n in in_features)

    def forward(self, x: Tensor) -> Tensor:
        blocks = torch.split(x, [p.in_features for p in self.pieces], dim=1)
        out = self.pieces[0](blocks[0])
        for piece, block in zip(self.pieces[1:], blocks[1:], strict=True):
            out = out + piece(block)
        return out


class BranchView(nn.Module):
    """Branch ``i`` followed by its head piece: a plain single network, shared weights.

    Pruning traces this view (one ordinary network per teacher), so its edits land in the
    combined network's own modules.
    """

    def __init__(self, branch: nn.Module, piece: nn.Linear, normalize: Any) -> None:
        super().__init__()
        self.branch, self.piece = branch, piece
        self._normalize = normalize

    def forward(self, x: Tensor) -> Tensor:
        return self.piece(self.branch(self._normalize(x)))


class RecombinedNet(nn.Module):
    """Teachers' networks as branches (block-diagonal layers) under one merged head.

    Built from plain data (``base``, ``branches``, ``widths``: see the module docstring);
    ``in_channels``/``num_outputs`` come from the model's input spec and merged task.
    """

    def __init__(self, num_outputs: int, in_channels: int, base: str,
                 branches: Sequence[dict[str, Any]], widths: dict[str, Sequence[int]] | None = None
                 ) -> None:
        super().__init__()
        if base == NAME:
            raise ValueError("a recombined network cannot be the base of another one")
        if not branches:
            raise ValueError("'branches' is empty: a recombined network needs one per teacher")
        arch: Architecture = get_registry().get("architectures", base)
        if arch.multi_task:
            raise ValueError(f"base '{base}' is multi-task; recombination needs one head per net")
        self.num_outputs, self.in_channels, self.base = num_outputs, in_channels, base
        self.branch_specs = [dict(b) for b in branches]
        nets, features = [], []
        for i, spec in enumerate(self.branch_specs):
            unknown = set(spec) - {"base_kwargs", "mean", "std", "num_outputs"}
            if unknown:
                raise ValueError(f"branches[{i}] has unknown keys {sorted(unknown)}")
            # built as its teacher was (its own head width); the merged head replaces the head
            net = arch.build(num_outputs=spec.get("num_outputs", num_outputs),
                             in_channels=in_channels, **spec.get("base_kwargs", {}))
            name = classifier_name(net, head_of(net, arch))
            features.append(net.get_submodule(name).in_features)
            set_module(net, name, nn.Identity())  # the merged head classifies
            nets.append(net)
            if "mean" in spec or "std" in spec:
                # this teacher normalised its input differently from the student: redo it here
                shape = (1, -1, 1, 1)
                self.register_buffer(f"mean{i}", _channels(spec.get("mean", [0.0]),
                                                           in_channels).view(shape), persistent=False)
                self.register_buffer(f"std{i}", _channels(spec.get("std", [1.0]),
                                                          in_channels).view(shape), persistent=False)
        self.branches = nn.ModuleList(nets)
        self.pool = Concat()
        self.head = MergedHead(features, num_outputs)
        # the widths before pruning: what architecture_kwargs() compares against
        self._default_shapes = {name: _param_shapes(m) for name, m in self.named_modules()}
        for name, shape in (widths or {}).items():
            module = dict(self.named_modules()).get(name)
            if not isinstance(module, SHAPED):
                raise ValueError(f"widths: '{name}' is not a convolution, linear or norm layer")
            set_module(self, name, reshaped(module, shape))
        # set by the recombination amalgamator on its student: resume loads pruned checkpoints
        self.adapt_widths_on_load = False
        self.register_load_state_dict_pre_hook(_adapt_widths)

    def normalize(self, x: Tensor, index: int) -> Tensor:
        """The input of branch ``index`` (its teacher's normalisation, if it differs)."""
        mean = getattr(self, f"mean{index}", None)
        return x if mean is None else (x - mean) / getattr(self, f"std{index}")

    def forward(self, x: Tensor) -> Tensor:
        features = [branch(self.normalize(x, i)) for i, branch in enumerate(self.branches)]
        return self.head(self.pool(features))

    def views(self) -> Iterator[BranchView]:
        """One :class:`BranchView` per branch (for pruning)."""
        for i, (branch, piece) in enumerate(zip(self.branches, self.head.pieces, strict=True)):
            yield BranchView(branch, piece, lambda x, i=i: self.normalize(x, i))

    def architecture_kwargs(self) -> dict[str, Any]:
        """The kwargs that rebuild this network with its current widths."""
        widths: dict[str, list[int]] = {}
        for name, module in self.named_modules():
            default = self._default_shapes.get(name)
            if default is None:
                raise ValueError(f"layer '{name}' is not part of a {self.base} branch")
            if _param_shapes(module) == default:
                continue
            shape = shape_of(module)
            if shape is None:
                raise ValueError(f"layer '{name}' ({type(module).__name__}) changed shape; only "
                                 "convolutions, linear layers and batch norms can be recorded")
            widths[name] = shape
        return {"base": self.base, "branches": [dict(b) for b in self.branch_specs],
                "widths": widths}


def _param_shapes(module: nn.Module) -> list[Any]:
    """What identifies a layer's widths: its own tensors' shapes (and groups)."""
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return [tuple(t.shape) for t in tensors] + [getattr(module, "groups", None)]


def _channels(values: Sequence[float], channels: int) -> Tensor:
    values = [float(v) for v in values]
    return torch.tensor(values * channels if len(values) == 1 else values)


def _adapt_widths(module: RecombinedNet, state: dict[str, Tensor], prefix: str,
                  *_args: Any) -> None:
    """Before loading, give each layer the widths of the incoming (pruned) tensors.

    Only active on a student whose amalgamator prunes it (``adapt_widths_on_load``), so that
    ``--resume`` can load a checkpoint written after a pruning round; ``kamal.load_model``
    builds from ``widths`` and stays strict.
    """
    if not module.adapt_widths_on_load:
        return
    for name, layer in list(module.named_modules()):
        if not isinstance(layer, SHAPED):
            continue
        key = f"{prefix}{name}."
        tensor = state.get(key + "weight", state.get(key + "running_mean"))
        if tensor is None:
            continue
        shape = shape_of(layer)
        assert shape is not None
        if isinstance(layer, nn.Conv2d):
            depthwise = layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels
            out = int(tensor.shape[0])
            groups = out if depthwise else layer.groups
            new = [int(tensor.shape[1]) * groups, out] + ([groups] if groups != 1 else [])
        elif isinstance(layer, nn.Linear):
            new = [int(tensor.shape[1]), int(tensor.shape[0])]
        else:
            new = [int(tensor.shape[0])]
        if new != shape:
            set_module(module, name, reshaped(layer, new))


def _build(num_outputs: int, in_channels: int, base: str, branches: list[dict[str, Any]],
           widths: dict[str, list[int]] | None = None) -> RecombinedNet:
    return RecombinedNet(num_outputs, in_channels, base, branches, widths)


RECOMBINED = Architecture(
    _build, ("pool",), head="head",
    description="teachers of one architecture side by side (block-diagonal) under a merged "
                "head, pruned to per-layer widths; built by the recombination amalgamator")
