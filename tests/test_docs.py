"""Documentation stays true: hooks documented, config reference fresh, public API documented."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import pytest
from conftest import ROOT

import kamal
from kamal import hookspecs

HOOKS = [name for name, obj in vars(hookspecs).items()
         if name.startswith("register_") and callable(obj)]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    assert inspect.getdoc(getattr(hookspecs, hook))
    assert f"`{hook}(register)`" in (ROOT / "docs" / "plugins.md").read_text()


def test_configuration_reference_is_up_to_date():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", [n for n in kamal.__all__ if n != "__version__"])
def test_public_api_is_importable_and_documented(name):
    obj = getattr(kamal, name)
    assert inspect.getdoc(obj), f"kamal.{name} has no docstring"


def test_docs_pages_exist_and_are_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in ("concepts", "configuration", "cli", "architecture", "plugins"):
        assert (ROOT / "docs" / f"{page}.md").exists()
        assert f"docs/{page}.md" in readme


# --- every published figure comes from a script's JSON (issue 18) ----------------------

sys.path.insert(0, str(ROOT / "benchmarks"))
import _regions  # noqa: E402

FIGURE = re.compile(r"\d+(?:\.\d+)?\s?%|\b\d+\.\d+\s?[x×]|\b0\.\d{3,}\b")
# (file, text on the line) -> why that figure is not a measurement
NOT_MEASUREMENTS = {
    ("docs/configuration.md", "train 40% / transfer 30% / test 30%"):
        "the digits dataset's fixed split definition",
    ("docs/configuration.md", "`float`, default `0.001`"): "a config default, not a result",
    ("docs/algorithms/cfl.md", "[0.001, 0.01, 0.05, 0.1, 0.2, 1, 2]"):
        "the RBF bandwidths' config default",
    ("plugins/kamal-plugin-recombination/README.md", "keep 50% of the combined network"):
        "explains the config value budget: 0.5",
    ("docs/benchmarks.md", "**kamal without cache >= 0.95x the plain loop**"):
        "issue 8's target, not a measurement",
    ("docs/algorithms/agglomerate.md", "| `sweep_sizes` | `student_sizes`, else 0.75x/1x/1.25x"):
        "the config default's sizes relative to the student's, not a result",
    ("docs/teachers.md", '"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]'):
        "ImageNet's normalisation in an example config.json, not a result",
}


def _markdown() -> list[tuple[str, str]]:
    return [(str(p.relative_to(ROOT)), p.read_text()) for p in _regions.markdown_files()]


def test_every_marked_region_is_what_the_json_renders():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "_regions.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_region_check_catches_a_hand_edited_figure():
    data = _regions.load()
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- readme-example:begin -->\n(.*?)<!-- readme-example:end -->", readme,
                      re.DOTALL)
    assert match, "README.md has no readme-example region"
    tampered = readme.replace(match[1], match[1].replace("top1=0.", "top1=1."), 1)
    assert tampered != readme
    assert _regions.render_text(tampered, data) == _regions.render_text(readme, data) == readme


def test_every_region_has_a_renderer():
    names = {m["name"] for _, text in _markdown() for m in _regions.REGION.finditer(text)}
    assert names, "no marked regions found"
    assert names <= set(_regions.RENDERERS), names - set(_regions.RENDERERS)


def test_no_figure_outside_a_marked_region_unless_whitelisted():
    bare, used = [], set()
    for path, text in _markdown():
        for number, line in enumerate(_regions.regions_outside(text).splitlines(), 1):
            if not FIGURE.search(line):
                continue
            allowed = [key for key in NOT_MEASUREMENTS if key[0] == path and key[1] in line]
            used.update(allowed)
            if not allowed:
                bare.append(f"{path}:{number}: {line.strip()}")
    assert not bare, "figures typed by hand (render them from the JSON, remove them, or " \
        "whitelist them in NOT_MEASUREMENTS with a reason):\n" + "\n".join(bare)
    assert used == set(NOT_MEASUREMENTS), f"stale whitelist entries: {set(NOT_MEASUREMENTS) - used}"


def test_the_figure_lint_sees_what_it_must():
    for text in ("top-1 91.3%", "reaches 90.56 % top-1", "17.8x faster", "2.5× the KD's",
                 "mIoU 0.7654"):
        assert FIGURE.search(text), text
    for text in ("arXiv:1906.10546", "10x louder", "lr 2e-3", "budget 0.5", "23,733 params"):
        assert not FIGURE.search(text), text


def test_quality_floors_are_decided_by_the_measurements():
    import quality

    def run(student, params=23_000, combined=48_000):
        return {"student": student, "student_params": params, "combined_params": combined}

    data = {"examples": {
        "kd": {"algorithm": "kd", "runs": [run(0.95), run(0.89)]},  # the worst seed counts
        "recombination": {"algorithm": "recombination", "runs": [run(0.95, params=25_000)]},
        "layerwise": {"algorithm": "layerwise", "runs": [run(0.93)]}}}
    floors = quality.floors(data)
    assert not floors["kd"]["met"] and floors["kd"]["top1"] == 0.89
    assert not floors["recombination"]["met"]  # accurate, but above half the parameters
    assert floors["layerwise"]["met"]
    committed = _regions.load()["benchmarks"]["quality"]
    assert quality.floors(committed) == committed["floors"]
    assert all(entry["met"] for entry in committed["floors"].values())
    assert set(committed["floors"]) == set(quality.FLOORS)  # every bundled algorithm measured


def test_stored_view_verdicts_are_decided_by_the_measurements():
    import stored_views

    def runs(*top1, size=1000):
        return [{"seed": i, "student": t, "cache_bytes": size} for i, t in enumerate(top1)]

    checks = stored_views.verdicts({"live": runs(0.95, 0.94, 0.96), "fp32": runs(0.93, 0.92, 0.94),
                                    "fp16": runs(0.931, 0.919, 0.94, size=600)})
    # 2 points lower on every seed: the whole interval is outside the margin
    assert checks["stored views within 0.5 point of live teachers"]["verdict"] == "missed"
    assert not checks["float16 cache smaller than float32"]["met"]  # 1.67x
    assert checks["float16 cache within 0.3 point of float32"]["verdict"] == "met"
    wide = stored_views.paired_difference(runs(0.95, 0.93, 0.94), runs(0.94, 0.94, 0.94), 0.003)
    assert wide["verdict"] == "undecided" and wide["low"] < -0.003 < 0.003 < wide["high"]
    committed = _regions.load()["benchmarks"]["stored_views"]
    assert stored_views.verdicts(committed["results"]) == committed["verdicts"]


def test_the_teacher_memory_verdict_is_decided_by_the_measurements():
    import teacher_memory

    mb = 2**20
    runs = {"released": {"training_peak": 900 * mb, "ready": 500 * mb, "student_params": 0}}
    assert not teacher_memory.memory_verdict(runs, [60 * mb])["met"]  # 400 MB > 360 MB
    runs["released"]["training_peak"] = 850 * mb
    assert teacher_memory.memory_verdict(runs, [60 * mb])["met"]
    runs["released"] |= {"setup_peak": 900 * mb, "cache_bytes": 50 * mb}
    assert teacher_memory.memory_verdict(runs, [60 * mb], "setup")["met"]  # 400 <= 410 MB
    committed = _regions.load()["benchmarks"]["teacher_memory"]
    for phase, verdict in committed["verdicts"].items():
        assert teacher_memory.memory_verdict(committed["runs"], committed["teacher_bytes"],
                                             phase) == verdict


def test_real_size_example_and_cfl_verdicts_are_decided_by_the_measurements():
    import example_runs as examples
    import realistic
    import speed

    stored = _regions.load()["benchmarks"]
    for key in ("realistic", "realistic_gpu"):  # tables, verdicts and the limit line
        run = stored[key]
        assert realistic.verdicts(run["results"], run["settings"]["batch"]) == run["verdicts"]
        assert realistic.stored_markdown(run) == run["markdown"]
    bound = {"loader": {"rates": [100.0]}, "student-only": {"rates": [90.0]}}
    assert "the data path is the limit" in realistic.limit_sentence(bound)
    bound["loader"]["rates"] = [400.0]
    assert "the student's step is the limit" in realistic.limit_sentence(bound)
    assert examples.within_limit(stored["examples"]["results"]) == stored["examples"]["met"]
    assert examples.within_limit({"a": {"seconds": 10}}) and not examples.within_limit(
        {"a": {"seconds": 10}, "b": {"seconds": examples.LIMIT_S + 1}})
    import cfl_speed

    validation = stored["cfl_speed"]["validation"]
    assert cfl_speed.validation_verdict(validation) == stored["cfl_speed"]["validation_verdict"]
    made = {k: {"defaults": [0.95], "defaults before": [0.94]} for k in cfl_speed.VALIDATED}
    assert cfl_speed.validation_verdict(made)["met"]
    made[list(made)[-1]]["defaults before"] = [0.96]  # lower than before in one setting
    assert not cfl_speed.validation_verdict(made)["met"]
    rates = stored["cfl_speed"]["epoch_rates"]
    reference = next(iter(rates.values()))
    for label, check in stored["cfl_speed"]["verdicts"].items():
        word, low, high = speed.verdict(rates[label], reference, cfl_speed.TARGET)
        assert (word, low, high) == (check["verdict"], check["low"], check["high"])
