"""User-facing errors: each says what is wrong and how to fix it.

The CLI prints a :class:`KamalError` as one message (no traceback unless ``--debug``);
anything else escaping is a bug in kamal or a plugin.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KamalError(Exception):
    """Base class of errors caused by user input (config, files, names)."""


class ConfigError(KamalError):
    """A run or training config is invalid; the message names the key path."""


class RegistryError(KamalError):
    """An unknown or duplicated registered name (algorithm, task, architecture, dataset)."""


class ModelRepoError(KamalError):
    """A model repo (local folder or Hub repo) is missing, malformed or does not match."""


class NonFiniteLossError(KamalError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class Interrupted(KamalError):
    """Training stopped by Ctrl-C after saving a resumable checkpoint (``--resume`` continues)."""


def did_you_mean(value: str, allowed: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest allowed name, or ``""``."""
    matches = difflib.get_close_matches(str(value), list(allowed), n=1, cutoff=0.6)
    return f" Did you mean '{matches[0]}'?" if matches else ""
