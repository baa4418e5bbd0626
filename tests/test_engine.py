"""The training loop: bit-exact resume, the non-finite-loss stop, Ctrl-C, atomic checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from typing import Literal

import pytest
import torch
import yaml
from pydantic import Field

from kamal import (
    Amalgamator,
    AmalgamatorConfig,
    ConfigError,
    Interrupted,
    KamalError,
    NonFiniteLossError,
    amalgamate,
    hookimpl,
    load_model,
    train,
)
from kamal.checkpoint import load_state
from kamal.plugins import register_plugin, unregister_plugin
from kamal.testing import write_run_config


def _state(folder):
    return load_model(folder).state_dict()


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _full_and_resumed_agree(config, tmp_path, overrides):
    """A full run, and one interrupted after 7 steps then resumed, end with the same
    weights; returns the full run's report and weights."""
    full = amalgamate(config, tmp_path / "full", progress=False, overrides=overrides)
    with pytest.raises(Interrupted):
        amalgamate(config, tmp_path / "cut", progress=False, interrupt_after_steps=7,
                   overrides=overrides)
    amalgamate(config, tmp_path / "cut", progress=False, resume=True, overrides=overrides)
    weights = _state(tmp_path / "full" / "student")
    _assert_same_weights(weights, _state(tmp_path / "cut" / "student"))
    return full, weights


@pytest.mark.parametrize("interrupt_after", [7, 14])  # mid-epoch, and exactly at an epoch end
def test_resume_is_bit_exact(tmp_path, tiny_teachers, interrupt_after):
    config = write_run_config(tmp_path / "kd.yaml", tiny_teachers, {"name": "kd"}, epochs=2)
    amalgamate(config, tmp_path / "full", progress=False)
    with pytest.raises(Interrupted, match="--resume"):
        amalgamate(config, tmp_path / "cut", progress=False, interrupt_after_steps=interrupt_after)
    assert not (tmp_path / "cut" / "student").exists()
    amalgamate(config, tmp_path / "cut", progress=False, resume=True)
    _assert_same_weights(_state(tmp_path / "full" / "student"), _state(tmp_path / "cut" / "student"))


def test_bf16_trains_in_fp32_weights_and_resumes_bit_exact(tmp_path, tiny_teachers):
    config = write_run_config(tmp_path / "kd.yaml", tiny_teachers, {"name": "kd"}, epochs=2)
    full, weights = _full_and_resumed_agree(config, tmp_path, ["train.precision=bf16"])
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    # the arithmetic really was bf16: the weights differ from an fp32 run's, the result not much
    fp32 = amalgamate(config, tmp_path / "fp32", progress=False)
    assert any(not torch.equal(v, weights[k]) for k, v in _state(tmp_path / "fp32" / "student").items())
    top1 = [r["student"]["metrics"]["digits"]["top1"] for r in (full, fp32)]
    assert abs(top1[0] - top1[1]) < 0.1, top1


def test_fp16_on_a_cpu_is_refused_before_any_work(tmp_path, tiny_teachers):
    config = write_run_config(tmp_path / "kd.yaml", tiny_teachers, {"name": "kd"}, epochs=1)
    with pytest.raises(ConfigError, match="train.precision: fp16 needs a CUDA device .*use bf16"):
        amalgamate(config, tmp_path / "run", progress=False,
                   overrides=["train.precision=fp16", "train.device=cpu"])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_supervised_training_resumes_bit_exact(tmp_path):
    import yaml

    config = tmp_path / "t.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"architecture": "small-cnn", "architecture_kwargs": {"width": 4}, "task": "d"},
        "data": {"train": {"dataset": "digits", "split": "train", "augment": True}},
        "train": {"epochs": 2, "batch_size": 64, "device": "cpu"}}))
    train(config, tmp_path / "full", progress=False)
    with pytest.raises(Interrupted):
        train(config, tmp_path / "cut", progress=False, interrupt_after_steps=3)
    train(config, tmp_path / "cut", progress=False, resume=True)
    _assert_same_weights(_state(tmp_path / "full" / "model"), _state(tmp_path / "cut" / "model"))


class ExplodingConfig(AmalgamatorConfig):
    """Hyperparameters of the exploding test algorithm."""

    name: Literal["exploding"] = "exploding"
    explode_at: int = Field(20, description="Global step at which the loss becomes NaN.")


class Exploding(Amalgamator):
    """Plain KD whose loss turns NaN at a chosen step."""

    name = "exploding"
    Config = ExplodingConfig

    def losses(self, batch):
        task = self.student.tasks[0]
        merged = torch.cat([o[t.name] for o, teacher in zip(batch.teacher_outputs, self.teachers, strict=True)
                            for t in teacher.tasks], dim=1)
        loss = task.distill_loss(batch.student_outputs[task.name], merged)
        if batch.step >= self.config.explode_at:
            loss = loss * float("nan")
        return {"kd": loss}


@pytest.fixture
def exploding_plugin():
    plugin = types.SimpleNamespace(
        register_amalgamators=hookimpl(lambda register: register("exploding", Exploding)))
    register_plugin(plugin, "exploding-test")
    yield
    unregister_plugin("exploding-test")


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, tiny_teachers,
                                                                     exploding_plugin):
    config = write_run_config(tmp_path / "x.yaml", tiny_teachers, {"name": "exploding",
                                                                   "explode_at": 10}, epochs=3)
    with pytest.raises(NonFiniteLossError) as info:
        amalgamate(config, tmp_path / "run", progress=False)
    message = str(info.value)
    assert "loss 'kd' became nan" in message and "epoch 2, step 11" in message
    assert "latest.safetensors" in message and "--resume" in message
    # the weights were finite when the loss turned NaN: the loss term, not the optimisation
    assert "the weights are still finite, so the algorithm's loss term 'kd' produced it" in message
    state = load_state(tmp_path / "run" / "checkpoints" / "latest.safetensors")
    assert state["epoch"] == 1 and state["global_step"] == 540 // 64  # the last good epoch end
    weights = state["modules"]["student"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    leftovers = [p for p in (tmp_path / "run").rglob("*.tmp")]
    assert leftovers == []


def test_a_nan_watched_on_the_device_is_caught_at_the_next_check(tmp_path, tiny_teachers,
                                                                   exploding_plugin):
    # the accelerator path (no per-step read), forced on the CPU: the NaN of step 11 is
    # reported at the logging interval (step 14), and no checkpoint holds its weights
    config = write_run_config(tmp_path / "x.yaml", tiny_teachers, {"name": "exploding",
                                                                   "explode_at": 10}, epochs=3)
    with pytest.raises(NonFiniteLossError) as info:
        amalgamate(config, tmp_path / "run", progress=False,
                   overrides=["train.check_finite=log-interval", "train.log_every=7"])
    message = str(info.value)
    assert "loss 'kd' became non-finite at one of steps 9..13" in message, message
    assert "train.check_finite: every-step" in message and "--resume" in message
    state = load_state(tmp_path / "run" / "checkpoints" / "latest.safetensors")
    assert state["epoch"] == 1 and state["global_step"] == 540 // 64
    weights = state["modules"]["student"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_nan_before_any_checkpoint_says_so(tmp_path, tiny_teachers, exploding_plugin):
    config = write_run_config(tmp_path / "x.yaml", tiny_teachers, {"name": "exploding",
                                                                   "explode_at": 0}, epochs=1)
    with pytest.raises(NonFiniteLossError) as info:
        amalgamate(config, tmp_path / "run", progress=False)
    message = str(info.value)
    assert "No checkpoint had been written yet: fix the cause, then run again." in message
    assert "--resume" not in message
    assert "on the first step, with the initial weights, so the algorithm's loss term 'kd'" in message


def test_nan_weights_blame_the_optimisation(tmp_path, tiny_teachers):
    config = write_run_config(tmp_path / "x.yaml", tiny_teachers, {"name": "kd"}, epochs=2)
    with pytest.raises(NonFiniteLossError) as info:  # an absurd learning rate diverges
        amalgamate(config, tmp_path / "run", progress=False,
                   overrides=["train.optimizer.lr=1e30", "train.optimizer.name=sgd"])
    assert "the optimisation diverged: lower train.optimizer.lr" in str(info.value)


def test_ctrl_c_saves_and_exits_cleanly_then_resumes(tmp_path, tiny_teachers):
    config = write_run_config(tmp_path / "kd.yaml", tiny_teachers, {"name": "kd"}, epochs=200)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "kamal", "amalgamate", str(config), "-o",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "latest.safetensors").exists():
        time.sleep(0.2)
    assert (out / "checkpoints" / "latest.safetensors").exists(), proc.stderr
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "--resume" in stderr and "Traceback" not in stderr
    state = load_state(out / "checkpoints" / "latest.safetensors")
    assert state["global_step"] > 0
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "epoch" for e in events)
    # resume with fewer epochs left is refused by nothing: it continues from the checkpoint
    result = subprocess.run([sys.executable, "-m", "kamal", "amalgamate", str(config), "-o",
                             str(out), "--resume", "--quiet", "--set",
                             f"train.epochs={state['epoch'] + 1}"],
                            capture_output=True, text=True, timeout=300, env=os.environ)
    assert result.returncode == 0, result.stderr
    assert (out / "student" / "model.safetensors").exists()


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path):
    from kamal.checkpoint import save_state

    path = tmp_path / "latest.safetensors"
    save_state(path, {"step": 1, "w": torch.ones(3)})
    shared = torch.zeros(4)
    with pytest.raises(Exception, match="share memory"):  # safetensors refuses aliased tensors
        save_state(path, {"step": 2, "a": shared, "b": shared})
    assert load_state(path)["step"] == 1
    assert list(tmp_path.glob("*.tmp")) == []


CHECKPOINT_MEMORY = """
import resource, sys, torch
from kamal.checkpoint import save_state
state = {"modules": {f"w{i}": torch.randn(1024, 1024) for i in range(32)}}  # 128 MiB
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
save_state(sys.argv[1], state)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_checkpoints_stream_to_disk_without_a_copy_in_memory(tmp_path):
    result = subprocess.run([sys.executable, "-c", CHECKPOINT_MEMORY, str(tmp_path / "c.safetensors")],
                            capture_output=True, text=True, check=True)
    assert int(result.stdout) < 32, f"saving 128 MiB raised peak memory by {result.stdout} MiB"
    assert load_state(tmp_path / "c.safetensors")["modules"]["w0"].shape == (1024, 1024)


def test_resume_with_another_algorithm_or_teachers_is_refused_with_the_differences(
        tmp_path, tiny_teachers):
    config = write_run_config(tmp_path / "kd.yaml", tiny_teachers, {"name": "kd"}, epochs=3)
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        amalgamate(config, out, progress=False, interrupt_after_steps=3)
    other = yaml.safe_load(config.read_text())
    other["student"]["architecture_kwargs"] = {"width": 12}
    other["teachers"] = other["teachers"][::-1]
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(other))
    with pytest.raises(KamalError) as info:
        amalgamate(changed, out, progress=False, resume=True)
    message = str(info.value)
    assert message.startswith(f"--resume: {out} was started with another setup")
    assert "student: " in message and "'width': 12" in message
    assert "teachers.0.name:" in message and "teachers.0.path:" in message
    # what may change on resume does not trip the check: more epochs, another lr
    more = yaml.safe_load(config.read_text())
    more["train"]["epochs"] = 4
    more["train"]["optimizer"] = {"lr": 0.001}
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(more))
    report = amalgamate(tmp_path / "more.yaml", out, progress=False, resume=True)
    assert report["algorithm"] == "kd"


def test_data_workers_augment_in_their_own_processes_and_resume_bit_exact(tmp_path, tiny_teachers):
    """Two DataLoader workers draw the augmentation from seeds the loader's per-epoch
    generator gives them: an interrupted run resumes to the same weights."""
    config = write_run_config(tmp_path / "kd.yaml", tiny_teachers, {"name": "kd"}, epochs=2)
    _, weights = _full_and_resumed_agree(config, tmp_path,
                                         ["data.workers=2", "data.transfer.augment=true"])
    # the workers drew the shifts, not the main process: another random stream than workers=0
    amalgamate(config, tmp_path / "main", progress=False,
               overrides=["data.workers=0", "data.transfer.augment=true"])
    assert any(not torch.equal(v, weights[k]) for k, v in _state(tmp_path / "main" / "student").items())


def test_auto_workers_only_for_data_that_is_decoded(tmp_path):
    from PIL import Image

    from kamal.data.digits import build_digits
    from kamal.data.folders import build_image_folder
    from kamal.data.loading import loader_options, resolve_workers

    assert resolve_workers("auto", build_digits("transfer")) == 0
    for i in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    assert resolve_workers("auto", build_image_folder(root=str(tmp_path))) >= 1
    assert resolve_workers(3, build_digits("transfer")) == 3
    cpu = loader_options(2, torch.device("cpu"), augmented=True)
    assert cpu == {"num_workers": 2, "pin_memory": False, "persistent_workers": False}
    assert loader_options(2, torch.device("cuda"), augmented=False)["pin_memory"] is True
