"""``demo.png``: for held-out images, each teacher's output beside the student's, per task."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kamal import Student, Teacher, ViewBatch


@torch.no_grad()
def write_demo(path: Path, images: Tensor | ViewBatch, teachers: list[Teacher], student: Student,
               device: torch.device, log: Callable[[str, Any], None] | None = None) -> Path:
    """One row per image: the input, then per student task a teacher and a student column.

    Segmentation shows the arg-max class (same colours for both), depth a colour map whose
    range the pair shares, classification the predicted class and its probability.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was_training = student.training
    student.eval()
    x = images.to(device)
    shown = (x.for_model(student) if isinstance(x, ViewBatch) else x).cpu()
    mine = {k: v.float().cpu() for k, v in student(x).items()}
    theirs: dict[str, Tensor] = {}
    for teacher in teachers:
        theirs.update({k: v.float().cpu() for k, v in teacher(x).items()})
    student.train(was_training)
    tasks = [t for t in student.tasks if t.name in theirs]
    rows, cols = len(shown), 1 + 2 * len(tasks)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    for r in range(rows):
        axes[r][0].imshow(shown[r].permute(1, 2, 0).clamp(0, 1).numpy())
        for c, task in enumerate(tasks):
            pair = (task.resize_output(theirs[task.name], mine[task.name].shape[-2:])
                    if mine[task.name].dim() == 4 else theirs[task.name], mine[task.name])
            for j, who in enumerate(("teacher", "student")):
                ax = axes[r][1 + 2 * c + j]
                value = pair[j][r]
                if task.kind == "segmentation":
                    ax.imshow(value.argmax(0).numpy(), cmap="tab10", vmin=0,
                              vmax=max(9, value.shape[0]))
                elif task.kind == "depth":
                    low = float(min(p[r].min() for p in pair))
                    high = float(max(p[r].max() for p in pair))
                    ax.imshow(value[0].numpy(), cmap="viridis_r", vmin=low, vmax=high)
                else:
                    probabilities = value.softmax(0)
                    best = int(probabilities.argmax())
                    names = getattr(task, "classes", None) or [str(best)]
                    ax.text(0.5, 0.5, f"{names[best]}\n{float(probabilities[best]):.2f}",
                            ha="center", va="center", fontsize=8)
                if r == 0:
                    ax.set_title(f"{who}\n{task.name}", fontsize=7)
    axes[0][0].set_title("input", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    if log is not None:  # the run's experiment trackers (Trainer.log_figure)
        log("agglomerate/demo", fig)
    plt.close(fig)
    return path
