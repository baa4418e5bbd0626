"""Progress on stderr: training epochs with images/s and ETAs, and long preparation loops
(teacher-cache filling, teacher calibration).

On a terminal a bar rewrites one line (at most ~10 times a second); when stderr is not a
terminal (CI logs, files) each epoch or loop prints one line when it ends; ``--quiet``
prints nothing. Only the main process of a distributed run shows progress. Values shown
come from the caller (losses are read only at the logging interval), so drawing the bar
never synchronises the GPU.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import Any, TextIO

_WIDTH = 20  # characters of the bar
_REDRAW = 0.1  # seconds between redraws on a terminal


class _Settings:
    enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn progress output on or off for this process (``--quiet``, non-main processes)."""
    _Settings.enabled = enabled


def format_duration(seconds: float) -> str:
    """``75`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _bar(done: int, total: int) -> str:
    filled = int(_WIDTH * done / total) if total else _WIDTH
    return "[" + "#" * filled + "-" * (_WIDTH - filled) + "]"


class _Line:
    """Where progress goes: one rewritten line on a terminal, whole lines otherwise."""

    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = _Settings.enabled if enabled is None else enabled
        self.tty = self.stream.isatty()
        self._drawn = 0.0

    def draw(self, text: str, force: bool = False) -> None:
        if not (self.enabled and self.tty):
            return
        now = time.perf_counter()
        if force or now - self._drawn >= _REDRAW:
            self._drawn = now
            print(f"\r{text[:150]:<150}", end="", file=self.stream, flush=True)

    def finish(self, text: str) -> None:
        if self.enabled:
            print(("\r" if self.tty else "") + f"{text:<150}".rstrip(), file=self.stream, flush=True)


class EpochProgress:
    """The training bar: ``[stage] epoch e/E [####----] b/B  N img/s  loss L  ETA epoch
    m:ss, run m:ss``. The run's ETA covers the remaining epochs of the current stage
    (later stages of a multi-stage algorithm are not known in advance)."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.line = _Line(enabled, stream)
        self.enabled = self.line.enabled

    def start_epoch(self, stage: str, epoch: int, epochs: int, steps: int, first: int,
                    batch_size: int) -> None:
        """An epoch begins at batch ``first`` (after a mid-epoch resume: not 0)."""
        self.stage, self.epoch, self.epochs, self.steps = stage, epoch, epochs, steps
        self.first, self.batch_size = first, batch_size
        self.started = time.perf_counter()
        self.done, self.loss = first, None

    def _rates(self) -> tuple[float, float, float]:
        """(images/s, seconds left in the epoch, seconds left in the stage)."""
        elapsed = time.perf_counter() - self.started
        done = self.done - self.first
        if done <= 0 or elapsed <= 0:
            return 0.0, float("nan"), float("nan")
        per_step = elapsed / done
        epoch_left = per_step * (self.steps - self.done)
        return (done * self.batch_size / elapsed, epoch_left,
                epoch_left + per_step * self.steps * (self.epochs - self.epoch - 1))

    def step(self, index: int, loss: float | None = None) -> None:
        """Batch ``index`` (0-based) is done; ``loss`` when it was read (logging interval)."""
        self.done = index + 1
        if loss is not None:
            self.loss = loss
        if not self.line.tty or not self.enabled:
            return
        rate, epoch_left, run_left = self._rates()
        loss_text = f"  loss {self.loss:.4f}" if self.loss is not None else ""
        eta = (f"  ETA epoch {format_duration(epoch_left)}, run {format_duration(run_left)}"
               if epoch_left == epoch_left else "")
        self.line.draw(f"[{self.stage}] epoch {self.epoch + 1}/{self.epochs} "
                       f"{_bar(self.done, self.steps)} {self.done}/{self.steps}  "
                       f"{rate:,.0f} img/s{loss_text}{eta}", force=self.done == self.steps)

    def end_epoch(self, summary: str) -> None:
        """One line for the finished epoch: its losses/eval, time, speed, the run's ETA."""
        rate, _, run_left = self._rates()
        elapsed = time.perf_counter() - self.started
        left = max(run_left, 0.0) if run_left == run_left else 0.0
        tail = f"{elapsed:.1f}s, {rate:,.0f} img/s"
        if self.epoch + 1 < self.epochs:
            tail += f", ETA run {format_duration(left)}"
        self.line.finish(f"[{self.stage}] epoch {self.epoch + 1}/{self.epochs} {summary} | {tail}")


def track(items: Iterable[Any], label: str, total: int | None = None,
          unit: str = "batches", stream: TextIO | None = None) -> Iterator[Any]:
    """Yield ``items`` while showing ``label`` with a bar and an ETA (``total`` items; taken
    from ``len(items)`` when possible). Used for teacher-cache filling and calibration."""
    line = _Line(stream=stream)
    if total is None:
        total = len(items) if isinstance(items, Sized) else None
    started = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        if line.tty and line.enabled:
            elapsed = time.perf_counter() - started
            if total:
                eta = format_duration(elapsed / done * (total - done))
                line.draw(f"{label} {_bar(done, total)} {done}/{total} {unit}  ETA {eta}",
                          force=done == total)
            else:
                line.draw(f"{label} {done} {unit}  {format_duration(elapsed)}")
    if done:
        line.finish(f"{label}: {done} {unit} in {time.perf_counter() - started:.1f}s")
