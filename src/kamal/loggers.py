"""Experiment tracking: the logger interface, the built-in ``jsonl`` and ``tensorboard``
loggers, and :class:`RunLoggers`, which calls every enabled logger and isolates failures.

The engine hands every ``metrics.jsonl`` record to :meth:`RunLoggers.record`; a logger gets
them as scalars named like the file's keys (``loss/kd/digits``, ``lr``), epoch means as
``epoch/loss/kd/digits`` and evaluations as ``eval/<task>/<metric>`` (e.g.
``eval/digits/top1``), always with the run's global step. Loggers are registered through
the ``register_loggers`` hook and chosen with ``train.loggers``; ``jsonl`` is always on.
Only the main process of a distributed run logs. A logger that raises is reported once
(one line) and disabled; training goes on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ALWAYS_ON = "jsonl"


class Logger:
    """One experiment tracker. Subclass it and override what your tracker records.

    kamal calls, in order: :meth:`start` once, then :meth:`log_scalars` (step losses every
    ``train.log_every`` steps, epoch means), :meth:`log_metrics` (each evaluation) and
    :meth:`log_figure` (figures a plugin logs) as the run goes, :meth:`log_report` with the
    final report, and :meth:`close`. The constructor takes no arguments.
    """

    name: str = "logger"

    @classmethod
    def check(cls) -> str | None:
        """Why this logger cannot run here (e.g. its package is missing), or None. Called
        when the run's config is read, so a run never trains for hours without its tracker."""
        return None

    def start(self, run_dir: Path, config: dict[str, Any], resumed_at: int | None) -> None:
        """The run begins: ``config`` is the resolved run config (``config.yaml``);
        ``resumed_at`` is the global step a ``--resume`` continues from (None: a new run)."""

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Losses and learning rate at global ``step``."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """An evaluation at global ``step``: ``{"eval/<task>/<metric>": value}``."""

    def log_figure(self, name: str, figure: Any, step: int) -> None:
        """A matplotlib figure a plugin chose to log (e.g. ``cfl/tsne``)."""

    def log_report(self, report: dict[str, Any], run_dir: Path) -> None:
        """The final report (``report.json``); the run folder holds the trained model."""

    def log_record(self, record: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` record; the default splits it into the calls above."""
        step = int(record.get("step", 0))
        event = record.get("event")
        if event == "eval":
            self.log_metrics(flatten_eval(record.get("metrics", {})), step)
        elif event == "epoch":
            scalars = {f"epoch/{k}": float(v) for k, v in record.items() if k.startswith("loss/")}
            if "seconds" in record:
                scalars["epoch/seconds"] = float(record["seconds"])
            self.log_scalars(scalars, step)
        elif event is None:
            self.log_scalars({k: float(v) for k, v in record.items()
                              if k == "lr" or k.startswith("loss/")}, step)

    def close(self) -> None:
        """Flush and release files or connections."""


def flatten_eval(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{task: {metric: v}}`` -> ``{"eval/task/metric": v}``."""
    return {f"eval/{task}/{name}": float(value) for task, values in metrics.items()
            for name, value in values.items() if isinstance(value, int | float)}


class JsonlLogger(Logger):
    """``metrics.jsonl`` in the run folder: every record as one JSON line (always on)."""

    name = "jsonl"

    def start(self, run_dir: Path, config: dict[str, Any], resumed_at: int | None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"

    def log_record(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


class TensorBoardLogger(Logger):
    """TensorBoard event files in ``<run>/tensorboard`` (needs ``kamal-core[tensorboard]``).

    A resumed run writes to the same folder with ``purge_step`` = the resumed step + 1, so
    TensorBoard hides anything a crashed session logged after its last checkpoint: the
    curves continue without duplicated or missing steps.
    """

    name = "tensorboard"

    @classmethod
    def check(cls) -> str | None:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            return "the tensorboard package is not installed: pip install 'kamal-core[tensorboard]'"
        return None

    def start(self, run_dir: Path, config: dict[str, Any], resumed_at: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = resumed_at + 1 if resumed_at is not None else None
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)
        if resumed_at is None:
            import yaml

            self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False)
                                 + "```", 0)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.log_scalars(metrics, step)

    def log_figure(self, name: str, figure: Any, step: int) -> None:
        self.writer.add_figure(name, figure, step, close=False)

    def log_report(self, report: dict[str, Any], run_dir: Path) -> None:
        self.writer.add_text("report", "```json\n" + json.dumps(report, indent=2) + "\n```")

    def close(self) -> None:
        self.writer.close()


class RunLoggers:
    """Every enabled logger of one run; the engine and the run path talk only to this.

    Not main process (``enabled=False``): nothing is created and every call is a no-op.
    """

    def __init__(self, names: list[str] | None = None, *, enabled: bool = True) -> None:
        self.loggers: list[Logger] = []
        self.step = 0
        self._started = False
        if not enabled:
            return
        from .errors import ConfigError, RegistryError
        from .plugins import get_registry

        registry = get_registry()
        for name in [ALWAYS_ON, *[n for n in names or [] if n != ALWAYS_ON]]:
            try:
                cls = registry.get("loggers", name)
            except RegistryError as exc:
                raise ConfigError(f"train.loggers: {exc}") from None
            problem = cls.check()
            if problem:
                raise ConfigError(f"train.loggers: logger '{name}' cannot run: {problem}")
            logger = cls()
            logger.name = name
            self.loggers.append(logger)

    @property
    def names(self) -> list[str]:
        """The loggers still enabled."""
        return [logger.name for logger in self.loggers]

    def start(self, run_dir: Path, config: dict[str, Any], resumed_at: int | None = None) -> None:
        """Start every logger (once; later calls do nothing)."""
        if self._started:
            return
        self._started = True
        self.step = resumed_at or 0
        self._each("start", Path(run_dir), config, resumed_at)

    def record(self, record: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` record, to every logger."""
        self.step = int(record.get("step", self.step))
        self._each("log_record", record)

    def figure(self, name: str, figure: Any, step: int | None = None) -> None:
        """A matplotlib figure, to every logger (at the last logged step by default)."""
        self._each("log_figure", name, figure, self.step if step is None else step)

    def report(self, report: dict[str, Any], run_dir: Path) -> None:
        """The final report, to every logger."""
        self._each("log_report", report, Path(run_dir))

    def close(self) -> None:
        """Close every logger."""
        self._each("close")
        self.loggers = []

    def _each(self, method: str, *args: Any) -> None:
        for logger in list(self.loggers):
            try:
                getattr(logger, method)(*args)
            except Exception as exc:  # a tracker must never stop training
                if logger.name == ALWAYS_ON:
                    raise
                self.loggers.remove(logger)
                print(f"kamal: logger '{logger.name}' failed in {method} ({type(exc).__name__}: "
                      f"{exc}); it is disabled, training goes on", file=sys.stderr)
