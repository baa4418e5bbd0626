"""Typed run configs (pydantic): plain YAML data in, clear key-path errors out.

Relative paths in a config file are resolved against the folder of that file, so
``kamal amalgamate examples/digits/kd.yaml`` works from any working directory.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, did_you_mean


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherRef(_Strict):
    """One teacher: a local model repo (``path``) or a Hub repo (``hub`` + ``revision``)."""

    name: str | None = Field(None, description="Display name; defaults to the folder/repo name.")
    path: str | None = Field(None, description="Local model repo folder (relative to the config).")
    hub: str | None = Field(None, description="Hugging Face Hub repo id, e.g. org/name.")
    revision: str | None = Field(None, description="Hub branch, tag or commit sha.")
    format: str | None = Field(
        None, description="Teacher format (kamal, timm, torchvision, or a plugin's; kamal "
        "list-plugins): detected from the repo when omitted (timm needs kamal-core[timm]).")
    classes: list[str] | dict[int, str] | None = Field(
        None, description="Classifiers of other libraries (timm, torchvision): the classes of "
        "its task, by label or {index: name}.")
    rename: dict[str, str] | None = Field(
        None, description="Class names to change when the teacher is loaded, {its name: the "
        "name to merge as}: classes are matched across teachers by name, so two teachers that "
        "call one class differently (e.g. {seven: '7'}) merge it once renamed.")

    @model_validator(mode="after")
    def _one_source(self) -> TeacherRef:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' (local model repo) or 'hub' (org/name)")
        if self.revision is not None and self.hub is None:
            raise ValueError("'revision' only applies to 'hub' teachers")
        if self.classes is not None and self.format == "kamal":
            raise ValueError("'classes' does not apply to kamal repos (they name their classes)")
        return self

    @property
    def display_name(self) -> str:
        """``name``, or the last part of the path / repo id."""
        return self.name or Path(self.path or self.hub or "teacher").name


class StudentInput(_Strict):
    """How the student reads images. Unset fields default without regard to the teachers'
    order: size and transform are the teachers' when they all read images the same way, else
    the largest teacher size with the default transform (shorter side, centre, bilinear,
    tensor; squash when every dense teacher squashes); mean/std are the teachers' when they
    agree, else their per-channel average."""

    size: int | list[int] | None = Field(None, description="Input size: one side or "
                                         "[height, width].")
    mean: list[float] | None = Field(None, description="Normalisation mean (one value or one "
                                     "per channel).")
    std: list[float] | None = Field(None, description="Normalisation std (one value or one per "
                                    "channel).")
    resize: Literal["shorter", "squash"] | None = Field(
        None, description="shorter: the shorter side resized (aspect kept), then the centre "
        "crop; squash: both sides resized.")
    resize_to: list[int] | None = Field(None, description="Size before the centre crop: "
                                        "[side] for shorter, [height, width] for squash.")
    crop_pct: float | None = Field(None, gt=0, le=1, description="Or: the fraction of the "
                                   "resized image the centre crop keeps (timm's crop_pct).")
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] | None = (
        Field(None, description="Resampling filter (lanczos, box, hamming need backend pil)."))
    backend: Literal["pil", "tensor"] | None = Field(
        None, description="pil: PIL resampling (as timm); tensor: torchvision's antialiased "
        "tensor resize (as transformers).")


class StudentConfig(_Strict):
    """The student network."""

    architecture: str = Field(description="Registered architecture name (kamal list-plugins).")
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict,
                                                description="Options of the architecture.")
    task_names: dict[str, str] = Field(default_factory=dict,
                                       description="Name of the merged task per kind.")
    input: StudentInput = Field(default_factory=StudentInput,
                                description="How the student reads images (size, transform, "
                                "normalisation).")


class DataRef(BaseModel):
    """A dataset by registered name; other keys are the dataset's own options."""

    model_config = ConfigDict(extra="allow")
    dataset: str = Field(description="Registered dataset name, or family:variant.")
    split: str | None = Field(None, description="Split name (digits: train/transfer/test/all).")

    @property
    def options(self) -> dict[str, Any]:
        """The dataset-specific options."""
        return dict(self.model_extra or {})


class _Loading(_Strict):
    """How the training loop reads its data."""

    workers: int | Literal["auto"] = Field(
        "auto", description="DataLoader worker processes that decode and augment images beside "
        "the training step. auto: none for in-memory datasets (digits, scenes), else one per "
        "CPU core but one (at most 16). Batches are pinned in memory when the device is CUDA.")

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"workers must be 0 or more, or auto (got {value})")
        return value


class AmalgamationData(_Loading):
    """Data of an amalgamation: unlabeled transfer images and optional labeled eval data."""

    transfer: DataRef = Field(description="Unlabeled training images (labels are never read).")
    eval: DataRef | None = Field(None, description="Labeled evaluation data (metrics, report).")


class TrainingData(_Loading):
    """Data of a supervised training run."""

    train: DataRef = Field(description="Labeled training data.")
    eval: DataRef | None = Field(None, description="Labeled evaluation data.")


class OptimizerConfig(_Strict):
    """Optimizer of the student (and of an algorithm's trainable blocks)."""

    name: Literal["adam", "adamw", "sgd"] = Field("adam", description="Optimizer.")
    lr: float = Field(1e-3, gt=0, description="Learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")


class TrainConfig(_Strict):
    """The training loop."""

    epochs: int = Field(20, ge=1, description="Passes over the training data.")
    batch_size: int = Field(64, ge=1, description=(
        "Images per step, over all processes of a distributed run (each takes an equal share)."))
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: Literal["cosine", "none"] = Field("cosine", description="LR schedule over all steps.")
    seed: int = Field(0, description="Seeds initialisation, shuffling and augmentation.")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N.")
    log_every: int = Field(10, ge=1, description="Log the losses every N steps (to every logger).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Arithmetic of the training step (the student's and the teachers' "
        "forward, the losses) under autocast; weights, optimiser state and checkpoints stay "
        "fp32. bf16: CPUs and recent GPUs; fp16: CUDA only, with a gradient scaler.")
    check_finite: Literal["auto", "every-step", "log-interval"] = Field(
        "auto", description="When losses are checked for NaN/inf before the update: every step, "
        "or at the logging interval with the steps between watched on the device (the loop "
        "then never waits on an accelerator per step; a NaN step is reported at the next "
        "check, and no checkpoint is written after it). auto: every step on a CPU, at the "
        "logging interval on accelerators.")
    loggers: list[str] = Field(default_factory=list, description=(
        "Experiment trackers besides metrics.jsonl (always on): tensorboard "
        "(kamal-core[tensorboard]) or a plugin's, e.g. mlflow. See docs/tracking.md."))
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient norm.")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda", "mps") or (
                value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"unknown device '{value}'; use auto, cpu, cuda, cuda:N or mps")


class AmalgamationTrainConfig(TrainConfig):
    """The training loop of an amalgamation, and how its frozen teachers run."""

    teacher_cache: Literal["auto", "off", "memory", "disk"] = Field(
        "auto", description="Compute teacher outputs once and reuse them (on randomly augmented "
        "data only with teacher_cache_views). auto: memory if it fits the budget, else disk; "
        "off with augmentation unless the views are stored.")
    teacher_cache_views: int = Field(
        0, ge=0, description="Stored augmented views per transfer image (FKD): K random "
        "augmentations of each image are drawn once (from seed), the teachers' outputs on "
        "exactly those images cached, and each epoch the student trains on one of them, "
        "re-created from its recorded numbers. Needs randomly augmented transfer data (e.g. "
        "data.transfer.augment: true). 0: no stored views.")
    teacher_cache_budget_mb: float = Field(2048, gt=0, description="Memory budget of "
                                           "teacher_cache: auto, in MiB.")
    teacher_cache_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Precision the teacher cache stores outputs and features in "
        "(float16/bfloat16: half the memory or disk; read back as float32).")
    compile: bool = Field(
        False, description="torch.compile the student's forward (where the device and a "
        "compiler allow; otherwise, or when the algorithm taps student layers, the student "
        "runs eagerly and the log says why). Pays on GPUs over long runs: the first steps "
        "compile.")
    student_channels_last: bool = Field(
        False, description="Keep the student's weights and inputs in channels-last memory "
        "format (faster convolutions on recent GPUs, bf16/fp16 above all).")
    release_teachers: bool = Field(
        True, description="Free the teachers' weights while the student trains when the "
        "teacher cache holds everything they would compute (peak memory: the student and the "
        "cache, not every teacher); they are loaded again, and checked against their sha256, "
        "for the report.")
    teacher_cache_topk: int = Field(
        0, ge=0, description="Keep only the k largest logits of each cached row of class "
        "logits, with the row's log-sum-exp (for many classes: the cache shrinks by about "
        "classes / (1.5 k)); the kept classes' probabilities are exact, the rest share the "
        "remaining probability evenly. 0: every logit.")
    batch_teachers: Literal["auto", "on", "off"] = Field(
        "auto", description="Run same-architecture teachers as one vmapped call over their "
        "stacked weights. auto: only on devices where it was measured faster (none yet: "
        "slower on CPU; see docs/benchmarks.md).")
    teacher_channels_last: Literal["auto", "on", "off"] = Field(
        "auto", description="Run convolutional teachers in channels-last memory format. "
        "auto: on where measured faster (CPU).")
    calibration_images: int = Field(
        4096, ge=1, description="Transfer images the algorithm's setup (merge calibration, "
        "block sizing) reads: a fixed random sample when the transfer data is larger, so the "
        "teachers' work before the first step stays bounded.")

    @field_validator("teacher_cache", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @model_validator(mode="after")
    def _views_need_a_cache(self) -> AmalgamationTrainConfig:
        if self.teacher_cache_views and self.teacher_cache == "off":
            raise ValueError(f"teacher_cache_views: {self.teacher_cache_views} stores teacher "
                             "outputs, but teacher_cache is off; set teacher_cache to auto, "
                             "memory or disk, or teacher_cache_views to 0")
        return self

    @field_validator("batch_teachers", "teacher_channels_last", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        return ("on" if value else "off") if isinstance(value, bool) else value  # YAML 1.1


class AlgorithmRef(BaseModel):
    """``name`` of a registered amalgamator; other keys are its hyperparameters."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(description="Registered amalgamator (kamal list-plugins), e.g. kd.")


class RunConfig(_Strict):
    """``kamal amalgamate`` config."""

    teachers: list[TeacherRef] = Field(min_length=1, description="At least one teacher.")
    student: StudentConfig
    algorithm: AlgorithmRef
    data: AmalgamationData
    train: AmalgamationTrainConfig = Field(default_factory=AmalgamationTrainConfig)


class ModelSpec(_Strict):
    """The network trained by ``kamal train``."""

    architecture: str = Field(description="Registered architecture name.")
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict,
                                                description="Options of the architecture.")
    task: str = Field(description="Name of the task (its classes come from the training data).")
    classes: list[str] | None = Field(None, description="Train on these of the data's classes "
                                      "only (labels of the others are ignored); default: all.")
    task_kind: str = Field("classification", description="Registered task kind: "
                           "classification, segmentation, depth, or one a plugin adds.")
    mean: list[float] = Field(default_factory=lambda: [0.5],
                              description="Normalisation mean (one value or one per channel).")
    std: list[float] = Field(default_factory=lambda: [0.5],
                             description="Normalisation std (one value or one per channel).")


class TrainRunConfig(_Strict):
    """``kamal train`` config: plain supervised training of one model."""

    model: ModelSpec
    data: TrainingData
    train: TrainConfig = Field(default_factory=TrainConfig)


# --- loading -------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``safe_load`` (plain data only, never tags that run code)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got "
                          f"{type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a config mapping.

    List items are addressed by index: ``teachers.0.path=...``.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set '{item}': expected key.path=value")
        parts = key.split(".")
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set '{item}': '{'.'.join(parts[:depth])}' has no item "
                                      f"{part} (it has {len(node)})")
                index: Any = int(part)
            elif isinstance(node, dict):
                index = part
                if not last:
                    node.setdefault(part, {})
            else:
                raise ConfigError(f"--set '{item}': '{'.'.join(parts[:depth])}' is not a section")
            if last:
                node[index] = yaml.safe_load(raw) if raw else None
            else:
                node = node[index]
    return data


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) pydantic model found at ``loc``."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        if field is None:
            return []
        current = _unwrap(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                return _unwrap(arg)
    return annotation


def format_validation_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """One line per problem: ``key.path: message (got value)`` with a did-you-mean."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in (*([prefix] if prefix else []), *loc)) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1])
            hint = did_you_mean(str(loc[-1]), allowed)
            lines.append(f"{path}: unknown key.{hint} Allowed here: {', '.join(allowed)}")
            continue
        got = err.get("input")
        shown = "" if err["type"] == "missing" else f" (got {got!r})"
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {message}{shown}")
    return "\n".join(lines)


def validate(model: type[BaseModel], data: dict[str, Any], prefix: str = "") -> Any:
    """``model.model_validate(data)`` with errors turned into one :class:`ConfigError`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, prefix)) from None


def load_config(model: type[BaseModel], path: str | Path, overrides: list[str] | None = None):
    """Read, override and validate a config file; returns ``(config, base_dir)``.

    Relative paths in dataset options (:data:`PATH_OPTIONS`) are made absolute against the
    config file's folder, as teacher paths are, so a run does not depend on the working
    directory and its recorded ``config.yaml`` re-runs from anywhere.
    """
    data = apply_overrides(read_yaml(path), overrides or [])
    config, base = validate(model, data), Path(path).resolve().parent
    for ref in _data_refs(config):
        for key, value in ref.options.items():
            if key in PATH_OPTIONS and isinstance(value, str) and value and not Path(value).is_absolute():
                setattr(ref, key, str((base / value).resolve()))
    return config, base


# dataset options that name files or folders (resolved against the config file's folder)
PATH_OPTIONS = frozenset({"root"})


def _data_refs(config: BaseModel) -> list[DataRef]:
    data = getattr(config, "data", None)
    return [ref for ref in (getattr(data, name, None) for name in ("transfer", "train", "eval"))
            if isinstance(ref, DataRef)]


def reference_markdown(model: type[BaseModel], title: str) -> str:
    """A Markdown table of every key of ``model`` (nested sections flattened to key paths)."""
    rows: list[str] = []

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            path = f"{prefix}{name}"
            inner = _unwrap(field.annotation)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                rows.append(f"| `{path}` | section | {(inner.__doc__ or '').strip()} |")
                walk(inner, path + ".")
                continue
            default = "required" if field.is_required() else (
                repr(field.default_factory()) if field.default_factory is not None  # type: ignore[call-arg]
                else repr(field.default))
            kind = _type_name(field.annotation)
            description = (field.description or "").replace("|", "/")
            rows.append(f"| `{path}` | `{kind}`, default `{default}` | {description} |")

    walk(model, "")
    return "\n".join([f"### {title}", "", "| key | type / default | meaning |", "|---|---|---|",
                      *rows, ""])


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " / ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation)).replace("|", "or")
