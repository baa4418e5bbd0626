"""t-SNE picture of the common space: do the student's features land where the teachers' do?"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import mmd_rbf

if TYPE_CHECKING:
    from .algorithm import CFLAmalgamator


@torch.no_grad()
def common_features(algo: CFLAmalgamator, images: Tensor, batch_size: int = 256
                    ) -> tuple[Tensor, list[Tensor], Tensor, list[str]]:
    """Common features of the student and of each teacher, the teachers' merged class per
    image and the class names.

    Runs every network in eval mode on ``images``; no labels are read (the class is the
    teachers' merged prediction for the student's first merged task).
    """
    assert algo.student is not None
    device = next(algo.block.parameters()).device
    block_mode = algo.block.training
    algo.block.eval()
    student_h, teacher_h, classes = [], [[] for _ in algo.teachers], []
    task_name = ""
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device)
            s_feat, t_feats = algo._features([batch], device)
            common = algo.block(s_feat, t_feats)
            student_h.append(common.student.flatten(1).cpu())
            for i, h in enumerate(common.teachers):
                teacher_h[i].append(h.flatten(1).cpu())
            task_name, logits = next(iter(algo.kd.merger([t(batch) for t in algo.teachers]).items()))
            classes.append(logits.argmax(1).cpu())
    finally:
        algo.block.train(block_mode)
    names = next(getattr(t, "classes", []) for t in algo.student.tasks if t.name == task_name)
    return (torch.cat(student_h), [torch.cat(h) for h in teacher_h], torch.cat(classes),
            [str(c) for c in names])


def plot_common_features(algo: CFLAmalgamator, images: Tensor, path: Path,
                         log: Callable[[str, Any], None] | None = None) -> Path:
    """Write a two-panel t-SNE of the common features to ``path`` (PNG) and return it.

    Left: coloured by network (teachers vs student). Right: coloured by the teachers' merged
    prediction, showing whether the common space keeps the classes apart.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    student, teachers, classes, class_names = common_features(algo, images)
    cfg = algo.config
    mmds = [float(mmd_rbf(student, h, cfg.sigmas, cfg.normalize, cfg.kernel_reduction))
            for h in teachers]
    groups = [("student", student), *((t.name, h) for t, h in zip(algo.teachers, teachers,
                                                                    strict=True))]
    points = torch.cat([h for _, h in groups])
    if cfg.normalize:  # the MMD compares directions: embed what it sees
        points = F.normalize(points, dim=1)
    n = len(points)
    embedded = TSNE(n_components=2, init="pca", random_state=0,
                    perplexity=float(max(2.0, min(30.0, (n - 1) / 3)))).fit_transform(
                        points.double().numpy())

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5))
    offset = 0
    markers = ["o", "^", "s", "D", "v", "P"]
    for k, (name, h) in enumerate(groups):
        part = embedded[offset:offset + len(h)]
        left.scatter(part[:, 0], part[:, 1], s=6, alpha=0.6, marker=markers[k % len(markers)],
                     label=name)
        offset += len(h)
    left.legend(markerscale=3, fontsize=8)
    left.set_title("common features by network\n" + ", ".join(
        f"MMD(student, {t.name})={m:.3f}" for t, m in zip(algo.teachers, mmds, strict=True)),
        fontsize=9)
    repeated = np.tile(classes.numpy(), len(groups))
    colours = len(class_names)
    scatter = right.scatter(embedded[:, 0], embedded[:, 1], s=6, alpha=0.6, c=repeated,
                            cmap="tab10" if colours <= 10 else "tab20", vmin=-0.5,
                            vmax=max(colours, 10) - 0.5)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=scatter.cmap(scatter.norm(c)),
                          label=class_names[c]) for c in sorted(set(classes.tolist()))]
    right.legend(handles=handles, fontsize=7, ncol=2, title="teachers' class", title_fontsize=8)
    right.set_title("coloured by the teachers' merged prediction (no labels)", fontsize=9)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"CFL common space (width {algo.block.hidden}, t-SNE of {len(images)} transfer "
                 "images)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    if log is not None:  # the run's experiment trackers (Trainer.log_figure)
        log("cfl/tsne", fig)
    plt.close(fig)
    return path
