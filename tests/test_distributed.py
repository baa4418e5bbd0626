"""Distributed runs: two real CPU processes under torchrun (gloo), as users launch them.

Each test starts ``python -m torch.distributed.run --standalone --nproc-per-node=2 -m kamal``
(or a script calling :func:`kamal.amalgamate`) in a subprocess; nothing is simulated. One
thread per process keeps two processes on two cores from fighting (and makes the
single-process reference use the same kernels).

Starting two processes costs seconds, training the small jobs here much less, so the runs
that need no launch of their own (the references the resume tests compare with and the
bundled algorithms) share one two-process launch: ``two_process_runs``, once per test run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import EXAMPLES, once_per_test_run

from kamal import load_model
from kamal.checkpoint import load_state
from kamal.data.base import build_dataset

# under pytest-xdist (--dist loadgroup) these run one after another in one worker: never two
# torchrun launches (four processes) at once on two cores
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("torchrun")]
KD = EXAMPLES / "digits" / "kd.yaml"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
if Path("/sys/class/net/lo").exists():  # gloo on loopback: containers whose hostname does not resolve
    ONE_THREAD["GLOO_SOCKET_IFNAME"] = "lo"


def _torchrun_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "kamal", *args]


def _torchrun(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_command(*args), capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=timeout)


def _records(run: Path, event: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == event]


def _top1(run: Path) -> float:
    return json.loads((run / "report.json").read_text())["student"]["metrics"]["digits"]["top1"]


def _cached_config(tmp_path: Path, epochs: int) -> Path:
    """The digits kd example without augmentation (so the teacher cache is on) and fewer epochs."""
    config = yaml.safe_load(KD.read_text())
    for teacher in config["teachers"]:
        teacher["path"] = str(KD.parent / teacher["path"])
    config["data"]["transfer"]["augment"] = False
    config["train"]["epochs"] = epochs
    path = tmp_path / "kd-cached.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


JOBS = """
import json
import sys

import torch.distributed as dist

from kamal import Interrupted, amalgamate

# the script joins the process group itself: every run below keeps it (distributed.session)
dist.init_process_group("gloo")
for job in json.loads(open(sys.argv[1]).read()):
    try:
        amalgamate(job["config"], job["out"], overrides=job["overrides"], resume=job["resume"],
                   progress=False, interrupt_after_steps=job["interrupt"])
    except Interrupted:
        pass
    dist.barrier()
dist.destroy_process_group()
"""


def _launch_jobs(folder: Path, jobs: list[dict]) -> subprocess.CompletedProcess:
    """Run ``jobs`` (config, out, overrides, resume, interrupt) one after the other in one
    two-process launch."""
    script, listing = folder / "jobs.py", folder / f"jobs-{len(list(folder.glob('jobs-*')))}.json"
    script.write_text(JOBS)
    listing.write_text(json.dumps([{"overrides": [], "resume": False, "interrupt": None, **job}
                                   for job in jobs]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(script), str(listing)]
    return subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **ONE_THREAD})


KILL_EPOCHS = 15  # of the killed run: killed after 3, so the resume has most of them left
MID_EPOCH = ["train.epochs=2"]  # 16 steps per epoch; interrupted after 20
BUNDLED = {"digits/layerwise": ["train.epochs=2"],
           "digits/recombination": ["train.epochs=8"],  # 4 pruning rounds
           "digits/cfl": ["train.epochs=2"],
           # 128 scenes, not 2000: 4 steps per epoch still cross processes every step
           "scenes/sbm": ["train.epochs=2", "data.transfer.count=128", "data.eval.count=64"]}


@pytest.fixture(scope="session")
def two_process_runs(tmp_path_factory) -> dict[str, Path]:
    """One two-process launch, once per test run, for every run that needs none of its own:
    the uninterrupted references of the resume tests, the mid-epoch-interrupted run and each
    bundled algorithm. Tests copy what they change."""
    from kamal.plugins import get_registry

    installed = set(get_registry().names("amalgamators"))
    jobs = {"mid-epoch/full": {"config": str(KD), "overrides": MID_EPOCH},
            "mid-epoch/part": {"config": str(KD), "overrides": MID_EPOCH, "interrupt": 20},
            "killed/full": {"config": "kd-cached.yaml"}}
    for example, overrides in BUNDLED.items():
        config = EXAMPLES / f"{example}.yaml"
        if yaml.safe_load(config.read_text())["algorithm"]["name"] in installed:
            jobs[example] = {"config": str(config), "overrides": overrides}

    def make(folder: Path) -> None:
        jobs["killed/full"]["config"] = str(_cached_config(folder, KILL_EPOCHS))
        result = _launch_jobs(folder, [{**job, "out": str(folder / name)} for name, job in jobs.items()])
        assert result.returncode == 0, result.stderr[-3000:]

    folder = once_per_test_run(tmp_path_factory, "two-process-runs", make)
    return {name: folder / name for name in jobs}


def test_two_processes_match_one_and_only_the_main_one_writes(tmp_path, readme_kd_run):
    scratch = tmp_path / "tmp"  # where non-main processes keep their private scratch folders
    scratch.mkdir()
    one, _ = readme_kd_run  # the same job in one process (one thread), shared with other tests
    double = _torchrun("amalgamate", str(KD), "--output", str(tmp_path / "two"), "--quiet",
                       env={**ONE_THREAD, "TMPDIR": str(scratch)})
    assert double.returncode == 0, double.stderr[-3000:]  # torchrun fails if any process does

    two = tmp_path / "two"
    assert double.stdout.count("student (kd)") == 1  # one report, printed by the main process
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    epochs = _records(two, "epoch")
    assert [r["epoch"] for r in epochs] == list(range(30))  # one line per epoch: nobody else logs
    assert all(r["processes"] == 2 for r in epochs)
    assert len(_records(two, "eval")) == 30
    state = load_state(two / "checkpoints" / "latest.safetensors")
    assert state["processes"] == 2 and len(state["by_process"]) == 2
    assert list(scratch.glob("kamal-*")) == []  # scratch folders are removed
    # same global batch (32 = 2 x 16): the student is as good as the single-process one
    assert abs(_top1(two) - _top1(one)) <= 0.01, (_top1(two), _top1(one))
    assert _top1(two) >= 0.88


def _worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker process with ``RANK=rank``."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            parent = next(int(line.split()[1]) for line in status.read_text().splitlines()
                          if line.startswith("PPid:"))
            environ = (status.parent / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(status.parent.name)
    raise AssertionError(f"no worker with RANK={rank} under torchrun (pid {launcher.pid})")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds workers through /proc")
def test_a_dead_process_stops_the_run_clearly_and_the_run_resumes(tmp_path, two_process_runs):
    config = _cached_config(tmp_path, epochs=KILL_EPOCHS)
    env = {**os.environ, **ONE_THREAD}
    full = two_process_runs["killed/full"]  # the same config, uninterrupted
    report = json.loads((full / "report.json").read_text())
    assert report["teacher_cache"]["mode"] == "memory"
    transfer = len(build_dataset("digits", "transfer", {"size": 16}))
    per_sample = 2 * 5 * 4  # two teachers, five float32 logits each
    assert report["teacher_cache"]["bytes"] == transfer // 2 * per_sample  # only its own half

    run = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    launcher = subprocess.Popen(_torchrun_command("amalgamate", str(config), "--output", str(run),
                                                  "--quiet"), stdout=log, stderr=subprocess.STDOUT,
                                env=env, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((run / "metrics.jsonl").exists() and len(_records(run, "epoch")) >= 3):
            assert launcher.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(_worker_pid(launcher, 1), signal.SIGKILL)
        started = time.monotonic()
        returncode = launcher.wait(timeout=120)  # a hang fails here
    finally:
        if launcher.poll() is None:
            launcher.kill()
        log.close()
    output = (tmp_path / "killed.log").read_text()
    assert returncode != 0
    assert time.monotonic() - started < 120
    assert "rank      : 1" in output and "SIGKILL" in output  # torchrun names the dead process
    assert "--resume" in output  # the survivor says how to continue
    done = len(_records(run, "epoch"))
    assert 3 <= done < KILL_EPOCHS

    resumed = _torchrun("amalgamate", str(config), "--output", str(run), "--resume", "--quiet",
                        env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    restart = _records(run, "resumed")[0]["epoch"]  # the last epoch whose checkpoint was written
    assert 2 <= restart <= done
    assert ([r["epoch"] for r in _records(run, "epoch")][-(KILL_EPOCHS - restart):]
            == list(range(restart, KILL_EPOCHS)))
    # resumed at an epoch boundary with every process's random state: same student, bit for bit
    _assert_same_weights(full / "student", run / "student")


def test_a_global_batch_that_does_not_split_is_refused(tmp_path):
    result = _torchrun("amalgamate", str(KD), "--output", str(tmp_path / "run"),
                       "--set", "train.batch_size=33", env=ONE_THREAD, timeout=300)
    assert result.returncode != 0
    assert "train.batch_size is 33, the global batch of all 2 processes" in result.stderr
    assert "divisible by 2, e.g. 32" in result.stderr


def _assert_same_weights(expected: Path, actual: Path) -> None:
    expected_state, actual_state = load_model(expected).state_dict(), load_model(actual).state_dict()
    assert expected_state.keys() == actual_state.keys()
    for key, value in expected_state.items():
        assert torch.equal(value, actual_state[key]), key


def test_resume_from_the_middle_of_an_epoch_is_bit_exact(tmp_path, two_process_runs):
    """Every process's random state and BatchNorm statistics are in the checkpoint."""
    full, part = two_process_runs["mid-epoch/full"], tmp_path / "part"
    # interrupted after 20 steps (16 per epoch: inside the second) in the shared launch
    shutil.copytree(two_process_runs["mid-epoch/part"], part)
    assert not (part / "student").exists()
    state = load_state(part / "checkpoints" / "latest.safetensors")
    assert (state["epoch"], state["batch"]) == (1, 4)
    # resumed by two fresh processes: nothing carries over but the checkpoint
    resumed = _launch_jobs(tmp_path, [{"config": str(KD), "out": str(part), "overrides": MID_EPOCH,
                                       "resume": True}])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _records(part, "resumed")[0]["epoch"] == 1
    _assert_same_weights(full / "student", part / "student")


@pytest.mark.parametrize("example", list(BUNDLED))
def test_every_bundled_algorithm_runs_unchanged_on_two_processes(two_process_runs, example):
    config = EXAMPLES / f"{example}.yaml"
    algorithm = yaml.safe_load(config.read_text())["algorithm"]["name"]
    if example not in two_process_runs:
        pytest.skip(f"plugin for {algorithm} is not installed")
    run = two_process_runs[example]
    report = json.loads((run / "report.json").read_text())
    assert report["algorithm"] == algorithm
    if example.startswith("digits"):  # 10 classes: chance is 0.1
        assert report["student"]["metrics"]["digits"]["top1"] > 0.15
    epochs_logged = _records(run, "epoch")
    assert epochs_logged and all(r["processes"] == 2 for r in epochs_logged)
    student = load_model(run / "student")
    assert all(torch.isfinite(v).all() for v in student.state_dict().values() if v.is_floating_point())


def test_only_the_main_process_logs_and_shows_progress(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator

    run = tmp_path / "two"
    result = _torchrun("amalgamate", str(_cached_config(tmp_path, epochs=2)), "--output", str(run),
                       "--set", "train.loggers=[tensorboard]", "--set", "train.log_every=5",
                       env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    epoch_lines = [line for line in result.stderr.splitlines() if line.startswith("[main] epoch")]
    assert len(epoch_lines) == 2  # progress from the main process only
    assert len(list((run / "tensorboard").iterdir())) == 1  # one writer: the main process
    events = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss/kd/digits")]
    logged = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "event" not in r]
    assert steps == logged and len(steps) == len(set(steps)) > 0
    assert len(events.Scalars("eval/digits/top1")) == 2
