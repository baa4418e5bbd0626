"""Teacher-output cache: frozen teachers are a function of the input, so without random
augmentation their outputs and tapped features are computed once and reused every epoch.

``memory`` keeps one ``(N, ...)`` tensor per output/feature in RAM; ``disk`` writes
safetensors shards into the run folder and memory-maps them on read (reused by
``--resume`` when the teachers, layers and data are unchanged). ``auto`` picks memory
when the estimated size fits the budget, else disk, and is off with random augmentation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .atomic import atomic_save_tensors
from .errors import ConfigError

# teacher index -> ({task: output}, {layer: feature}) for a batch of images
TeacherFn = Callable[[Tensor], tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]]
# numpy has no bfloat16: its bits are mapped as uint16 and viewed as bfloat16 by torch
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}
STORED_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}


def choose_mode(requested: str, augmented: bool, estimated_bytes: int, budget_bytes: int) -> str:
    """Resolve ``auto`` and refuse a cache on randomly augmented data."""
    if requested != "off" and augmented:
        if requested == "auto":
            return "off"
        raise ConfigError(f"train.teacher_cache: '{requested}' needs transfer data without random "
                          "augmentation (teacher outputs would change every epoch); set it to "
                          "auto or off, or disable the augmentation")
    if requested == "auto":
        return "memory" if estimated_bytes <= budget_bytes else "disk"
    return requested


class TeacherCache:
    """Outputs and features of every teacher for every sample index of the transfer data,
    stored in ``dtype`` (floating values; read back as float32)."""

    def __init__(self, mode: str, folder: Path | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.mode = mode
        self.folder = folder
        self.dtype = dtype
        self._bfloat16: set[str] = set()  # disk keys whose uint16 bits are bfloat16
        self.keys: list[str] = []
        self.tensors: dict[str, Tensor] = {}  # memory mode: key -> (N, ...)
        self._maps: dict[str, np.ndarray] = {}  # disk mode: key -> memmap (N, ...)

    @property
    def nbytes(self) -> int:
        """Size of the cached values."""
        if self.mode == "memory":
            return sum(t.numel() * t.element_size() for t in self.tensors.values())
        return sum(m.nbytes for m in self._maps.values())

    def build(self, dataset: Dataset, run_teachers: TeacherFn, batch_size: int,
              fingerprint: str) -> None:
        """Compute every sample's teacher outputs once (or reuse a matching disk cache)."""
        if self.mode == "disk" and self._load_disk(fingerprint):
            return
        chunks: dict[str, list[Tensor]] = {}
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        shard_rows, shards, start = 0, [], 0
        from .progress import track

        for images in track(loader, f"filling the teacher cache ({self.mode})"):
            flat = _flatten(*run_teachers(images))
            for key, value in flat.items():
                value = value.detach()
                if value.is_floating_point():
                    value = value.to(self.dtype)
                chunks.setdefault(key, []).append(value.cpu())
            # a batch is a tensor, or a tuple with one tensor per view
            shard_rows += int((images if isinstance(images, Tensor) else images[0]).shape[0])
            if self.mode == "disk" and shard_rows >= 4096:
                shards.append(self._write_shard(len(shards), chunks, start))
                start, shard_rows, chunks = start + shard_rows, 0, {}
        if self.mode == "memory":
            self.tensors = {k: torch.cat(v) for k, v in chunks.items()}
            self.keys = list(self.tensors)
            return
        if chunks:
            shards.append(self._write_shard(len(shards), chunks, start))
        assert self.folder is not None
        (self.folder / "index.json").write_text(json.dumps(
            {"fingerprint": fingerprint, "shards": shards}))
        self._load_disk(fingerprint)

    def lookup(self, indices: Tensor, device: torch.device
               ) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
        """Cached ``(outputs, features)`` per teacher for the samples ``indices``."""
        idx = indices.cpu()
        if self.mode == "memory":
            flat = {k: v[idx].to(device, non_blocking=True) for k, v in self.tensors.items()}
        else:
            rows = idx.numpy()
            flat = {k: _from_disk(np.ascontiguousarray(m[rows]), k in self._bfloat16).to(device)
                    for k, m in self._maps.items()}
        if self.dtype != torch.float32:
            flat = {k: v.float() if v.is_floating_point() else v for k, v in flat.items()}
        return _unflatten(flat)

    # --- disk shards -------------------------------------------------------------------

    def _write_shard(self, number: int, chunks: dict[str, list[Tensor]], start: int) -> dict:
        assert self.folder is not None
        name = f"shard-{number:05d}.safetensors"
        tensors = {k: torch.cat(v).contiguous() for k, v in chunks.items()}
        atomic_save_tensors(self.folder / name, tensors)
        rows = next(iter(tensors.values())).shape[0]
        return {"file": name, "start": start, "rows": rows}

    def _load_disk(self, fingerprint: str) -> bool:
        assert self.folder is not None
        index_file = self.folder / "index.json"
        if not index_file.exists():
            return False
        index = json.loads(index_file.read_text())
        if index.get("fingerprint") != fingerprint:
            return False
        per_key: dict[str, list[np.ndarray]] = {}
        for shard in index["shards"]:
            arrays, bfloat16 = _memmap_safetensors(self.folder / shard["file"])
            self._bfloat16 |= bfloat16
            for key, array in arrays.items():
                per_key.setdefault(key, []).append(array)
        # one shard is the common case; several are concatenated lazily via an index
        self._maps = {k: v[0] if len(v) == 1 else _Concat(v) for k, v in per_key.items()}
        self.keys = list(self._maps)
        return True


class _Concat:
    """Row indexing across several memory-mapped shards without loading them."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.nbytes = sum(p.nbytes for p in parts)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        return np.stack([self.parts[w][r - self.offsets[w]] for w, r in zip(which, rows,
                                                                             strict=True)])


def _from_disk(array: np.ndarray, bfloat16: bool) -> Tensor:
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if bfloat16 else tensor


def _memmap_safetensors(path: Path) -> tuple[dict[str, np.ndarray], set[str]]:
    """Memory-map every tensor of a safetensors file (the format is header + raw bytes), and
    the keys whose bits are bfloat16."""
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    base = 8 + header_len
    arrays, bfloat16 = {}, set()
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ConfigError(f"teacher cache: dtype {info['dtype']} cannot be memory-mapped")
        if info["dtype"] == "BF16":
            bfloat16.add(key)
        begin, _ = info["data_offsets"]
        arrays[key] = np.memmap(path, dtype=dtype, mode="r", offset=base + begin,
                                shape=tuple(info["shape"]))
    return arrays, bfloat16


def _flatten(outputs: Sequence[dict[str, Tensor]], features: Sequence[dict[str, Tensor]]
             ) -> dict[str, Tensor]:
    flat = {}
    for i, (out, feat) in enumerate(zip(outputs, features, strict=True)):
        flat.update({f"{i}/out/{k}": v for k, v in out.items()})
        flat.update({f"{i}/feat/{k}": v for k, v in feat.items()})
    return flat


def _unflatten(flat: dict[str, Tensor]) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    count = 1 + max(int(k.split("/", 1)[0]) for k in flat)
    outputs: list[dict[str, Tensor]] = [{} for _ in range(count)]
    features: list[dict[str, Tensor]] = [{} for _ in range(count)]
    for key, value in flat.items():
        i, kind, name = key.split("/", 2)
        (outputs if kind == "out" else features)[int(i)][name] = value
    return outputs, features


def fingerprint(teachers: Sequence[Any], layers: Sequence[Sequence[str]], dataset: Any,
                data_config: str) -> str:
    """Identifies what a disk cache holds: teacher weights, tapped layers, the data."""
    parts = [t.source.get("sha256", t.name) for t in teachers]
    parts += [repr(t.input_spec.view) for t in teachers]  # the pixels each teacher read
    parts += [",".join(x) for x in layers]
    parts += [data_config, str(len(dataset))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()
