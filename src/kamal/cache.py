"""Teacher-output cache: frozen teachers are a function of the input, so their outputs and
tapped features on an image are computed once and reused every epoch.

Without random augmentation a row is a transfer image. With stored views
(``train.teacher_cache_views: K``, the idea of FKD, Shen & Xing, ECCV 2022) row ``i * K + k``
is image ``i`` under its ``k``-th recorded random augmentation: each epoch the student reads
one of them, re-created from its numbers, so its targets are exact and the augmentation real.

Each teacher has its own **entry**, filled by running that teacher alone (peak memory: one
teacher, not all of them) and addressed by its content: the sha256 of the teacher's weights,
the pixels it reads (its view), the tapped layers, the data's fingerprint, the recorded
augmentations and the stored precision. ``memory`` keeps each entry's ``(rows, ...)``
tensors in RAM; ``disk`` writes them as safetensors shards under ``teacher_cache/<key>/``
and memory-maps them, so a run (or ``--resume``) reuses exactly the entries whose key is
unchanged and recomputes the rest, saying so in the log. ``auto`` picks memory when the
estimated size fits the budget, else disk, and is off under random augmentation unless the
views are stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .atomic import atomic_save_tensors, atomic_write_bytes
from .data.base import tensor_digest
from .errors import ConfigError

log = logging.getLogger(__name__)

# one teacher's ({task: output}, {layer: feature}) for a batch of the rows it reads
EntryFn = Callable[[Tensor], tuple[dict[str, Tensor], dict[str, Tensor]]]
# numpy has no bfloat16: its bits are mapped as uint16 and viewed as bfloat16 by torch
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "U8": np.uint8, "BOOL": np.bool_}
STORED_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}
SHARD_ROWS = 4096


def choose_mode(requested: str, augmented: bool, estimated_bytes: int, budget_bytes: int) -> str:
    """Resolve ``auto`` and refuse a cache of live augmented data (``augmented``: random
    augmentation whose views are not stored)."""
    if requested != "off" and augmented:
        if requested == "auto":
            return "off"
        raise ConfigError(f"train.teacher_cache: '{requested}' needs transfer data without random "
                          "augmentation (teacher outputs would change every epoch), or the "
                          "augmented views stored (train.teacher_cache_views: K); set it to auto "
                          "or off, or disable the augmentation")
    if requested == "auto":
        return "memory" if estimated_bytes <= budget_bytes else "disk"
    return requested


@dataclass
class CacheEntry:
    """What one teacher's entry is computed from: ``rows`` (a dataset whose items are the
    images that teacher reads, one per cache row) and ``run`` (that teacher alone on a batch
    of them), addressed by ``key`` (:func:`entry_key`)."""

    name: str
    key: str
    rows: Dataset
    run: EntryFn
    logits: frozenset[str] = frozenset()  # outputs that are class logits (top-k may apply)
    done: Callable[[], None] | None = None  # called once the entry is filled or reused


class TeacherCache:
    """Outputs and features of every teacher for every row, stored in ``dtype`` (floating
    values; read back as float32). ``views`` holds the recorded augmentations ``(N, K, P)``
    when the rows are stored views."""

    def __init__(self, mode: str, folder: Path | None = None,
                 dtype: torch.dtype = torch.float32, views: Tensor | None = None,
                 topk: int = 0) -> None:
        self.mode = mode
        self.folder = folder
        self.dtype = dtype
        self.views = views
        self.topk = topk  # keep only the k largest of each row of class logits (0: all)
        self.entries: list[dict[str, Any]] = []  # per teacher: key -> (rows, ...) tensor/memmap
        self.bfloat16: list[set[str]] = []  # per teacher: disk keys whose uint16 bits are bf16
        self.recomputed: list[str] = []  # teachers whose entry was computed by this run
        self.reused: list[str] = []  # teachers whose entry was found on disk

    @property
    def nbytes(self) -> int:
        """Size of the cached values."""
        return sum(int(v.nbytes) for entry in self.entries for v in entry.values())

    def build(self, entries: Sequence[CacheEntry], batch_size: int, workers: int = 0) -> None:
        """Fill each teacher's entry, one teacher at a time (``workers`` DataLoader processes
        decode its images), or reuse it from disk when an entry with the same key is there;
        entries of other keys are removed."""
        for entry in entries:
            folder = self.folder / entry.key if self.mode == "disk" and self.folder else None
            found = _load_disk(folder) if folder is not None else None
            if found is None:
                found = self._fill(entry, folder, batch_size, workers)
            else:
                self.reused.append(entry.name)
            self.entries.append(found[0])
            self.bfloat16.append(found[1])
            if entry.done is not None:
                entry.done()
        if self.mode == "disk" and self.folder is not None:
            keep = {entry.key for entry in entries}
            for stale in self.folder.iterdir():
                if stale.is_dir() and stale.name not in keep:
                    shutil.rmtree(stale, ignore_errors=True)
        if self.recomputed and self.reused:
            log.info("teacher cache: recomputed %d of %d entries (%s: teacher, data or views "
                     "changed), reused %d", len(self.recomputed), len(entries),
                     ", ".join(self.recomputed), len(self.reused))
        elif self.reused:
            log.info("teacher cache: reused all %d entries from %s", len(entries), self.folder)

    def _fill(self, entry: CacheEntry, folder: Path | None, batch_size: int,
              workers: int) -> tuple[dict[str, Any], set[str]]:
        """Run ``entry``'s teacher over its rows: the stored tensors and the names stored
        as bfloat16 (read from disk again when the entry is on disk)."""
        from .progress import track

        loader = DataLoader(entry.rows, batch_size=batch_size, shuffle=False,
                            num_workers=workers)
        chunks = _Chunks(folder, self.dtype)
        for images in track(loader, f"filling the teacher cache ({self.mode}): {entry.name}"):
            chunks.add(keep_topk(_flatten(*entry.run(images)), entry.logits, self.topk))
        self.recomputed.append(entry.name)
        if folder is None:
            return chunks.tensors(), set()
        chunks.finish(entry.key)
        found = _load_disk(folder)
        assert found is not None
        return found

    def lookup(self, rows: Tensor, device: torch.device
               ) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
        """Cached ``(outputs, features)`` per teacher for the cache ``rows``."""
        idx = rows.cpu()
        outputs: list[dict[str, Tensor]] = []
        features: list[dict[str, Tensor]] = []
        for entry, bfloat16 in zip(self.entries, self.bfloat16, strict=True):
            if self.mode == "memory":
                flat = {k: v[idx].to(device, non_blocking=True) for k, v in entry.items()}
            else:
                picked = idx.numpy()
                flat = {k: _from_disk(np.ascontiguousarray(m[picked]), k in bfloat16).to(device)
                        for k, m in entry.items()}
            if self.dtype != torch.float32:
                flat = {k: v.float() if v.is_floating_point() else v for k, v in flat.items()}
            out, feat = _unflatten(expand_topk(flat))
            outputs.append(out)
            features.append(feat)
        return outputs, features


class _Chunks:
    """One entry's values as they are computed: in memory, or written in shards to disk."""

    def __init__(self, folder: Path | None, dtype: torch.dtype) -> None:
        self.folder, self.dtype = folder, dtype
        self.pending: dict[str, list[Tensor]] = {}
        self.rows = self.start = 0
        self.shards: list[dict[str, Any]] = []
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)  # a half-written entry is never read
            folder.mkdir(parents=True)

    def add(self, flat: dict[str, Tensor]) -> None:
        for key, value in flat.items():
            value = value.detach()
            if value.is_floating_point() and not key.endswith("/lse"):  # top-k's stays fp32
                value = value.to(self.dtype)
            self.pending.setdefault(key, []).append(value.cpu())
        self.rows += int(next(iter(flat.values())).shape[0])
        if self.folder is not None and self.rows >= SHARD_ROWS:
            self._write()

    def tensors(self) -> dict[str, Tensor]:
        return {k: torch.cat(v) for k, v in self.pending.items()}

    def finish(self, key: str) -> None:
        """The last shard, then the index that marks the entry complete."""
        assert self.folder is not None
        if self.pending:
            self._write()
        atomic_write_bytes(self.folder / "index.json",
                           json.dumps({"key": key, "shards": self.shards}).encode())

    def _write(self) -> None:
        assert self.folder is not None
        name = f"shard-{len(self.shards):05d}.safetensors"
        atomic_save_tensors(self.folder / name, {k: torch.cat(v).contiguous()
                                                 for k, v in self.pending.items()})
        self.shards.append({"file": name, "start": self.start, "rows": self.rows})
        self.start, self.rows, self.pending = self.start + self.rows, 0, {}


def _load_disk(folder: Path) -> tuple[dict[str, Any], set[str]] | None:
    """A complete entry's memory-mapped values, or ``None`` (none there, or half-written)."""
    index_file = folder / "index.json"
    if not index_file.exists():
        return None
    index = json.loads(index_file.read_text())
    per_key: dict[str, list[np.ndarray]] = {}
    bfloat16: set[str] = set()
    for shard in index["shards"]:
        arrays, bf16 = _memmap_safetensors(folder / shard["file"])
        bfloat16 |= bf16
        for key, array in arrays.items():
            per_key.setdefault(key, []).append(array)
    # one shard is the common case; several are concatenated lazily via an index
    return {k: v[0] if len(v) == 1 else _Concat(v) for k, v in per_key.items()}, bfloat16


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


def stored_bytes(outputs: dict[str, Tensor], features: dict[str, Tensor],
                 logits: frozenset[str], topk: int, dtype: torch.dtype) -> int:
    """Bytes one teacher's ``outputs`` and ``features`` take in the cache (floating values in
    ``dtype``, top-k rows as kept)."""
    return sum(v.numel() * (dtype.itemsize if v.is_floating_point() and not k.endswith("/lse")
                            else v.element_size())
               for k, v in keep_topk(_flatten(outputs, features), logits, topk).items())


def keep_topk(flat: dict[str, Tensor], logits: frozenset[str], k: int) -> dict[str, Tensor]:
    """Rows of class logits (outputs named in ``logits`` with more than ``k`` classes) as
    their ``k`` largest values, those classes and the row's log-sum-exp, under
    ``topk<C>/<name>/...`` (FuseLLM keeps top-k distributions the same way)."""
    if not k:
        return flat
    kept: dict[str, Tensor] = {}
    for key, value in flat.items():
        name = key.split("/", 1)[1]
        if key.startswith("out/") and name in logits and value.dim() == 2 and value.shape[1] > k:
            classes = int(value.shape[1])
            top = value.float().topk(k, dim=1)
            index_dtype = torch.int16 if classes <= 2**15 else torch.int32
            prefix = f"topk{classes}/{name}"
            kept[f"{prefix}/values"] = top.values
            kept[f"{prefix}/indices"] = top.indices.to(index_dtype)
            kept[f"{prefix}/lse"] = value.float().logsumexp(1, keepdim=True)
        else:
            kept[key] = value
    return kept


def expand_topk(flat: dict[str, Tensor]) -> dict[str, Tensor]:
    """Full rows of logits from :func:`keep_topk`'s: the kept classes at their values, every
    other class at the value that spreads the rest of the probability evenly, so the kept
    classes' probabilities and the row's log-sum-exp are exactly the teacher's."""
    full = {k: v for k, v in flat.items() if not k.startswith("topk")}
    for key in flat:
        if not (key.startswith("topk") and key.endswith("/values")):
            continue
        prefix = key[:-len("/values")]
        classes, name = int(prefix.split("/", 1)[0][4:]), prefix.split("/", 1)[1]
        values, lse = flat[key].float(), flat[f"{prefix}/lse"].float()
        kept_mass = (values - lse).exp().sum(1, keepdim=True)
        rest = (1 - kept_mass).clamp_min(1e-30) / (classes - values.shape[1])
        row = (lse + rest.log()).expand(-1, classes).clone()
        full[f"out/{name}"] = row.scatter_(1, flat[f"{prefix}/indices"].long(), values)
    return full


def _flatten(outputs: dict[str, Tensor], features: dict[str, Tensor]) -> dict[str, Tensor]:
    return {**{f"out/{k}": v for k, v in outputs.items()},
            **{f"feat/{k}": v for k, v in features.items()}}


def _unflatten(flat: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    outputs: dict[str, Tensor] = {}
    features: dict[str, Tensor] = {}
    for key, value in flat.items():
        kind, name = key.split("/", 1)
        (outputs if kind == "out" else features)[name] = value
    return outputs, features


def teacher_digest(teacher: Any) -> str:
    """sha256 of a teacher's weights: its source's digest of the weights file, else of its
    parameters and buffers as loaded."""
    known = getattr(teacher, "source", {}).get("sha256")
    if known:
        return str(known)
    return hashlib.sha256("".join(f"{name}:{tensor_digest(value)}" for name, value in
                                  teacher.model.state_dict().items()).encode()).hexdigest()


def entry_key(teacher: Any, layers: Sequence[str], data: str, views: Tensor | None,
              extra: str) -> str:
    """The content address of one teacher's entry: its weights, the pixels it reads, the
    tapped ``layers``, the ``data`` fingerprint, the recorded augmentations ``views`` and
    ``extra`` (stored precision, output size, process shard)."""
    parts = [teacher_digest(teacher), repr(teacher.input_spec.view), ",".join(layers), data,
             extra]
    if views is not None:
        parts.append(tensor_digest(views))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]
