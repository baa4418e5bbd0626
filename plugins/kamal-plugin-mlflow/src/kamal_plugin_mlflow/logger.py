"""MLflowLogger: a kamal run as one MLflow run.

Where: ``MLFLOW_TRACKING_URI`` when set (a server, a database, a folder); otherwise MLflow's
local file store in ``<run folder>/mlruns``, which needs no server (``mlflow ui
--backend-store-uri <run folder>/mlruns`` shows it). The experiment is
``MLFLOW_EXPERIMENT_NAME`` or ``kamal``; the MLflow run is named after the run folder and its
id is kept in ``<run folder>/mlflow_run_id`` so ``--resume`` continues the same MLflow run.

What: the resolved run config as params (``train.epochs``, ``algorithm.name``, ...), every
scalar kamal logs as a metric at the run's global step (``loss/kd/digits``,
``eval/digits/top1``, ``epoch/...``), figures under ``figures/``, and at the end
``report.json``, ``config.yaml`` and the model repo (``student/`` or ``model/``) as artifacts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kamal import Logger

RUN_ID_FILE = "mlflow_run_id"
_PARAM_LIMIT = 6000  # MLflow's longest param value


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"epochs": 2}}`` -> ``{"train.epochs": "2"}`` (lists stay one value)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:_PARAM_LIMIT]
    return flat


class MLflowLogger(Logger):
    """Logs a kamal run to MLflow (see the module docstring for where and what)."""

    name = "mlflow"

    def start(self, run_dir: Path, config: dict[str, Any], resumed_at: int | None) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir) / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 asks for this opt-in before using its (maintained, serverless) file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_dir = Path(run_dir)
        id_file = self.run_dir / RUN_ID_FILE
        if resumed_at is not None and id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "kamal")
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(experiment_name))
        run = self.client.create_run(experiment_id, run_name=self.run_dir.resolve().name)
        self.run_id = run.info.run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run_id + "\n")
        params = [Param(k, v) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.finished = False

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in scalars.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.log_scalars(metrics, step)

    def log_figure(self, name: str, figure: Any, step: int) -> None:
        self.client.log_figure(self.run_id, figure, f"figures/{name}-step{step}.png")

    def log_report(self, report: dict[str, Any], run_dir: Path) -> None:
        folder = Path(run_dir)
        for name in ("report.json", "config.yaml"):
            if (folder / name).is_file():
                self.client.log_artifact(self.run_id, str(folder / name))
        for sub in ("student", "model"):
            if (folder / sub).is_dir():
                self.client.log_artifacts(self.run_id, str(folder / sub), sub)
        self.finished = True

    def close(self) -> None:
        if getattr(self, "run_id", None):
            status = "FINISHED" if getattr(self, "finished", False) else "KILLED"
            self.client.set_terminated(self.run_id, status=status)
