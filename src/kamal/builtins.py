"""kamal's own components, registered through the same hooks as any plugin.

Every target is a lazy ``"module:attr"`` string, so loading this plugin imports no torch.
"""

from __future__ import annotations

from .hookspecs import Register, hookimpl


@hookimpl
def register_amalgamators(register: Register) -> None:
    """The multi-teacher KD baseline."""
    register("kd", "kamal.algorithms.kd:KDAmalgamator")


@hookimpl
def register_tasks(register: Register) -> None:
    """Classification, and the dense tasks segmentation and depth."""
    register("classification", "kamal.tasks.classification:ClassificationTask")
    register("segmentation", "kamal.tasks.dense:SegmentationTask")
    register("depth", "kamal.tasks.dense:DepthTask")


@hookimpl
def register_architectures(register: Register) -> None:
    """Small CNNs, torchvision classifiers and a small SegNet for dense tasks."""
    register("small-cnn", "kamal.models.small:SMALL_CNN")
    register("small-vgg", "kamal.models.small:SMALL_VGG")
    for name in ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small"):
        register(name, f"kamal.models.torchvision_models:{name.upper()}")
    register("timm", "kamal.models.timm_models:TIMM")
    register("torchvision", "kamal.models.torchvision_models:TORCHVISION")
    register("segnet", "kamal.models.segnet:SEGNET")


@hookimpl
def register_loggers(register: Register) -> None:
    """metrics.jsonl (always on) and TensorBoard event files (kamal-core[tensorboard])."""
    register("jsonl", "kamal.loggers:JsonlLogger")
    register("tensorboard", "kamal.loggers:TensorBoardLogger")


@hookimpl
def register_teacher_formats(register: Register) -> None:
    """Model repos of kamal, timm, torchvision and transformers (safetensors only, never
    remote code)."""
    register("kamal", "kamal.formats:KamalFormat")
    register("timm", "kamal.formats:TimmFormat")
    register("torchvision", "kamal.formats:TorchvisionFormat")
    register("transformers", "kamal.formats:TransformersFormat")


@hookimpl
def register_datasets(register: Register) -> None:
    """Digits (shipped with scikit-learn), procedural scenes, image folders, paired image/mask/depth
    folders and torchvision datasets on disk."""
    register("digits", "kamal.data.digits:build_digits")
    register("image-folder", "kamal.data.folders:build_image_folder")
    register("torchvision", "kamal.data.folders:build_torchvision")
    register("scenes", "kamal.data.scenes:build_scenes")
    register("paired-folder", "kamal.data.paired:build_paired_folder")
