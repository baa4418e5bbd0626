"""Loading a safetensors file into a built network without holding the weights twice.

``load_file`` + ``load_state_dict`` keeps a second full copy of the weights until the copy
is done (2x the weights at peak). :func:`load_weights` reads one tensor at a time from the
memory-mapped file straight into the network's parameters and buffers, so the peak is the
network plus its largest tensor (the figure: docs/benchmarks.md, "Teacher loading").
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import ModelRepoError


def load_weights(module: nn.Module, path: str | Path, what: str) -> None:
    """Copy every tensor of the safetensors file ``path`` into ``module`` (strict: the names
    and shapes must match its ``state_dict``); ``what`` names the network in errors."""
    from safetensors import SafetensorError, safe_open

    targets = module.state_dict(keep_vars=True)
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            problem = _mismatch(targets, shapes)
            if problem:
                raise ModelRepoError(f"weights in {Path(path).parent} do not match {what}: "
                                     f"{problem}")
            with torch.no_grad():
                for key in shapes:
                    target = targets[key]
                    target.copy_(handle.get_tensor(key).to(dtype=target.dtype))
    except (SafetensorError, OSError) as exc:
        raise ModelRepoError(f"{path} is not a readable safetensors file: {exc}") from None


def _mismatch(targets: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> str:
    missing = sorted(set(targets) - set(shapes))
    unexpected = sorted(set(shapes) - set(targets))
    wrong = [f"{k} {shapes[k]} != {tuple(v.shape)}" for k, v in targets.items()
             if k in shapes and shapes[k] != tuple(v.shape)]
    return "; ".join(part for part in (
        f"missing: {', '.join(missing[:5])}" if missing else "",
        f"unexpected: {', '.join(unexpected[:5])}" if unexpected else "",
        f"wrong shape: {', '.join(wrong[:5])}" if wrong else "") if part)
