"""Peak memory while loading a teacher of about 100 MB, per format, against the size of its
weights (target: at most 1.3x). Each teacher is made locally with its library's saver (a
ResNet-50 for kamal, timm and torchvision, a ViT for transformers) and loaded by
``resolve_teacher`` in a fresh process, after a small teacher of the same format has warmed
the imports; a thread samples the resident memory while it loads. The "naive" row loads the
kamal repo the common way (``load_file`` + ``load_state_dict``) for comparison. Rewrites
the "teacher_load" section of docs/benchmarks.md and its key in docs/benchmarks.json.

    python benchmarks/teacher_load.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

TARGET = 1.3  # peak increase while loading / weights

MEASURE = r"""
import json, os, resource, sys, threading, time
from pathlib import Path
import torch
from kamal.config import TeacherRef
from kamal.teacher_loading import resolve_teacher

big, small, naive = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "naive"
resolve_teacher(TeacherRef(path=str(small)), Path.cwd(), 0)  # imports and code paths warm
page = os.sysconf("SC_PAGE_SIZE")

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page

peak, done = [0], threading.Event()
def sample() -> None:
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)

before = rss()
before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
thread = threading.Thread(target=sample, daemon=True)
thread.start()
if naive:  # the common way: the whole file in memory, then copied into the network
    from safetensors.torch import load_file
    from kamal.repo import read_repo_config
    from kamal.models import KamalModel, task_from_dict
    from kamal import InputSpec
    config = read_repo_config(big)
    model = KamalModel(config["architecture"], [task_from_dict(t) for t in config["tasks"]],
                       InputSpec.from_dict(config["input"]), config["architecture_kwargs"])
    model.load_state_dict(load_file(str(big / "model.safetensors")))
else:
    model = resolve_teacher(TeacherRef(path=str(big)), Path.cwd(), 0).model
done.set()
thread.join()
after_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"weights": weights, "peak_increase": max(peak[0], after_max) - before,
                  "resident_increase": rss() - before}))
"""


def _resnet_kamal(folder: Path, width: int = 50) -> None:
    import kamal
    from kamal import ClassificationTask, InputSpec, KamalModel

    name = "resnet50" if width == 50 else "resnet18"
    model = KamalModel(name, [ClassificationTask("t", [str(i) for i in range(1000)])],
                       InputSpec(3, (64, 64)))
    kamal.save_model_repo(model, folder)


def _timm(folder: Path, name: str) -> None:
    import timm
    from timm.models._hub import save_for_hf

    model = timm.create_model(name, pretrained=False)
    save_for_hf(model, str(folder), safe_serialization=True,
                model_config={"label_names": [str(i) for i in range(1000)]})
    (folder / "pytorch_model.bin").unlink(missing_ok=True)


def _torchvision(folder: Path, name: str) -> None:
    from safetensors.torch import save_file
    from torchvision import models

    net = models.get_model(name, weights=None)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "library": "torchvision", "architecture": name, "num_classes": 1000,
        "label_names": [str(i) for i in range(1000)], "input_size": [3, 64, 64]}))


def _transformers(folder: Path, hidden: int) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    labels = {i: f"c{i}" for i in range(10)}
    ViTForImageClassification(ViTConfig(
        hidden_size=hidden, num_hidden_layers=8, num_attention_heads=8,
        intermediate_size=4 * hidden, image_size=64, patch_size=16, num_labels=10,
        id2label=labels, label2id={v: k for k, v in labels.items()})).save_pretrained(folder)


FORMATS = {
    "kamal": (lambda f: _resnet_kamal(f, 50), lambda f: _resnet_kamal(f, 18)),
    "timm": (lambda f: _timm(f, "resnet50"), lambda f: _timm(f, "resnet18")),
    "torchvision": (lambda f: _torchvision(f, "resnet50"), lambda f: _torchvision(f, "resnet18")),
    "transformers": (lambda f: _transformers(f, 512), lambda f: _transformers(f, 64)),
}


def measure(big: Path, small: Path, naive: bool = False) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-c", MEASURE, str(big), str(small),
                             "naive" if naive else "kamal"], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (make_big, make_small) in FORMATS.items():
            big, small = Path(tmp) / f"{name}-big", Path(tmp) / f"{name}-small"
            make_big(big)
            make_small(small)
            rows[name] = measure(big, small)
            if name == "kamal":
                rows["kamal, naive load (for comparison)"] = measure(big, small, naive=True)
    lines = ["| format | weights MB | peak increase while loading MB | ratio | target |",
             "|---|---|---|---|---|"]
    for name, row in rows.items():
        ratio = row["peak_increase"] / row["weights"]
        row["ratio"] = round(ratio, 3)
        verdict = "" if "naive" in name else ("met" if ratio <= TARGET else "missed")
        lines.append(f"| {name} | {row['weights'] / 2**20:.1f} | "
                     f"{row['peak_increase'] / 2**20:.1f} | {ratio:.2f}x | "
                     f"{f'<= {TARGET}x: ' + verdict if verdict else ''} |")
    text = "\n".join(lines)
    print(text)
    _report.update("teacher_load", text, {"target": TARGET, "formats": rows})


if __name__ == "__main__":
    main()
