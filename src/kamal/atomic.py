"""Atomic file writes: a crash leaves either the old file or the new one, never half of one.

Used by model repos, checkpoints and the teacher cache; depends on nothing else in kamal.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Let ``write`` fill a temporary file beside ``path``, sync it, then rename it over
    ``path``: a crash leaves either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_save_tensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None,
                        ) -> None:
    """Write ``tensors`` as a safetensors file atomically. ``save_file`` streams the tensors
    to disk; building the file in memory first (``save``) would double peak memory."""
    from safetensors.torch import save_file

    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
