"""The teacher-output cache: identical results, mode selection, disk reuse on resume."""

from __future__ import annotations

import pytest
import torch
import yaml

from kamal import ConfigError, Interrupted, load_model
from kamal.checkpoint import load_state
from kamal.data.digits import build_digits
from kamal.run import amalgamate
from kamal.testing import write_run_config


def _config(tmp_path, teachers, name, merge="standardize", **train):
    path = write_run_config(tmp_path / f"{name}.yaml", teachers, {"name": "kd", "merge": merge},
                            epochs=2)
    data = yaml.safe_load(path.read_text())
    data["train"].update(train)
    path.write_text(yaml.safe_dump(data))
    return path


def test_cached_runs_equal_uncached_ones(tmp_path, tiny_teachers):
    weights, reports = {}, {}
    for mode in ("off", "memory", "disk"):
        out = tmp_path / mode
        reports[mode] = amalgamate(_config(tmp_path, tiny_teachers, mode, teacher_cache=mode), out,
                                   progress=False)
        weights[mode] = load_model(out / "student").state_dict()
    for mode in ("memory", "disk"):
        for key, value in weights["off"].items():
            assert torch.allclose(value.float(), weights[mode][key].float(), atol=1e-6), key
        assert reports[mode]["teacher_cache"]["mode"] == mode
        samples = len(build_digits("transfer"))
        assert reports[mode]["teacher_cache"]["bytes"] == samples * 2 * 5 * 4  # 2 teachers x 5 logits
    assert reports["off"]["teacher_cache"] == {"mode": "off", "bytes": 0}


def test_a_learned_gate_trains_alike_with_and_without_the_cache(tmp_path, tiny_teachers):
    """Cached outputs differ from live ones by rounding (other batch sizes): the learned
    gate's fit is convex, so it moves by as little, and so does the student."""
    reports = {mode: amalgamate(_config(tmp_path, tiny_teachers, f"learned-{mode}", "learned",
                                        teacher_cache=mode), tmp_path / f"learned-{mode}",
                                progress=False) for mode in ("off", "memory")}
    top1 = [reports[mode]["student"]["metrics"]["digits"]["top1"] for mode in ("off", "memory")]
    assert abs(top1[0] - top1[1]) <= 0.01, top1
    gates = [load_state(tmp_path / f"learned-{mode}" / "checkpoints" / "latest.safetensors")
             ["modules"]["merger"] for mode in ("off", "memory")]
    for key in ("gate.w2", "gate.b2"):
        torch.testing.assert_close(gates[0][key], gates[1][key], atol=5e-3, rtol=0)


def test_auto_mode_follows_budget_and_augmentation(tmp_path, tiny_teachers):
    report = amalgamate(_config(tmp_path, tiny_teachers, "a", epochs=1), tmp_path / "a",
                        progress=False)
    assert report["teacher_cache"]["mode"] == "memory"
    report = amalgamate(_config(tmp_path, tiny_teachers, "b", epochs=1,
                                teacher_cache_budget_mb=0.001), tmp_path / "b", progress=False)
    assert report["teacher_cache"]["mode"] == "disk"
    path = _config(tmp_path, tiny_teachers, "c", epochs=1)
    data = yaml.safe_load(path.read_text())
    data["data"]["transfer"]["augment"] = True
    path.write_text(yaml.safe_dump(data))
    assert amalgamate(path, tmp_path / "c", progress=False)["teacher_cache"]["mode"] == "off"
    with pytest.raises(ConfigError, match="teacher_cache: 'memory' needs transfer data without "
                                          "random augmentation"):
        amalgamate(path, tmp_path / "d", progress=False, overrides=["train.teacher_cache=memory"])


def test_yaml_off_is_accepted(tmp_path, tiny_teachers):
    path = _config(tmp_path, tiny_teachers, "off", epochs=1)
    path.write_text(path.read_text().replace("seed: 0", "seed: 0\n  teacher_cache: off"))
    assert amalgamate(path, tmp_path / "o", progress=False)["teacher_cache"]["mode"] == "off"


def test_disk_cache_is_reused_on_resume(tmp_path, tiny_teachers):
    path = _config(tmp_path, tiny_teachers, "disk", teacher_cache="disk")
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        amalgamate(path, out, progress=False, interrupt_after_steps=3)
    shards = sorted((out / "teacher_cache").glob("*/shard-00000.safetensors"))
    assert len(shards) == 2  # one entry per teacher
    stamps = [shard.stat().st_mtime_ns for shard in shards]
    amalgamate(path, out, progress=False, resume=True)
    assert [shard.stat().st_mtime_ns for shard in shards] == stamps  # not recomputed


@pytest.mark.parametrize("merge", ["standardize", "learned"])
def test_with_the_cache_the_teachers_read_the_transfer_data_once(tmp_path, tiny_teachers, merge):
    """kd taps no teacher layer, so the cache is filled first and every calibration (setup's
    and the report ensemble's) reads it: no teacher runs twice on a transfer image. The
    learned gate reads eight shifted copies of each calibration image besides, once: the
    report reuses the run's calibrated merger."""
    from kamal import KamalModel

    images = {"off": 0, "memory": 0}
    mode = "off"

    def count(module, args):  # every forward of a frozen (teacher) network
        if isinstance(module, KamalModel) and not any(p.requires_grad for p in module.parameters()):
            images[mode] += len(args[0])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        for mode in ("off", "memory"):
            amalgamate(_config(tmp_path, tiny_teachers, mode, merge, teacher_cache=mode),
                       tmp_path / mode, progress=False)
    finally:
        handle.remove()
    transfer, test = len(build_digits("transfer")), len(build_digits("test"))
    shifted = 8 * transfer if merge == "learned" else 0
    epochs, latency = 2, 3 + 20  # the report's CPU latency: 3 warm-up and 20 timed images
    # each teacher's metrics, the ensemble in each merge (the run's, standardize and naive)
    # and with the oracle gate
    evaluation = (5 if merge == "learned" else 4) * test + latency
    trained = epochs * (transfer // 64 * 64)  # batches of 64, the last partial one dropped
    # off: calibration, training, the report's standardize calibration when the run's merge
    # is another; memory: the probe and the fill (every calibration then reads the cache)
    report = transfer if merge == "learned" else 0
    assert images["off"] == 2 * (transfer + shifted + trained + report + evaluation)
    assert images["memory"] == 2 * (8 + transfer + shifted + evaluation)


def test_a_half_precision_cache_is_half_the_size_and_trains_alike(tmp_path, tiny_teachers):
    reports = {}
    for dtype, mode in (("float32", "memory"), ("float16", "memory"), ("bfloat16", "disk")):
        path = _config(tmp_path, tiny_teachers, f"{dtype}-{mode}", teacher_cache=mode,
                       teacher_cache_dtype=dtype)
        reports[dtype] = amalgamate(path, tmp_path / dtype, progress=False)
    full = reports["float32"]["teacher_cache"]["bytes"]
    top1 = reports["float32"]["student"]["metrics"]["digits"]["top1"]
    for dtype in ("float16", "bfloat16"):
        assert reports[dtype]["teacher_cache"]["bytes"] * 2 == full, dtype
        assert abs(reports[dtype]["student"]["metrics"]["digits"]["top1"] - top1) <= 0.02, dtype


def _entry(name, key, values, scale=1.0):
    from kamal.cache import CacheEntry

    return CacheEntry(name, key, values, lambda x: ({"t": x * scale}, {}))


def test_disk_cache_reads_back_what_it_stored(tmp_path):
    from kamal.cache import TeacherCache

    values = torch.randn(10, 3) * 100
    cache = TeacherCache("disk", tmp_path / "cache", torch.bfloat16)
    cache.build([_entry("a", "k", values)], batch_size=4)
    outputs, _ = cache.lookup(torch.tensor([7, 2]), torch.device("cpu"))
    expected = values[[7, 2]].to(torch.bfloat16).float()
    assert outputs[0]["t"].dtype == torch.float32 and torch.equal(outputs[0]["t"], expected)
    assert cache.nbytes == 10 * 3 * 2
