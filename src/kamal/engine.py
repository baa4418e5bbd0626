"""The training loop shared by every algorithm and by supervised training.

One :class:`Trainer` owns: device placement, the optimizer and LR schedule, seeding,
``metrics.jsonl``, per-epoch evaluation, atomic ``latest``/``best`` checkpoints, resume
(bit-exact on CPU: 2 epochs == 1 epoch + resume 1 epoch), the non-finite-loss stop and a
clean Ctrl-C. What a step computes comes from ``step_fn``; algorithms never copy this loop.

Under torchrun the same loop runs in every process (see :mod:`kamal.distributed`): each
process trains on its own shard with ``batch_size / processes`` samples per step, gradients
are averaged after every backward pass, losses are reduced at the end of an epoch, and
only the main process evaluates and writes. Stop requests and non-finite losses are
agreed on in the gradient collective, so every process stops at the same step.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import shutil
import signal
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import distributed
from .checkpoint import load_state, rng_state, save_state, seed_everything, set_rng_state
from .config import TrainConfig
from .data.transforms import ViewBatch
from .errors import ConfigError, Interrupted, KamalError, NonFiniteLossError
from .loggers import RunLoggers
from .progress import EpochProgress

StepFn = Callable[[Any, "StepInfo"], dict[str, Tensor]]
Evaluator = Callable[[], dict[str, dict[str, float]]]


@dataclass(frozen=True)
class StepInfo:
    """Where the loop is: stage name, epoch (0-based) and global step."""

    stage: str
    epoch: int
    step: int


@dataclass(frozen=True)
class Objective:
    """What to select the ``best`` checkpoint by: ``metrics[task][metric]``."""

    task: str
    metric: str
    higher_is_better: bool = True

    @classmethod
    def of(cls, model: Any) -> Objective:
        """The primary metric of a model's first task."""
        task = model.tasks[0]
        return cls(task.name, task.primary_metric, task.higher_is_better)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KamalError(f"train.device is '{name}' but CUDA is not available; use auto or cpu")
    if device.type == "cuda" and device.index is None and distributed.world_size() > 1:
        device = torch.device("cuda", distributed.local_rank())  # one GPU per process
    return device


def _make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, lr: float | None):
    opt = cfg.optimizer
    lr = lr or opt.lr
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=opt.weight_decay)


# loss sums stay on the device in float64 (as the Python floats they replace); MPS has none
_ACCUMULATE = {"mps": torch.float32}
_DIVERGED = 100.0  # weights this many times their norm at the stage's start: diverged


class _StopFlag:
    """Turns SIGINT into a flag checked between steps, so a step is never half-applied."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    """Runs ``step_fn`` over ``dataset`` for ``cfg.epochs`` with checkpoints and evaluation.

    ``modules`` are all trainable modules by name (``"student"`` first); their state is
    checkpointed. ``fit`` may be called several times with different ``stage`` names
    (multi-stage algorithms); a resumed run skips stages already completed.

    In a distributed run ``output_dir`` (where algorithms may write extra files) is the run
    folder only in the main process; the others get a private scratch folder, deleted with
    the trainer, so an algorithm that writes files needs no distributed code. ``device`` is
    where the modules live; ``cfg`` is the run's ``train`` section.

    Records go to ``metrics.jsonl`` and every logger of ``cfg.loggers`` (started here with
    ``run_config``, or pass started ``loggers``); plugins log figures with :meth:`log_figure`.
    """

    output_dir: Path
    device: torch.device
    cfg: TrainConfig
    global_step: int  # optimiser steps taken so far (all stages); the next step's number

    def __init__(self, *, modules: dict[str, nn.Module], dataset: Dataset, step_fn: StepFn,
                 cfg: TrainConfig, output_dir: str | Path, device: torch.device,
                 evaluator: Evaluator | None = None, objective: Objective | None = None,
                 resume: bool = False, progress: bool = True,
                 interrupt_after_steps: int | None = None, loggers: RunLoggers | None = None,
                 run_config: dict[str, Any] | None = None,
                 loading: dict[str, Any] | None = None,
                 during_fit: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
                 ) -> None:
        self.modules = modules
        # entered around each stage's training (the run frees the teachers' weights there)
        self.during_fit = during_fit or contextlib.nullcontext
        # DataLoader keywords for the training data (workers, pinned memory): see
        # kamal.data.loading.loader_options
        self.loading = dict(loading or {})
        # for tests: behave as if Ctrl-C arrived after this many steps of this session
        self.interrupt_after_steps = interrupt_after_steps
        self._session_steps = 0
        self.first_step_time: float | None = None  # perf_counter() when this session's first step ended
        self._start_norm = math.inf
        self.samples = dataset  # every training sample; ``dataset`` is what fit() trains on
        self.dataset: Dataset = dataset
        self.step_fn = step_fn
        self.cfg = cfg
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.is_main = self.rank == 0
        self.checkpoint_dir = Path(output_dir) / "checkpoints"
        self.output_dir = Path(output_dir) if self.is_main else self._scratch_folder()
        progress = progress and self.is_main
        self.device = device
        check_precision(cfg.precision, device)
        self.evaluator = evaluator
        self.objective = objective
        self.progress = EpochProgress(progress)
        self.global_step = 0
        self._watch = _FiniteWatch()
        self._scaler: torch.amp.GradScaler | None = None  # fp16's, made per stage by fit
        self.completed_stages: list[str] = []
        self.best: dict[str, Any] = {}
        self.last_eval: dict[str, dict[str, float]] = {}
        self._resume_state: dict[str, Any] | None = None
        for module in modules.values():
            module.to(device)
        state = self._load_latest() if resume else None
        for module in modules.values():
            distributed.broadcast_module(module)
        if state is not None:
            self._restore_own_buffers(state)
        self.loggers = loggers if loggers is not None else RunLoggers(cfg.loggers, enabled=self.is_main)
        self.loggers.start(self.output_dir, run_config or {"train": cfg.model_dump()},
                           self.global_step if resume else None)

    def _scratch_folder(self) -> Path:
        folder = Path(tempfile.mkdtemp(prefix=f"kamal-rank{self.rank}-"))
        weakref.finalize(self, shutil.rmtree, folder, True)
        return folder

    # --- public ---------------------------------------------------------------------

    @property
    def latest_path(self) -> Path:
        """``checkpoints/latest.safetensors``."""
        return self.checkpoint_dir / "latest.safetensors"

    @property
    def best_path(self) -> Path:
        """``checkpoints/best.safetensors`` (by the objective on eval data)."""
        return self.checkpoint_dir / "best.safetensors"

    @property
    def num_samples(self) -> int:
        """Number of training samples (held-out ones included)."""
        return len(self.samples)  # type: ignore[arg-type]

    def log_figure(self, name: str, figure: Any) -> None:
        """Log a matplotlib figure (e.g. ``"cfl/tsne"``) to every logger that records figures
        (TensorBoard, MLflow, ...), at the current step. Only the main process logs; the
        figure is not closed."""
        self.loggers.figure(name, figure, self.global_step)

    def hold_out(self, indices: Sequence[int]) -> None:
        """Train only on the samples not in ``indices`` from the next :meth:`fit` on.

        Indices are positions in the whole training data (``0 .. num_samples - 1``); the
        held-out samples stay reachable through :meth:`images` (e.g. to choose between
        candidates on images the student never trained on).
        """
        held = set(indices)
        self.dataset = Subset(self.samples, [i for i in range(self.num_samples) if i not in held])

    def images(self, indices: Sequence[int], seed: int | None = None) -> Tensor | ViewBatch:
        """The images of samples ``indices`` stacked on the CPU (a
        :class:`~kamal.data.transforms.ViewBatch` when the models read different views).
        With ``seed``, any random augmentation is drawn from that seed, leaving the training
        random state untouched."""
        def image(index: int) -> Tensor | ViewBatch:
            fetch = getattr(self.samples, "image", None)  # views whose items are not images
            return fetch(index) if fetch is not None else self.samples[index][0]

        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            images = [image(i) for i in indices]
        views = [x for x in images if isinstance(x, ViewBatch)]
        if views:
            return ViewBatch.stack(views)
        return torch.stack([x for x in images if isinstance(x, Tensor)])

    def fit(self, stage: str = "main", epochs: int | None = None,
            parameters: Iterable[nn.Parameter] | None = None, lr: float | None = None) -> None:
        """Train one stage. ``parameters`` defaults to every trainable parameter."""
        if stage in self.completed_stages:
            return
        with self.during_fit():
            self._fit(stage, epochs, parameters, lr)

    def _fit(self, stage: str, epochs: int | None, parameters: Iterable[nn.Parameter] | None,
             lr: float | None) -> None:
        epochs = epochs or self.cfg.epochs
        params = [p for p in (parameters if parameters is not None else self._all_parameters())
                  if p.requires_grad]
        if not params:
            raise KamalError(f"stage '{stage}' has no trainable parameters")
        state = self._resume_state if (self._resume_state or {}).get("stage") == stage else None
        # each process draws its own random numbers; process 0 matches a single-process run
        rank_offset = 1_000_003 * self.rank
        if state is None:
            seed_everything(self.cfg.seed + 7919 * len(self.completed_stages) + rank_offset)
        elif state["batch"] == 0:
            set_rng_state(self._own_rng(state))
        loader_gen = torch.Generator()
        batch_size = distributed.check_global_batch(self.cfg.batch_size)
        loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=True,
                            generator=loader_gen, drop_last=len(self.dataset) > batch_size,
                            **self.loading)
        steps = distributed.all_reduce_min(len(loader))  # equal step counts: nobody waits forever
        if steps == 0:
            raise KamalError("the training data is empty")
        optimizer = _make_optimizer(params, self.cfg, lr)
        self._start_norm = self._weight_norm()  # to tell a diverged optimisation from a bad loss
        total = epochs * steps
        scheduler = None
        if self.cfg.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
        # fp16's gradients underflow without a scale; bf16 keeps fp32's exponent range
        self._scaler = (torch.amp.GradScaler(self.device.type)
                        if self.cfg.precision == "fp16" else None)
        start_epoch, skip_batches = 0, 0
        if state is not None:
            if self._scaler is not None and state.get("scaler"):
                self._scaler.load_state_dict(state["scaler"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state["scheduler"] is not None:
                scheduler.load_state_dict(state["scheduler"])
            start_epoch, skip_batches = state["epoch"], state["batch"]
            self._resume_state = None
            self._log({"event": "resumed", "stage": stage, "epoch": start_epoch,
                       "batch": skip_batches, "step": self.global_step})
        with _StopFlag() as stop:
            for epoch in range(start_epoch, epochs):
                loader_gen.manual_seed(self.cfg.seed * 100003 + epoch + 7919 * len(self.completed_stages)
                                       + rank_offset)
                self._run_epoch(stage, epoch, epochs, loader, steps, optimizer, scheduler,
                                skip_batches, stop, state)
                skip_batches, state = 0, None
        self.completed_stages.append(stage)
        self._save_latest(stage, epochs, 0, None, None)

    # --- the loop ---------------------------------------------------------------------

    def _all_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters()]

    def _run_epoch(self, stage, epoch, epochs, loader, steps, optimizer, scheduler, skip, stop,
                   state):
        for module in self.modules.values():
            module.train()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        sums: dict[str, Tensor] = {}  # on the device: read once per epoch, no per-step sync
        count, started = 0, time.perf_counter()
        if skip and state is not None:  # the resumed epoch's mean covers its first part too
            partial = self._own(state, "epoch_sums") or {"sums": {}, "count": 0}
            sums = {k: torch.tensor(v, dtype=_ACCUMULATE.get(self.device.type, torch.float64),
                                    device=self.device) for k, v in partial["sums"].items()}
            count = partial["count"]
        self.progress.start_epoch(stage, epoch, epochs, steps, skip, self.cfg.batch_size)
        for index, data in enumerate(loader):
            if index >= steps:
                break
            if index < skip:
                if index == skip - 1 and state is not None:
                    set_rng_state(self._own_rng(state))  # skipped batches drew augmentation noise
                continue
            info = StepInfo(stage, epoch, self.global_step)
            with self._autocast():
                losses = self.step_fn(self._to_device(data), info)
            if not losses:
                raise KamalError("the algorithm returned no losses")
            if self._check_finite_now(info.step):
                self._raise_if_nonfinite()  # the steps watched on the device since the last check
                bad = self._first_nonfinite(losses)
                if bad is not None and self.world == 1:
                    raise self._nonfinite_error(bad, losses[bad], info)
            else:  # an accelerator: note it on the device, read at the next check
                bad = None
                self._watch.note(losses, info)
            total = functools.reduce(operator.add, losses.values())
            optimizer.zero_grad(set_to_none=True)
            if bad is None:
                scaled = self._scaler.scale(total) if self._scaler is not None else total
                scaled.backward()
            self._session_steps += 1
            if self.first_step_time is None:
                self.first_step_time = time.perf_counter()
            if self._session_steps == self.interrupt_after_steps:
                stop.requested = True
            halt = stop.requested
            if self.world > 1:  # a request arriving after this collective waits for the next step
                halt, bad_anywhere = distributed.sync_gradients(params, [stop.requested, bad is not None])
                if bad_anywhere:
                    raise self._nonfinite_error(bad, losses.get(bad or ""), info)
            if self._scaler is not None:
                self._scaler.unscale_(optimizer)  # clip the true gradients
            if self.cfg.grad_clip:
                nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            if self._scaler is not None:
                self._scaler.step(optimizer)  # skips a step whose gradients overflowed
                self._scaler.update()
            else:
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            self.global_step += 1
            for k, v in losses.items():
                value = v.detach().to(_ACCUMULATE.get(v.device.type, torch.float64))
                sums[k] = sums[k] + value if k in sums else value
            count += 1
            shown = None
            if self.global_step % self.cfg.log_every == 0:  # the only read of the losses
                values = {k: float(v.detach()) for k, v in losses.items()}
                shown = sum(values.values())
                self._log({"stage": stage, "epoch": epoch, "step": self.global_step,
                           "lr": optimizer.param_groups[0]["lr"],
                           **{f"loss/{k}": v for k, v in values.items()}})
            self.progress.step(index, shown)
            if halt:
                self._raise_if_nonfinite()  # never checkpoint weights a NaN step reached
                self._save_latest(stage, epoch, index + 1, optimizer, scheduler,
                                  {"sums": {k: float(v) for k, v in sums.items()}, "count": count})
                raise Interrupted(f"interrupted; saved {self.latest_path}. Continue with --resume")
        self._raise_if_nonfinite()
        means = self._epoch_means(sums, count)
        record = {"stage": stage, "epoch": epoch, "step": self.global_step, "event": "epoch",
                  "seconds": round(time.perf_counter() - started, 3),
                  **{f"loss/{k}": v for k, v in means.items()}}
        if self.world > 1:
            record["processes"] = self.world
            for module in self.modules.values():
                distributed.average_buffers(module)
        self._log(record)
        summary = " ".join(f"{k}={v:.4f}" for k, v in means.items())
        if self.evaluator is not None and self.is_main:
            self.last_eval = self.evaluator()
            for module in self.modules.values():
                module.train()
            self._log({"stage": stage, "epoch": epoch, "step": self.global_step, "event": "eval",
                       "metrics": self.last_eval})
            score = self._score(self.last_eval)
            if score is not None:
                summary += f" | eval {self.objective.task}.{self.objective.metric}={score:.4f}"
                previous = self.best.get("value")
                if previous is None or (score > previous if self.objective.higher_is_better
                                        else score < previous):
                    self.best = {"value": score, "stage": stage, "epoch": epoch}
                    self._save_weights(self.best_path)
        self.progress.end_epoch(summary)
        self._save_latest(stage, epoch + 1, 0, optimizer, scheduler)

    def _to_device(self, data: Any) -> Any:
        if isinstance(data, Tensor):
            return data.to(self.device, non_blocking=True)
        if isinstance(data, list | tuple):
            return type(data)(self._to_device(d) for d in data)
        return data

    def _autocast(self) -> Any:
        """The step's autocast context (a no-op in fp32)."""
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _check_finite_now(self, step: int) -> bool:
        """Whether this step's losses are checked before the update. On a CPU (where reading
        a value costs nothing) and in distributed runs (which agree on it anyway) every step;
        on an accelerator only at the logging interval, so the loop never waits on the device
        per step -- the steps between are watched on the device (:class:`_FiniteWatch`)."""
        mode = self.cfg.check_finite
        if mode == "auto":
            mode = "every-step" if self.device.type == "cpu" else "log-interval"
        return mode == "every-step" or self.world > 1 or (step + 1) % self.cfg.log_every == 0

    def _raise_if_nonfinite(self) -> None:
        """Raise for a non-finite loss the device-side watch saw (one read)."""
        seen = self._watch.first()
        if seen is not None:
            name, info = seen
            raise self._nonfinite_error(name, None, info, deferred=True)

    @staticmethod
    def _first_nonfinite(losses: dict[str, Tensor]) -> str | None:
        return next((name for name, value in losses.items() if not torch.isfinite(value).all()),
                    None)

    def _nonfinite_error(self, name: str | None, value: Tensor | None,
                         info: StepInfo, deferred: bool = False) -> NonFiniteLossError:
        if deferred:  # seen by the device-side watch: that step already updated the weights
            what = (f"loss '{name}' became non-finite at one of steps {info.step + 1}.."
                    f"{self.global_step} (checked every train.log_every steps)")
        elif name is not None and value is not None:
            what = f"loss '{name}' became {float(value.detach())}"
        else:
            what = "a loss became non-finite in another process"
        norm = self._weight_norm()
        term = f"the algorithm's loss term '{name}'" if name else "the algorithm's loss"
        if deferred:
            cause = (f"{term} or a diverging optimisation; the weights were updated since, so "
                     "rerun the stage with train.check_finite: every-step to see the first "
                     "step and whether the weights grew before it")
        elif not math.isfinite(norm) or norm > _DIVERGED * self._start_norm:
            cause = (f"the weights grew from norm {self._start_norm:.3g} to {norm:.3g} since the "
                     "stage began, so the optimisation diverged: lower train.optimizer.lr or set "
                     "train.grad_clip")
        elif info.step == 0:
            cause = (f"it happened on the first step, with the initial weights, so {term} is the "
                     "likely cause (its settings or the data it receives), not the optimisation")
        else:
            cause = (f"the weights are still finite, so {term} produced it; if the losses grew "
                     "in the steps before, the optimisation is the likely cause: lower "
                     "train.optimizer.lr or set train.grad_clip")
        if self.latest_path.exists():
            where = (f"The last good checkpoint is {self.latest_path}: fix the cause, then continue "
                     "with --resume (or start again in a new --output).")
        else:
            where = "No checkpoint had been written yet: fix the cause, then run again."
        return NonFiniteLossError(
            f"{what} at stage '{info.stage}', epoch {info.epoch + 1}, step {info.step + 1}; "
            f"training stopped. Likely cause: {cause}. {where}")

    def _weight_norm(self) -> float:
        with torch.no_grad():
            return math.sqrt(sum(float(p.detach().double().pow(2).sum())
                                 for p in self._all_parameters()))

    def _epoch_means(self, sums: dict[str, Tensor], count: int) -> dict[str, float]:
        """Mean of each loss over the epoch's steps of every process."""
        names = sorted(sums)
        totals = torch.tensor([float(sums[k]) for k in names] + [float(count)], dtype=torch.float64)
        distributed.all_reduce_sum(totals)
        return {k: float(v) / max(float(totals[-1]), 1.0) for k, v in zip(names, totals.tolist(),
                                                                             strict=False)}

    def _score(self, metrics: dict[str, dict[str, float]]) -> float | None:
        if self.objective is None:
            return None
        return metrics.get(self.objective.task, {}).get(self.objective.metric)

    # --- state ----------------------------------------------------------------------

    def _weights(self) -> dict[str, Any]:
        return {name: module.state_dict() for name, module in self.modules.items()}

    def _save_weights(self, path: Path) -> None:
        if self.is_main:
            save_state(path, {"modules": self._weights(), "best": self.best})

    def _save_latest(self, stage, epoch, batch, optimizer, scheduler,
                     epoch_sums: dict[str, Any] | None = None) -> None:
        # what differs between processes: random state, and mid-epoch the BatchNorm statistics
        # and the loss sums of the epoch so far
        by_process = (distributed.all_gather_object({"rng": rng_state(), "buffers": self._buffers(),
                                                     "epoch_sums": epoch_sums})
                      if self.world > 1 else None)
        if not self.is_main:
            return
        save_state(self.latest_path, {
            "stage": stage, "epoch": epoch, "batch": batch, "global_step": self.global_step,
            "completed_stages": self.completed_stages, "best": self.best,
            "last_eval": self.last_eval, "modules": self._weights(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(), "processes": self.world, "by_process": by_process,
            "epoch_sums": epoch_sums,
            "scaler": (self._scaler.state_dict() if self._scaler is not None
                       and optimizer is not None else None),
        })

    def _load_latest(self) -> dict[str, Any]:
        if not self.latest_path.exists():
            raise KamalError(f"--resume: no checkpoint at {self.latest_path}; run without --resume")
        state = load_state(self.latest_path)
        written_by = state.get("processes", 1)
        if state["batch"] and written_by != self.world:
            raise KamalError(f"--resume: the checkpoint was written in the middle of an epoch by "
                             f"{written_by} process(es); resume it with the same number of "
                             f"processes (now {self.world})")
        self.load_modules(state["modules"])
        self.global_step = state["global_step"]
        self.completed_stages = list(state["completed_stages"])
        self.best = state["best"] or {}
        self.last_eval = state["last_eval"] or {}
        if state["optimizer"] is not None:
            self._resume_state = state
        return state

    def _buffers(self) -> dict[str, dict[str, Tensor]]:
        return {name: {k: v.detach().cpu() for k, v in module.named_buffers() if v.is_floating_point()}
                for name, module in self.modules.items()}

    def _restore_own_buffers(self, state: dict[str, Any]) -> None:
        by_process = state.get("by_process")
        if not by_process or len(by_process) != self.world:
            return
        with torch.no_grad():
            for name, buffers in by_process[self.rank]["buffers"].items():
                own = dict(self.modules[name].named_buffers())
                for key, value in buffers.items():
                    own[key].copy_(value)

    def _own_rng(self, state: dict[str, Any]) -> dict[str, Any]:
        """This process's saved random state (the main one's if the process count changed)."""
        return self._own(state, "rng")

    def _own(self, state: dict[str, Any], key: str) -> Any:
        """This process's saved ``key`` (the main one's if the process count changed; None in
        checkpoints written before the key existed)."""
        by_process = state.get("by_process")
        if by_process and len(by_process) == self.world:
            return by_process[self.rank].get(key)
        return state.get(key)

    def load_modules(self, weights: dict[str, dict[str, Tensor]]) -> None:
        """Load module weights saved by this trainer (e.g. the best checkpoint)."""
        for name, module in self.modules.items():
            if name not in weights:
                raise KamalError(f"checkpoint has no state for '{name}'; it belongs to another run")
            module.load_state_dict(weights[name])

    def _log(self, record: dict[str, Any]) -> None:
        self.loggers.record(record)  # metrics.jsonl and every logger; nothing outside the main process


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot train in, saying what would work."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.precision: fp16 needs a CUDA device (its gradient scaler); "
                          f"on {device.type} use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision: this GPU has no bfloat16 support; use fp16 or fp32")


class _FiniteWatch:
    """Non-finite losses noted on the device between checks (no read, so no wait), and read
    in one go at the next check: the first loss name and the first step watched."""

    def __init__(self) -> None:
        self.flags: dict[str, Tensor] = {}
        self.since: StepInfo | None = None

    def note(self, losses: dict[str, Tensor], info: StepInfo) -> None:
        self.since = self.since or info
        for name, value in losses.items():
            bad = ~torch.isfinite(value.detach()).all()
            self.flags[name] = self.flags[name] | bad if name in self.flags else bad

    def first(self) -> tuple[str, StepInfo] | None:
        flags, since = self.flags, self.since
        self.flags, self.since = {}, None
        if not flags or since is None:
            return None
        seen = torch.stack(list(flags.values())).cpu()  # the one read
        return next(((name, since) for name, bad in zip(flags, seen.tolist(), strict=True)
                     if bad), None)
