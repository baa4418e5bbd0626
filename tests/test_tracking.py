"""Experiment tracking and progress (issue 20, parts 1 and 2).

TensorBoard curves are read back from the event files with TensorBoard's own
``event_accumulator`` (which applies ``purge_step`` as TensorBoard does): a resumed run,
even one whose crashed session logged past its last checkpoint, shows exactly the steps and
values of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import types
from pathlib import Path

import pytest
import yaml
from conftest import run_kamal

from kamal import ConfigError, Interrupted, Logger, amalgamate, hookimpl
from kamal.testing import write_run_config

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402


def _config(tmp_path: Path, teachers: list[Path], **train) -> Path:
    path = write_run_config(tmp_path / "kd.yaml", teachers, {"name": "kd"}, epochs=2)
    data = yaml.safe_load(path.read_text())
    data["train"].update({"log_every": 2, "loggers": ["tensorboard"], **train})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={
        event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _texts(run: Path) -> dict[str, str]:
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag.split("/")[0]: acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
            for tag in acc.Tags()["tensors"]}


def test_tensorboard_curves_match_metrics_jsonl_and_survive_resume(tmp_path, tiny_teachers):
    config = _config(tmp_path, tiny_teachers)
    amalgamate(config, tmp_path / "full", progress=False)
    full = _curves(tmp_path / "full")
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").open()]
    steps = [r for r in records if "event" not in r]
    assert [s for s, _ in full["loss/kd/digits"]] == [r["step"] for r in steps] == list(
        range(2, 17, 2))
    assert [v for _, v in full["loss/kd/digits"]] == pytest.approx(
        [r["loss/kd/digits"] for r in steps], rel=1e-6)
    assert [v for _, v in full["lr"]] == pytest.approx([r["lr"] for r in steps], rel=1e-6)
    evals = [r for r in records if r.get("event") == "eval"]
    top1 = [(r["step"], r["metrics"]["digits"]["top1"]) for r in evals]
    assert [s for s, _ in full["eval/digits/top1"]] == [s for s, _ in top1] == [8, 16]
    assert [v for _, v in full["eval/digits/top1"]] == pytest.approx([v for _, v in top1], rel=1e-6)
    assert [s for s, _ in full["epoch/loss/kd/digits"]] == [8, 16]
    texts = _texts(tmp_path / "full")
    assert "algorithm:" in texts["config"] and "name: kd" in texts["config"]
    report = json.loads((tmp_path / "full" / "report.json").read_text())
    assert json.loads(texts["report"].strip("`json\n")) == report

    # Ctrl-C in the middle of epoch 1, then --resume: the same curves, no gap, no repeat
    with pytest.raises(Interrupted):
        amalgamate(config, tmp_path / "cut", progress=False, interrupt_after_steps=5)
    amalgamate(config, tmp_path / "cut", progress=False, resume=True)
    cut = _curves(tmp_path / "cut")
    for tag in ("loss/kd/digits", "lr", "eval/digits/top1", "epoch/loss/kd/digits"):
        assert [s for s, _ in cut[tag]] == [s for s, _ in full[tag]], tag
        # epoch means too: the checkpoint keeps the loss sums of the interrupted epoch
        assert [v for _, v in cut[tag]] == pytest.approx([v for _, v in full[tag]], rel=1e-5), tag
    def epoch_means(run: Path) -> list[float]:
        return [r["loss/kd/digits"] for r in map(json.loads, (run / "metrics.jsonl").open())
                if r.get("event") == "epoch"]

    assert epoch_means(tmp_path / "cut") == epoch_means(tmp_path / "full")  # bit-exact

    # a crash after step 13 whose last checkpoint is at step 6: steps 8-12 were logged twice,
    # and TensorBoard's purge on resume shows them once, with the resumed session's values
    with pytest.raises(Interrupted):
        amalgamate(config, tmp_path / "early", progress=False, interrupt_after_steps=6)
    with pytest.raises(Interrupted):
        amalgamate(config, tmp_path / "crash", progress=False, interrupt_after_steps=13)
    crashed = _curves(tmp_path / "crash")
    assert [s for s, _ in crashed["loss/kd/digits"]][-1] == 12
    shutil.copy(tmp_path / "early" / "checkpoints" / "latest.safetensors",
                tmp_path / "crash" / "checkpoints" / "latest.safetensors")
    amalgamate(config, tmp_path / "crash", progress=False, resume=True)
    resumed = _curves(tmp_path / "crash")
    assert [s for s, _ in resumed["loss/kd/digits"]] == list(range(2, 17, 2))
    assert [v for _, v in resumed["loss/kd/digits"]] == pytest.approx([v for _, v in full["loss/kd/digits"]],
                                                               rel=1e-5)


class _Collecting(Logger):
    calls: list[tuple[str, object]] = []

    def start(self, run_dir, config, resumed_at):
        self.calls.append(("start", config["algorithm"]["name"]))

    def log_scalars(self, scalars, step):
        self.calls.append(("scalars", step))

    def log_metrics(self, metrics, step):
        self.calls.append(("metrics", sorted(metrics)))

    def log_report(self, report, run_dir):
        self.calls.append(("report", report["student"]["metrics"]["digits"]["top1"]))

    def close(self):
        self.calls.append(("close", None))


class _Failing(Logger):
    calls = 0

    def log_scalars(self, scalars, step):
        type(self).calls += 1
        raise OSError("tracking server gone")


@pytest.fixture
def logger_plugin():
    from kamal.plugins import register_plugin, unregister_plugin

    def register_loggers(register):
        register("collecting", _Collecting)
        register("failing", _Failing)

    register_plugin(types.SimpleNamespace(register_loggers=hookimpl(register_loggers)),
                    "test-loggers")
    yield
    unregister_plugin("test-loggers")


def test_plugin_loggers_get_every_call_and_a_failing_one_is_disabled(tmp_path, tiny_teachers,
                                                                      logger_plugin, capsys):
    _Collecting.calls.clear()
    config = _config(tmp_path, tiny_teachers, loggers=["failing", "collecting"], epochs=1)
    report = amalgamate(config, tmp_path / "run", progress=False)
    calls = _Collecting.calls
    assert calls[0] == ("start", "kd") and calls[-1] == ("close", None)
    assert [step for kind, step in calls if kind == "scalars"] == [2, 4, 6, 8, 8]  # + epoch means
    assert ("metrics", ["eval/digits/top1", "eval/digits/top5"]) in calls or any(
        kind == "metrics" and "eval/digits/top1" in value for kind, value in calls)
    assert ("report", report["student"]["metrics"]["digits"]["top1"]) in calls
    assert _Failing.calls == 1  # disabled after its first failure
    err = capsys.readouterr().err
    assert err.count("logger 'failing' failed") == 1
    assert "OSError: tracking server gone" in err and "training goes on" in err
    assert (tmp_path / "run" / "report.json").exists()


def test_unknown_logger_is_a_config_error(tmp_path, tiny_teachers):
    config = _config(tmp_path, tiny_teachers, loggers=["tensorbord"])
    with pytest.raises(ConfigError, match="train.loggers: unknown logger 'tensorbord'.*tensorboard"):
        amalgamate(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_tensorboard_missing_is_a_config_error_before_training(tmp_path, tiny_teachers,
                                                              monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    config = _config(tmp_path, tiny_teachers)
    with pytest.raises(ConfigError, match=r"train.loggers: logger 'tensorboard' cannot run: the "
                       r"tensorboard package is not installed: pip install 'kamal-core\[tensorboard\]'"):
        amalgamate(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_progress_one_line_per_epoch_off_a_terminal_and_nothing_when_quiet(tmp_path, tiny_teachers):
    config = _config(tmp_path, tiny_teachers, loggers=[], teacher_cache="memory")
    shown = run_kamal("amalgamate", str(config), "-o", str(tmp_path / "shown"))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stderr.splitlines()
    epochs = [line for line in lines if line.startswith("[main] epoch")]
    assert len(epochs) == 2 and "\r" not in shown.stderr
    assert "img/s" in epochs[0] and "ETA run" in epochs[0] and "ETA" not in epochs[1]
    for teacher in ("tiny-small-cnn-0-4", "tiny-small-cnn-5-9"):  # one teacher at a time
        assert any(line.startswith(f"filling the teacher cache (memory): {teacher}: 9 batches")
                   for line in lines), lines
    assert any(line.startswith("calibrating on the transfer data: 9 batches") for line in lines)
    quiet = run_kamal("amalgamate", str(config), "-o", str(tmp_path / "quiet"), "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""


def _read_all(master: int) -> str:
    """Everything written to a pty (a read returns one chunk at a time), then close it."""
    import select

    chunks = []
    while select.select([master], [], [], 0.5)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed and drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return b"".join(chunks).decode()


def test_progress_bar_on_a_terminal_shows_rate_and_etas():
    from kamal.progress import EpochProgress

    master, slave = os.openpty()
    with os.fdopen(slave, "w") as stream:
        bar = EpochProgress(True, stream)
        assert bar.line.tty
        bar.start_epoch("main", 0, 3, 4, 0, 64)
        for index in range(4):
            bar.step(index, 0.5 if index == 1 else None)
        bar.end_epoch("kd=0.5000")
    text = _read_all(master)
    assert "\r[main] epoch 1/3 [####################] 4/4" in text
    assert "img/s  loss 0.5000  ETA epoch 0:00, run 0:00" in text
    assert text.rstrip().endswith("ETA run 0:00")


def test_kamal_train_logs_to_tensorboard_too(tmp_path):
    from kamal import train

    config = tmp_path / "t.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"architecture": "small-cnn", "architecture_kwargs": {"width": 4}, "task": "d"},
        "data": {"train": {"dataset": "digits", "split": "train", "size": 8},
                 "eval": {"dataset": "digits", "split": "test", "size": 8}},
        "train": {"epochs": 1, "batch_size": 64, "device": "cpu", "log_every": 3,
                  "loggers": ["tensorboard"]}}))
    report = train(config, tmp_path / "run", progress=False)
    curves = _curves(tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    steps = [r for r in records if "event" not in r]
    assert [s for s, _ in curves["loss/ce"]] == [r["step"] for r in steps] and len(steps) >= 3
    assert curves["eval/d/top1"][-1][1] == pytest.approx(report["model"]["metrics"]["d"]["top1"])
    assert "model:" in _texts(tmp_path / "run")["config"]


def test_rates_and_etas_follow_the_measured_step_time():
    import time

    from kamal.progress import EpochProgress, format_duration

    bar = EpochProgress(False)
    bar.start_epoch("main", 0, 3, 4, 0, 64)  # epoch 1 of 3, 4 steps of 64 images
    for index in range(2):
        time.sleep(0.2)
        bar.step(index)
    rate, epoch_left, run_left = bar._rates()
    per_step = (time.perf_counter() - bar.started) / 2
    assert rate == pytest.approx(64 / per_step, rel=0.05)
    assert epoch_left == pytest.approx(2 * per_step, rel=0.05)  # 2 steps left in this epoch
    assert run_left == pytest.approx(10 * per_step, rel=0.05)  # + 2 epochs of 4 steps
    assert format_duration(75) == "1:15" and format_duration(3725) == "1:02:05"


def test_preparation_progress_on_a_terminal():
    from kamal.progress import set_enabled, track

    master, slave = os.openpty()
    set_enabled(True)  # as a run without --quiet sets it
    with os.fdopen(slave, "w") as stream:
        assert list(track(range(3), "filling the teacher cache (memory)", stream=stream)) == [0, 1, 2]
        set_enabled(False)
        assert list(track(range(2), "silent", stream=stream)) == [0, 1]  # --quiet
    text = _read_all(master)
    assert "\rfilling the teacher cache (memory) [####################] 3/3 batches  ETA 0:00" in text
    assert "filling the teacher cache (memory): 3 batches in " in text
    assert "silent" not in text


def test_the_loop_reads_losses_only_at_the_logging_interval(tmp_path, monkeypatch):
    # Reading a loss (float()) waits for the GPU; the loop may do it only every log_every
    # steps. Count float() on the tensors the step returned (detached views share storage).
    import torch
    from torch import nn

    from kamal import StepInfo, Trainer
    from kamal.config import TrainConfig

    model = nn.Linear(4, 2)
    returned: set[int] = set()
    alive: list[torch.Tensor] = []  # kept, so no later loss reuses an earlier one's address
    reads: list[int] = []

    def step(batch, info: StepInfo):
        loss = model(batch[0]).pow(2).mean()
        alive.append(loss)
        returned.add(loss.data_ptr())
        return {"mse": loss}

    real_float = torch.Tensor.__float__

    def counting_float(tensor):
        if tensor.data_ptr() in returned:
            reads.append(len(returned))
        return real_float(tensor)

    monkeypatch.setattr(torch.Tensor, "__float__", counting_float)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4))
    cfg = TrainConfig(epochs=1, batch_size=4, log_every=4, device="cpu")
    trainer = Trainer(modules={"student": model}, dataset=data, step_fn=step, cfg=cfg,
                      output_dir=tmp_path, device=torch.device("cpu"), progress=False)
    trainer.fit()
    assert len(returned) == 8
    assert reads == [4, 8]  # steps 4 and 8 only
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "event" not in r] == [4, 8]
    assert [r["event"] for r in records if "event" in r] == ["epoch"]
