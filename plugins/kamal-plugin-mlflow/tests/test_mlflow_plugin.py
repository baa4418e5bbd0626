"""kamal-plugin-mlflow against MLflow's real local file store in a temp folder: what a run
logs is read back with MlflowClient (params, metric histories, artifacts' bytes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kamal import Interrupted, amalgamate, plugin_infos
from kamal.testing import make_tiny_teachers, write_run_config

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "kamal-tests")
    return MlflowClient(tracking_uri=uri)


def _config(tmp_path: Path, epochs: int = 2) -> Path:
    path = write_run_config(tmp_path / "kd.yaml", make_tiny_teachers(), {"name": "kd"},
                            epochs=epochs)
    data = yaml.safe_load(path.read_text())
    data["train"].update({"log_every": 2, "loggers": ["mlflow"]})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _only_run(client: MlflowClient):
    experiment = client.get_experiment_by_name("kamal-tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_plugin_registers_the_mlflow_logger():
    info = next(i for i in plugin_infos() if i.distribution == "kamal-plugin-mlflow")
    assert info.status == "ok" and info.provides == {"loggers": ["mlflow"]}


def test_a_run_is_logged_with_params_metrics_and_artifacts(tmp_path, tracking):
    out = tmp_path / "run"
    report = amalgamate(_config(tmp_path), out, progress=False)
    run = _only_run(tracking)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert (out / "mlflow_run_id").read_text().strip() == run.info.run_id
    params = run.data.params
    assert params["algorithm.name"] == "kd" and params["train.epochs"] == "2"
    assert params["train.loggers"] == "['mlflow']" and params["data.transfer.dataset"] == "digits"

    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    steps = [r for r in records if "event" not in r]
    history = tracking.get_metric_history(run.info.run_id, "loss/kd/digits")
    assert [m.step for m in history] == [r["step"] for r in steps] == list(range(2, 17, 2))
    assert [m.value for m in history] == pytest.approx([r["loss/kd/digits"] for r in steps])
    top1 = tracking.get_metric_history(run.info.run_id, "eval/digits/top1")
    evals = [r for r in records if r.get("event") == "eval"]
    assert [(m.step, m.value) for m in top1] == [(r["step"], r["metrics"]["digits"]["top1"])
                                                 for r in evals]
    assert top1[-1].value == report["student"]["metrics"]["digits"]["top1"]

    local = Path(tracking.download_artifacts(run.info.run_id, "", str(tmp_path / "downloaded")))
    assert json.loads((local / "report.json").read_text()) == report
    assert (local / "student" / "model.safetensors").read_bytes() == (
        out / "student" / "model.safetensors").read_bytes()
    assert yaml.safe_load((local / "config.yaml").read_text())["algorithm"]["name"] == "kd"


def test_resume_continues_the_same_mlflow_run(tmp_path, tracking):
    config = _config(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        amalgamate(config, out, progress=False, interrupt_after_steps=5)
    assert _only_run(tracking).info.status == "KILLED"
    amalgamate(config, out, progress=False, resume=True)
    run = _only_run(tracking)
    assert run.info.status == "FINISHED"
    history = tracking.get_metric_history(run.info.run_id, "loss/kd/digits")
    assert [m.step for m in history] == list(range(2, 17, 2))


def test_default_store_is_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    out = tmp_path / "run"
    amalgamate(_config(tmp_path, epochs=1), out, progress=False)
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    run = client.get_run((out / "mlflow_run_id").read_text().strip())
    assert run.data.params["algorithm.name"] == "kd"
    assert client.get_experiment(run.info.experiment_id).name == "kamal"
