"""Hyperparameters of ``cfl``: robust defaults, with KamalEngine's setting one switch each away."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from kamal import KDTermConfig

HEAD = "<head>"
PAPER_SIGMAS = [0.001, 0.01, 0.05, 0.1, 0.2, 1.0, 2.0]


class CFLConfig(KDTermConfig):
    """Hyperparameters of ``cfl``.

    KamalEngine's setting (which collapses on small networks) is ``kernel_reduction=sum``,
    ``mmd_weight=10``, ``min_hidden=1``, ``standardize_features=False`` and
    ``feature_grad_ratio=None``; the other defaults are its values. The KD term's fields
    (``temperature``, ``merge``, ``kd_weight``) are kamal's shared ones (KamalEngine: T=1,
    weight 1, naive merge).
    """

    name: Literal["cfl"] = "cfl"
    layer: str = Field(
        f"{HEAD}:in", description="Feature layer tapped in the student and every teacher, by "
        f"module name (an architecture's feature_layers, ':in' for a module's input). "
        f"'{HEAD}' stands for each network's classification head, so '{HEAD}:in' is the "
        "pooled feature its classifier reads, whatever the architecture calls it.")
    teacher_layers: list[str] | None = Field(
        None, description="One layer per teacher, overriding 'layer' for the teachers (for "
        "teachers whose layers are named differently). Same syntax as 'layer'.")
    mmd_weight: float = Field(1.0, ge=0, description="Weight of the MMD term between the "
                              "student's and each teacher's common features. KamalEngine: 10 "
                              "on a sum of 7 kernels (70 on their mean); on digits, 10 on the "
                              "mean still cost about a point of top-1 (see the README).")
    recon_weight: float = Field(10.0, ge=0, description="Weight of the teachers' feature "
                                "reconstruction MSE (KamalEngine: 10).")
    feature_grad_ratio: float | None = Field(
        1.0, gt=0, description="Cap on how hard the MMD may pull the student's feature, "
        "relative to the KD term: the MMD is scaled down until its gradient at the student's "
        "feature is at most this times the KD's. None disables the cap (KamalEngine).")
    feature_grad_every: int = Field(
        10, ge=1, description="Measure the two gradients of the cap (two extra backward "
        "passes to the student's feature) every N steps and keep the scale in between (1: "
        "every step).")
    sigmas: list[float] = Field(
        PAPER_SIGMAS, min_length=1,
        description="Bandwidths of the Gaussian kernels of the MMD, on L2-normalised common "
        "features (KamalEngine: 0.001, 0.01, 0.05, 0.1, 0.2, 1, 2).")
    kernel_reduction: Literal["mean", "sum"] = Field(
        "mean", description="How the kernels' MMDs combine: 'mean' keeps the MMD in [0, 2] "
        "whatever the number of bandwidths; 'sum' (KamalEngine) lets it reach 2 per kernel "
        "(14 with the paper's 7), which then swamps the KD term.")
    normalize: bool = Field(True, description="L2-normalise common features before the MMD "
                            "(KamalEngine does; the sigmas assume it).")
    hidden_ratio: float = Field(0.25, gt=0, le=4, description="Width of the common space as a "
                                "fraction of the student feature's channels (KamalEngine: C/4).")
    min_hidden: int = Field(24, ge=1, description="Floor on the common space's width: C/4 of a "
                            "small student (e.g. 8 channels) cannot hold the teachers' features; "
                            "24 kept the accuracy of 64 at either student width measured, faster "
                            "(benchmarks/cfl_speed.py). 1 reproduces KamalEngine.")
    standardize_features: bool = Field(
        True, description="Standardise each teacher's feature per channel (mean/std measured "
        "once on the transfer data) before the block, so teachers of different scales weigh "
        "the same in the reconstruction loss. False reproduces KamalEngine (raw features).")
    tsne_samples: int = Field(500, ge=0, description="Transfer images whose common features "
                              "(student and teachers) are embedded with t-SNE into "
                              "cfl_tsne.png after training; 0 skips the plot.")

    @field_validator("sigmas")
    @classmethod
    def _positive_sigmas(cls, value: list[float]) -> list[float]:
        bad = [s for s in value if not s > 0]
        if bad:
            raise ValueError(f"every kernel bandwidth must be > 0, got {bad[0]}")
        return value

    @field_validator("layer")
    @classmethod
    def _layer_named(cls, value: str) -> str:
        if not value.removesuffix(":in"):
            raise ValueError(f"'{value}' names no layer; use e.g. '{HEAD}:in' or 'block3'")
        return value
