"""Several processes, one run: PyTorch's distributed runtime, launched by ``torchrun``.

``torchrun --nproc-per-node=N -m kamal amalgamate CONFIG`` starts N copies of the command;
torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, rendezvous address) tells
each copy who it is. :func:`session` joins the process group (nccl on GPU, gloo on CPU) for
the length of a run. The engine then gives each process a fixed shard of the data
(:func:`shard`), averages gradients across processes after every backward pass
(:func:`sync_gradients`) and lets only the main process write. Everything here is a no-op
in a single process, so algorithms call these helpers unconditionally.

Every collective goes through :func:`_collective`, which turns the low-level error a
process gets when a peer dies into a :class:`DistributedError` that says what happened and
how to continue.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from .errors import ConfigError, KamalError

T = TypeVar("T")
TIMEOUT_ENV = "KAMAL_DIST_TIMEOUT"  # seconds a collective may wait for a stalled peer


class DistributedError(KamalError):
    """Another process of a distributed run failed, stalled or could not be reached."""


def launched() -> bool:
    """Whether this process was started by torchrun as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the run (1 without torchrun)."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    """This process's index in the run, 0 for the main process."""
    return dist.get_rank() if _active() else 0


def is_main_process() -> bool:
    """Only the main process writes checkpoints, logs, plots and the report."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its node (selects its GPU)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def _on_sigterm(signum: int, frame: Any) -> None:
    raise DistributedError(
        "stopped by the launcher (SIGTERM): torchrun ends every process when one fails; the "
        "failing process's error and torchrun's summary are above. Fix the cause, then run the "
        "same command with --resume to continue from the last checkpoint")


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Join torchrun's process group for the length of a run; nothing without torchrun.

    A caller that already initialised ``torch.distributed`` keeps its own group.
    """
    if not launched() or _active():
        yield
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - rendezvous raises many types
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise DistributedError(
            f"process {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE')} could not "
            f"join the distributed run at {where} ({_first_line(exc)}); start every process "
            "with torchrun and the same rendezvous options") from None
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(Exception):  # a dead peer must not turn an error into a hang
            dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    """The cause without gloo's source location and advice (our message gives better)."""
    lines = str(exc).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", lines[0] if lines else "")
    return text.split(". This is typically")[0][:300] or type(exc).__name__


def _collective(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as exc:
        raise DistributedError(
            f"process {rank()} of {world_size()} lost contact with the others during {what} "
            f"({_first_line(exc)}). Another process probably failed (its error is in its log) or "
            f"stalled longer than {TIMEOUT_ENV} seconds; fix that, then run the same command with "
            "--resume to continue from the last checkpoint") from None


def barrier() -> None:
    """Wait until every process gets here."""
    if world_size() > 1:
        _collective("a barrier", dist.barrier)


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` as the main process has it, on every process (e.g. a selection step's choice)."""
    if world_size() == 1:
        return obj
    box = [obj]
    _collective("a broadcast", dist.broadcast_object_list, box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """``obj`` of every process, in rank order."""
    if world_size() == 1:
        return [obj]
    boxes: list[Any] = [None] * world_size()
    _collective("gathering state", dist.all_gather_object, boxes, obj)
    return boxes


def all_reduce_sum(tensor: Tensor, what: str = "reducing metrics") -> Tensor:
    """Element-wise sum over processes, in place (and returned)."""
    if world_size() > 1:
        _collective(what, dist.all_reduce, tensor)
    return tensor


def all_reduce_min(value: int) -> int:
    """The smallest ``value`` any process has."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    _collective("agreeing on the step count", dist.all_reduce, tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def broadcast_module(module: nn.Module) -> None:
    """Copy the main process's parameters and buffers into every process's ``module``."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            _collective("copying the initial weights", dist.broadcast, tensor.data, src=0)


def average_buffers(module: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over processes."""
    world = world_size()
    if world == 1:
        return
    with torch.no_grad():
        for buffer in module.buffers():
            if buffer.is_floating_point():
                _collective("averaging BatchNorm statistics", dist.all_reduce, buffer.data)
                buffer.data.div_(world)


def sync_gradients(params: Sequence[nn.Parameter], flags: Sequence[bool]) -> list[bool]:
    """Average gradients over processes (what DistributedDataParallel's reducer computes).

    A parameter that got no gradient in a process counts as zero there (as DDP with
    ``find_unused_parameters``); one that got none anywhere keeps ``grad=None``, so the
    optimizer skips it exactly as in one process. ``flags`` ride along in the same
    collective and come back OR-ed over processes (stop requests, non-finite losses).
    """
    world = world_size()
    if world == 1:
        return list(flags)
    device = params[0].device if params else _collective_device()
    present = torch.tensor([p.grad is not None for p in params] + list(flags),
                           dtype=torch.float32, device=device)
    all_reduce_sum(present, "averaging gradients")
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for param, count in zip(params, present.tolist(), strict=False):
        if count > 0:
            by_dtype.setdefault(param.dtype, []).append(param)
    for group in by_dtype.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in group])
        all_reduce_sum(flat, "averaging gradients")
        flat.div_(world)
        offset = 0
        for param in group:
            param.grad = flat[offset:offset + param.numel()].view_as(param)
            offset += param.numel()
    return [count > 0 for count in present[len(params):].tolist()]


def check_global_batch(batch_size: int, key: str = "train.batch_size") -> int:
    """The per-process batch: ``batch_size`` is the global batch, split over processes."""
    world = world_size()
    if batch_size % world:
        nearest = max(world, batch_size - batch_size % world)
        raise ConfigError(f"{key} is {batch_size}, the global batch of all {world} processes; "
                          f"it must be divisible by {world}, e.g. {nearest}")
    return batch_size // world


def shard(dataset: Dataset, seed: int) -> Dataset:
    """This process's fixed share of ``dataset``: a seeded random partition into equal parts.

    The partition never changes between epochs (each process shuffles its part every
    epoch), so per-process teacher caches hold only their own part. Up to ``world - 1``
    samples are left out so that every process runs the same number of steps.
    """
    world = world_size()
    if world == 1:
        return dataset
    count = len(dataset)  # type: ignore[arg-type]
    per_process = count // world
    if per_process == 0:
        raise KamalError(f"{count} samples cannot be shared by {world} processes")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + 104729))
    mine = order[rank() * per_process:(rank() + 1) * per_process]
    return Subset(dataset, sorted(mine.tolist()))


__all__ = ["DistributedError", "session", "launched", "world_size", "rank", "is_main_process",
           "local_rank", "barrier", "broadcast_object", "all_gather_object", "all_reduce_sum",
           "all_reduce_min", "broadcast_module", "average_buffers", "sync_gradients",
           "check_global_batch", "shard"]
