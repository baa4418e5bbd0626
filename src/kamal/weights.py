"""Loading a safetensors file into a built network without holding the weights twice.

``load_file`` + ``load_state_dict`` keeps a second full copy of the weights until the copy
is done, and even reading tensor by tensor from ``safe_open`` leaves the file's pages mapped
into the process (2x the weights resident at peak). :func:`load_weights` parses the
safetensors layout itself (an 8-byte header length, a JSON header of dtypes, shapes and byte
offsets, then the raw little-endian data; nothing executable) and reads each tensor's bytes
straight into the network's own parameter or buffer, so the peak is the network itself
(the figure: docs/benchmarks.md, "Teacher loading").
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from .errors import ModelRepoError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER = 100 * 2**20  # a header larger than this is not a weights file


def load_weights(module: nn.Module, path: str | Path, what: str) -> None:
    """Read every tensor of the safetensors file ``path`` into ``module`` (strict: the names
    and shapes must match its ``state_dict``); ``what`` names the network in errors."""
    path = Path(path)
    targets = module.state_dict(keep_vars=True)
    try:
        with open(path, "rb") as file:
            header, base = _header(file, path)
            problem = _mismatch(targets, {k: tuple(v["shape"]) for k, v in header.items()})
            if problem:
                raise ModelRepoError(f"weights in {path.parent} do not match {what}: {problem}")
            with torch.no_grad():
                for key, entry in header.items():
                    _read_tensor(file, base, entry, targets[key], path, key)
    except OSError as exc:
        raise ModelRepoError(f"{path} is not a readable safetensors file: {exc}") from None


def _header(file: BinaryIO, path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The tensors' entries and where their data starts; malformed headers are errors."""
    size = os.fstat(file.fileno()).st_size
    raw = file.read(8)
    length = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if not 0 < length <= min(MAX_HEADER, size - 8):
        raise ModelRepoError(f"{path} is not a readable safetensors file (bad header length)")
    try:
        header = json.loads(file.read(length))
    except ValueError:
        raise ModelRepoError(f"{path} is not a readable safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    data = size - 8 - length
    for key, entry in header.items():
        ok = isinstance(entry, dict) and entry.get("dtype") in DTYPES and isinstance(
            entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
        if ok:
            begin, end = entry["data_offsets"]
            count = 1
            for side in entry["shape"]:
                count *= int(side)
            itemsize = torch.empty(0, dtype=DTYPES[entry["dtype"]]).element_size()
            ok = 0 <= begin <= end <= data and end - begin == count * itemsize
        if not ok:
            raise ModelRepoError(f"{path}: the entry for '{key}' is malformed")
    return header, 8 + length


def _read_tensor(file: BinaryIO, base: int, entry: dict[str, Any], target: torch.Tensor,
                 path: Path, key: str) -> None:
    """Read one tensor's bytes into ``target`` (through a temporary only when the dtype,
    layout, device or byte order differ)."""
    begin, end = entry["data_offsets"]
    file.seek(base + begin)
    dtype = DTYPES[entry["dtype"]]
    direct = (dtype == target.dtype and target.is_contiguous() and target.device.type == "cpu"
              and sys.byteorder == "little")
    buffer = target if direct else torch.empty(tuple(entry["shape"]), dtype=dtype)
    flat = buffer.detach().reshape(-1).view(torch.uint8)
    if file.readinto(memoryview(flat.numpy())) != end - begin:
        raise ModelRepoError(f"{path}: '{key}' is cut short")
    if not direct:
        if sys.byteorder != "little":
            buffer = buffer.view(torch.uint8).view(-1, buffer.element_size()).flip(1).view(dtype)
        target.copy_(buffer.reshape(target.shape))


def _mismatch(targets: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> str:
    missing = sorted(set(targets) - set(shapes))
    unexpected = sorted(set(shapes) - set(targets))
    wrong = [f"{k} {shapes[k]} != {tuple(v.shape)}" for k, v in targets.items()
             if k in shapes and shapes[k] != tuple(v.shape)]
    return "; ".join(part for part in (
        f"missing: {', '.join(missing[:5])}" if missing else "",
        f"unexpected: {', '.join(unexpected[:5])}" if unexpected else "",
        f"wrong shape: {', '.join(wrong[:5])}" if wrong else "") if part)
