"""The SBM student: a shared SegNet trunk from which every task branches out at a learned point.

The encoder is always shared. Task ``t`` with branch point ``b`` (0..3) reads the output of
the ``b``-th shared decoder block (``b = 0``: the encoder output), multiplies it by its own
channel gates ``sigmoid(10 gates[t][b])`` (which shared channels the task uses), and runs its
own private copies of the remaining decoder blocks ``dec<b+1>..dec3`` and its head. ``b = 3``
shares the whole decoder; ``b = 0`` shares only the encoder.

Built without ``branches`` it is the *supernet* that holds every private block and gate, so
that training can sample branch points; built with ``branches`` (one point per task) it
holds only what those points use, which is the student that is saved.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from kamal import Architecture, SegNet, Task

BLOCKS = 3          # decoder blocks of the SegNet trunk
GATE_INIT = 3.0     # sigmoid(3) = 0.95: every shared channel starts (almost) fully open
# Gates are sigmoid(GATE_SCALE * parameter): Adam moves a parameter by about the learning
# rate per step, so unscaled logits could not travel from open to closed within a run
# (measured: mean gate 0.95 -> 0.92 in 450 steps even under a strong L1 penalty).
GATE_SCALE = 10.0


def _reset(module: nn.Module) -> None:
    """Fresh random weights (and batch-norm statistics) for a copied block."""
    for sub in module.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()


class BranchedSegNet(nn.Module):
    """Shared SegNet trunk + per-task gates and private decoder blocks; see the module doc."""

    def __init__(self, tasks: Sequence[Task], in_channels: int = 3, width: int = 16,
                 branches: dict[str, int] | None = None) -> None:
        super().__init__()
        names = [t.name for t in tasks]
        if branches is not None:
            unknown = sorted(set(branches) - set(names))
            missing = [n for n in names if n not in branches]
            bad = {k: v for k, v in branches.items() if not (isinstance(v, int) and 0 <= v <= BLOCKS)}
            if unknown or missing or bad:
                raise ValueError(f"branches must give every task ({', '.join(names)}) a point "
                                 f"0..{BLOCKS}; got {branches}")
        self.task_names = names
        self.fixed = dict(branches) if branches is not None else None
        self.trunk = SegNet(tasks, in_channels, width)
        self.sampling = False                    # supernet training: random point per forward
        self.override: dict[str, int] = {}      # branch-point search: try one point
        self.last_points: dict[str, int] = {}   # what the last forward used (gate penalty)
        points = self.fixed or {n: None for n in names}
        gate_channels = self.trunk.decoder_channels()
        self.gates = nn.ModuleDict()
        self.private = nn.ModuleDict()
        for name in names:
            options = range(BLOCKS + 1) if points[name] is None else [points[name]]
            self.gates[name] = nn.ParameterDict({
                str(b): nn.Parameter(torch.full((gate_channels[b],), GATE_INIT / GATE_SCALE))
                for b in options})
            blocks = nn.ModuleDict()
            for k in range(min(options) + 1, BLOCKS + 1):
                blocks[f"dec{k}"] = copy.deepcopy(getattr(self.trunk, f"dec{k}"))
                _reset(blocks[f"dec{k}"])
            self.private[name] = blocks
        deepest = max((b for b in points.values() if b is not None), default=BLOCKS)
        for k in range(deepest + 1, BLOCKS + 1):  # shared blocks that no task reads are dropped
            setattr(self.trunk, f"dec{k}", None)
        if self.fixed is None:  # chosen points, -1 = not chosen yet; saved with the weights
            self.register_buffer("choice", torch.full((len(names),), -1, dtype=torch.long))

    # --- branch points -------------------------------------------------------------------

    def branch_point(self, task: str) -> int:
        """Where ``task`` branches out in the next forward pass."""
        if self.fixed is not None:
            return self.fixed[task]
        if task in self.override:
            return self.override[task]
        chosen = int(self.choice[self.task_names.index(task)])
        if chosen >= 0:
            return chosen
        if self.sampling and self.training:
            return int(torch.randint(0, BLOCKS + 1, ()))
        return BLOCKS

    def chosen(self) -> dict[str, int] | None:
        """The fixed or chosen branch point per task, or None while not all are chosen."""
        if self.fixed is not None:
            return dict(self.fixed)
        values = [int(v) for v in self.choice]
        return None if min(values) < 0 else dict(zip(self.task_names, values, strict=True))

    def choose(self, points: dict[str, int]) -> None:
        """Fix the branch points of a supernet (kept in its state, so resume keeps them)."""
        if self.fixed is not None:
            raise ValueError("this network's branch points are fixed at construction")
        for name, b in points.items():
            self.choice[self.task_names.index(name)] = b

    @contextmanager
    def trying(self, points: dict[str, int]) -> Iterator[None]:
        """Temporarily use ``points`` (for the branch-point search)."""
        saved = self.override
        self.override = {**saved, **points}
        try:
            yield
        finally:
            self.override = saved

    def gate(self, task: str, point: int) -> Tensor:
        """Channel gates in [0, 1] of ``task`` on the shared features at ``point``."""
        return torch.sigmoid(GATE_SCALE * self.gates[task][str(point)])

    def used_gates(self) -> list[Tensor]:
        """The gate vectors that the last forward pass used (one per task)."""
        return [self.gate(name, b) for name, b in self.last_points.items()]

    # --- forward -----------------------------------------------------------------------

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ValueError(f"sbm-segnet needs an input size divisible by 8, got "
                             f"{tuple(x.shape[-2:])}")
        feats, indices = self.trunk.encode(x)
        points = {name: self.branch_point(name) for name in self.task_names}
        self.last_points = points
        shared = [feats]
        for k in range(1, max(points.values()) + 1):
            shared.append(self.trunk.decode_block(k, shared[-1], indices))
        out = {}
        for name, b in points.items():
            h = shared[b] * self.gate(name, b).view(1, -1, 1, 1)
            for k in range(b + 1, BLOCKS + 1):
                h = self.private[name][f"dec{k}"](h, indices[k - 1])
            out[name] = self.trunk.heads[name](h)
        return out

    # --- building from teachers ----------------------------------------------------------

    def load_teacher_trunk(self, teacher: SegNet) -> None:
        """Copy a SegNet teacher's encoder and decoder into the shared trunk."""
        for i in range(1, 5):
            getattr(self.trunk, f"enc{i}").load_state_dict(getattr(teacher, f"enc{i}").state_dict())
        for k in range(1, BLOCKS + 1):
            block = getattr(self.trunk, f"dec{k}")
            if block is not None:
                block.load_state_dict(getattr(teacher, f"dec{k}").state_dict())

    def load_teacher_branch(self, task: str, teacher: SegNet, teacher_task: str) -> None:
        """Copy a SegNet teacher's decoder into ``task``'s private blocks, and its head."""
        for key, block in self.private[task].items():
            block.load_state_dict(getattr(teacher, key).state_dict())
        self.trunk.heads[task].load_state_dict(teacher.heads[teacher_task].state_dict())

    def pruned_state(self, branches: dict[str, int]) -> dict[str, Tensor]:
        """This supernet's weights restricted to what a network with ``branches`` holds."""
        keys = self.pruned_keys(branches)
        return {k: v for k, v in self.state_dict().items() if k in keys}

    def pruned_keys(self, branches: dict[str, int]) -> set[str]:
        """State keys of the network with fixed ``branches``."""
        keep = set()
        for key in self.state_dict():
            parts = key.split(".")
            if parts[0] == "choice":
                continue
            if parts[0] == "trunk" and parts[1].startswith("dec"):
                if int(parts[1][3:]) > max(branches.values()):
                    continue
            elif parts[0] == "gates":
                if int(parts[2]) != branches[parts[1]]:
                    continue
            elif parts[0] == "private":
                if int(parts[2][3:]) <= branches[parts[1]]:
                    continue
            keep.add(key)
        return keep


def build_sbm_segnet(tasks: Sequence[Task], in_channels: int = 3, width: int = 16,
                     branches: dict[str, int] | None = None) -> BranchedSegNet:
    """Builder registered as ``sbm-segnet``."""
    return BranchedSegNet(tasks, in_channels, width, branches)


SBM_SEGNET = Architecture(
    build_sbm_segnet, ("trunk.enc1", "trunk.enc2", "trunk.enc3", "trunk.enc4"), head=None,
    multi_task=True,
    description="SBM student: shared SegNet trunk, per-task channel gates and branch points "
                "(branches={task: 0..3}; none = the supernet sbm trains)")
