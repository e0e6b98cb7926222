"""Experiment tracking: a training run's numbers and files, sent to mlflow as they are made.

  python train.py --tracker=mlflow [--tracker-uri=URI]     # needs: pip install -r requirements-tracking.txt
  MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri runs/mlruns   # browse (the full `mlflow` package)

Only the client is used (`mlflow-skinny`): params (the config), the loss at every log interval,
per-epoch figures, the final mAP / CF1 / OF1 / per-class AP, caption quality and ReSO, and
report.json and the AP plot as artifacts. The default store is a local folder, runs/mlruns.
A run folder remembers its mlflow run (`mlflow_run.json`), so a resumed run goes on logging
into the same mlflow run. Only the main process of a torchrun job tracks.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_STORE = ROOT / "runs" / "mlruns"
RUN_ID_FILE = "mlflow_run.json"      # in the run folder: the mlflow run a resume continues
INSTALL = "pip install -r requirements-tracking.txt"


class Tracker:
    """No tracking: every call does nothing (no --tracker, or not the main process)."""

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_report(self, report: dict, report_file: Path) -> None:
        pass

    def end(self, status: str) -> None:
        pass


def check_available(tracker: str) -> None:
    """Before any work: the chosen tracker's package is there (one-line ValueError otherwise)."""
    if tracker == "mlflow" and importlib.util.find_spec("mlflow") is None:
        raise ValueError(f"--tracker=mlflow needs mlflow: {INSTALL}")


def numbers(values: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) dict as flat metric names: {"test/AP/cat": 91.2}."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def mlflow_client(uri: str):
    """mlflow's client for a tracking URI; a local folder (file:) as mlflow's file store, which
    mlflow 3 keeps in maintenance mode behind an opt-in: it needs no database, and `mlflow ui`
    reads it as it is."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(uri)


class MlflowTracker(Tracker):
    """One mlflow run per run folder, through mlflow's client (no global active run)."""

    def __init__(self, cfg, preset: str, out_dir: Path, resumed: bool):
        from mlflow.entities import Param

        uri = cfg.tracker_uri or DEFAULT_STORE.as_uri()
        self.client = mlflow_client(uri)
        record = out_dir / RUN_ID_FILE
        if resumed and record.is_file():
            self.run_id = json.loads(record.read_text())["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = f"bacgcn-{cfg.dataset}"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=out_dir.name, tags={"preset": preset})
        self.run_id = run.info.run_id
        record.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": uri}) + "\n")
        params = {**json.loads(cfg.to_json()), "preset": preset}
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(1000 * time.time())
        batch = [Metric(k, v, now, step) for k, v in numbers(metrics).items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_report(self, report: dict, report_file: Path) -> None:
        """The final figures (test metrics, per-class AP, zero-shot, caption quality, ReSO),
        report.json and the per-class AP plot."""
        import figures

        keep = ("mAP", "mAP_small", "mAP_large", "CF1", "OF1", "AP", "zeroshot", "caption_quality", "reso")
        self.log_metrics({k: report[k] for k in keep if k in report}, step=0)
        self.client.log_artifact(self.run_id, str(report_file))
        with tempfile.TemporaryDirectory() as tmp:
            plot = Path(tmp) / "ap.png"
            figures.ap_figure([figures.APSeries(report_file.parent.name, report["AP"], report["mAP"])]).save(plot)
            self.client.log_artifact(self.run_id, str(plot))

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def open_tracker(cfg, preset: str, out_dir: Path, resumed: bool, main_process: bool) -> Tracker:
    """The run's tracker; a store that refuses the run is a one-line ValueError naming it (a
    server that does not answer takes mlflow's own retries first)."""
    if not (cfg.tracker == "mlflow" and main_process):
        return Tracker()
    from mlflow.exceptions import MlflowException

    try:
        return MlflowTracker(cfg, preset, out_dir, resumed)
    except (MlflowException, OSError) as e:     # a server's refusal; a local store that cannot be written
        where = cfg.tracker_uri or DEFAULT_STORE.as_uri()
        raise ValueError(f"--tracker-uri={where}: {str(e).splitlines()[0][:200]}") from None
