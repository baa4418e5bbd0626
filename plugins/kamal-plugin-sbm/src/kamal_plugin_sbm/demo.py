"""``demo.png``: input | teacher and student segmentation | teacher and student depth."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kamal import Student, Teacher, ViewBatch


@torch.no_grad()
def write_demo(path: Path, images: Tensor | ViewBatch, teachers: list[Teacher], student: Student,
               sources: dict[str, tuple[int, Any]], device: torch.device,
               log: Callable[[str, Any], None] | None = None) -> Path:
    """One row per image; per student task a teacher column and a student column.

    Segmentation shows the arg-max class (same colours for teacher and student), depth a
    colour map whose range is shared by the teacher and the student in each row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    student.eval()
    x = images.to(device)
    shown = (x.for_model(student) if isinstance(x, ViewBatch) else x).cpu()  # as the student reads
    student_out = {k: v.float().cpu() for k, v in student(x).items()}
    teacher_out = [{k: v.float().cpu() for k, v in t(x).items()} for t in teachers]
    columns: list[tuple[str, str, Tensor, Tensor]] = []  # (task, kind, teacher, student)
    for task in student.tasks:
        i, teacher_task = sources[task.name]
        mine = student_out[task.name]
        theirs = task.embed(teacher_task, teacher_out[i][teacher_task.name])
        columns.append((task.name, task.kind, task.resize_output(theirs, mine.shape[-2:]), mine))
    rows, cols = len(images), 1 + 2 * len(columns)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    for r in range(rows):
        axes[r][0].imshow(shown[r].permute(1, 2, 0).clamp(0, 1).numpy())
        for c, (name, kind, teacher, mine) in enumerate(columns):
            pair = (teacher[r], mine[r])
            for j, (who, value) in enumerate(zip(("teacher", "student"), pair, strict=True)):
                ax = axes[r][1 + 2 * c + j]
                if kind == "segmentation":
                    classes = value.shape[0]
                    ax.imshow(value.argmax(0).numpy(), cmap="tab10", vmin=0, vmax=max(9, classes))
                else:
                    low = float(min(p.min() for p in pair))
                    high = float(max(p.max() for p in pair))
                    ax.imshow(value[0].numpy(), cmap="viridis_r", vmin=low, vmax=high)
                if r == 0:
                    ax.set_title(f"{who}\n{name}", fontsize=7)
    axes[0][0].set_title("input", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    if log is not None:  # the run's experiment trackers (Trainer.log_figure)
        log("sbm/demo", fig)
    plt.close(fig)
    return path
