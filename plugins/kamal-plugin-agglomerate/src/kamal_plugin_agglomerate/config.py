"""Hyperparameters of ``agglomerate`` (defaults: RADIO's losses, PHI-S balancing)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kamal import AmalgamatorConfig

from .balance import Balance


class TeacherLayers(BaseModel):
    """Which layers of one teacher are distilled (by module name; ':in' for a module's input)."""

    model_config = ConfigDict(extra="forbid")

    summary: str | None = Field(None, description="A layer giving one vector per image (the "
                                "pooled feature, a class token); a map is averaged.")
    spatial: str | None = Field(None, description="A layer giving a feature map or patch tokens.")


class AgglomerateConfig(AmalgamatorConfig):
    """Hyperparameters of ``agglomerate``.

    Per teacher, a summary vector and/or a feature map are distilled; by default the
    summary of a classifier is the pooled feature its head reads, the map of a dense model
    is its last feature layer, and a transformers backbone gives both (``pooled``,
    ``last_hidden_state``).
    """

    name: Literal["agglomerate"] = "agglomerate"
    backbone: str | None = Field(
        None, description="The student's tapped layer feeding the spatial adaptors (a map, or "
        "ViT tokens). Default: the backbone architecture's last feature layer that gives a map.")
    summary_layer: str | None = Field(
        None, description="The student's layer feeding the summary adaptors (pooled, or its "
        "class token). Default: the backbone layer.")
    teacher_layers: list[TeacherLayers] | None = Field(
        None, description="Per teacher, the layers to distil: [{summary: ..., spatial: ...}]. "
        "Default: chosen from each teacher (see above).")
    init: str | None = Field(
        None, description="Start the student's backbone from this teacher's weights (by its "
        "name; its network must be the backbone's architecture with the same options): every "
        "tensor of equal name and shape is copied. Default: random initialisation.")
    summary_weight: float = Field(1.0, ge=0, description="Weight of the summary loss (cosine).")
    spatial_weight: float = Field(1.0, ge=0, description="Weight of the spatial loss.")
    spatial_cosine: float = Field(0.9, ge=0, description="Spatial loss = this x (1 - cosine) "
                                  "per position + spatial_smooth_l1 x smooth-L1 (RADIO: 0.9).")
    spatial_smooth_l1: float = Field(0.1, ge=0, description="See spatial_cosine (RADIO: 0.1).")
    spatial_mse: float = Field(0.0, ge=0, description="Adds this x the mean squared error per "
                               "position to the spatial loss (PHI-S's setting: MSE alone).")
    output_weight: float = Field(
        1.0, ge=0, description="Weight of distilling each transplanted head's output (the "
        "teacher's own task loss, e.g. KL for classes, L1 in log depth) through the frozen head "
        "on the student's adapted features; 0 distils features only, as RADIO does.")
    balance: Balance = Field("phi-s", description="Teacher balancing, estimated once on the "
                             "transfer data: none, standardize (per channel) or phi-s "
                             "(Hadamard-rotated whitening with one scale; Ranzinger et al. 2024).")
    student_sizes: list[int] | None = Field(
        None, description="Train the student at these input sizes (square, in turn per step; "
        "the teachers keep their own). Default: the student's input size only.")
    sweep_sizes: list[int] | None = Field(
        None, description="Input sizes of the report's resolution sweep. Default: the "
        "student_sizes, or 0.75x, 1x and 1.25x the student's size.")
    teacher_drop: float = Field(0.0, ge=0, lt=1, description="Probability of skipping a "
                                "teacher's losses in a step (UNIC's teacher dropping; at least "
                                "one teacher is kept).")
    adaptor_hidden: int = Field(256, ge=1, description="Hidden width of each adaptor MLP.")
    adaptor_depth: int = Field(2, ge=0, description="Residual blocks per adaptor MLP.")
    holdout_images: int = Field(64, ge=0, description="Transfer images held out of training: "
                                "the end-of-run gradient shares, resolution sweep and demo.png "
                                "are measured on them.")
    demo_images: int = Field(6, ge=0, description="Held-out images shown in demo.png (0: none).")

    @field_validator("student_sizes", "sweep_sizes")
    @classmethod
    def _positive(cls, sizes: list[int] | None) -> list[int] | None:
        if sizes is not None and (not sizes or min(sizes) < 8):
            raise ValueError("give at least one size, each at least 8 pixels")
        return sizes


